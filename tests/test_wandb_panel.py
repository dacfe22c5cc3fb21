"""The mining panel (mcl.panel) and the W&B logger: offline runs with the config, metrics and panel."""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg, run_cli
from torch.nn import functional as F

from mcl.panel import NOT_IN_BANK, draw, mine
from mcl.train import build

SMALL = ["debug=tiny", "dataset=digits", "dataset.image_size=16", "backbone.width=8", "data.batch_size=16", "model.queue_size=128"]


def test_panel_shows_what_the_strategies_picked(tmp_path):
    """nn positives and fn_elimination negatives, on a full bank of real training keys."""
    threshold = 0.3
    overrides = [
        "mining.positive=nn",
        "mining.negative=fn_elimination",
        f"mining.negative.threshold={threshold}",
        "mining.negative.compare_to=query",
    ]
    datamodule, module, _ = build(make_cfg([*SMALL, "logger=none", "callbacks=none", *overrides], tmp_path))
    train_view = datamodule.val_dataloader()[0].dataset  # un-augmented training images
    with torch.no_grad():
        module.eval()
        images = torch.stack([train_view[i][0] for i in range(module.bank.size)])
        keys = F.normalize(module.key_projector(module.key_backbone(images)), dim=1)  # K x D
        module.bank.enqueue(keys, torch.arange(module.bank.size), torch.as_tensor(datamodule.train_images.labels[: module.bank.size]))
    module.train()
    assert module.bank.is_full  # the strategies' warm-up is over
    bn_before = module.backbone.bn1.running_mean.clone()

    queries = torch.stack([datamodule.val_dataloader()[1].dataset[i][0] for i in range(5)])  # 5 test images
    mined = mine(module, queries, num_positives=5, num_negatives=4)

    assert module.training and torch.equal(module.backbone.bn1.running_mean, bn_before)  # mode and statistics untouched
    module.eval()
    with torch.no_grad():
        q = F.normalize(module.projector(module.backbone(queries)), dim=1)  # 5 x D
        k = F.normalize(module.key_projector(module.key_backbone(queries)), dim=1)
    sim, key_sim = q @ module.bank.keys.T, k @ module.bank.keys.T  # 5 x K
    for i, m in enumerate(mined):
        # NNCLR: the key's nearest bank entry replaces the augmented positive (lambda 0, weight 1)
        assert m.lam == 0.0 and [slot for slot, _ in m.positives] == [int(key_sim[i].argmax())]
        assert m.positives[0][1] == pytest.approx(1.0)
        kept, dropped = [s for s, _ in m.kept], [s for s, _ in m.dropped]
        nearest = int(key_sim[i].argmax())
        # the four most similar entries on each side of the threshold, excluding the mined positive
        expect_dropped = [j for j in sim[i].argsort(descending=True).tolist() if sim[i, j] > threshold and j != nearest][:4]
        expect_kept = [j for j in sim[i].argsort(descending=True).tolist() if sim[i, j] <= threshold and j != nearest][:4]
        assert dropped == expect_dropped and kept == expect_kept
        assert [round(v, 5) for _, v in m.kept] == [round(float(sim[i, j]), 5) for j in kept]

    shown = [(datamodule.test_images.image(i), int(datamodule.test_images.labels[i])) for i in range(5)]
    fig = draw(shown, mined, module.bank.indices, module.bank.labels, datamodule.train_images, title="test")
    image_axes = [ax for ax in fig.get_axes() if ax.get_images()]
    assert len(image_axes) == sum(1 + len(m.positives) + len(m.kept) + len(m.dropped) for m in mined)
    fig.savefig(tmp_path / "panel.png")
    assert (tmp_path / "panel.png").stat().st_size > 10_000
    assert NOT_IN_BANK < -1  # validation queries can never match a bank slot (-1 marks an empty one)


@pytest.mark.slow
def test_wandb_offline_sweep_has_config_metrics_and_panel_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *SMALL,
        "logger=wandb",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "data.eval_batch_size=128",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "callbacks.mining_panel.every_n_epochs=2",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]
    result = run_cli(args, cwd=tmp_path, env={"WANDB_MODE": "offline", "WANDB_API_KEY": "", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_ids = set()
    for job in ("0", "1"):
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1  # one W&B run per job: a sweep never merges runs
        run_ids.add(runs[0].name.rsplit("-", 1)[1])
        records = next(runs[0].glob("run-*.wandb")).read_bytes()
        assert b'"image_size":16' in records  # the resolved config (the dataset is not a module argument)
        for key in (b"val/knn_top1", b"train/loss", b"mining/neg_kept", b"mining/panel"):
            assert key in records, key
        media = list((runs[0] / "files" / "media" / "images" / "mining").glob("panel_*.png"))
        assert len(media) == 1 and media[0].read_bytes()[:4] == b"\x89PNG"
        # every 2 epochs: after the second epoch (epochs counted from 1, as in the report), not after the first; the same PNG in the run dir
        assert sorted(p.name for p in (sweep / job / "panels").iterdir()) == ["epoch002.png"]
    assert len(run_ids) == 2
