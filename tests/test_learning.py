"""Training learns: the demo's pre-training raises kNN top-1 above the initial network's."""

from __future__ import annotations

import pytest

from mcl.train import train
from tests.conftest import make_cfg


@pytest.mark.slow
def test_demo_pretraining_raises_knn_above_initialisation(tmp_path):
    summary = train(make_cfg(["experiment=demo", "logger=none", "callbacks=none"], tmp_path / "run"))
    before, after = summary["initial"]["val/knn_top1"], summary["val/knn_top1"]
    assert after > 0.5, "kNN top-1 must be far above chance (0.1 for ten digits)"
    assert after >= before + 0.02, f"pre-training did not improve kNN top-1: {before:.4f} -> {after:.4f}"
