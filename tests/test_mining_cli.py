"""Every mining strategy trains through the CLI (`python -m mcl.train`), also under 2-process CPU DDP."""

from __future__ import annotations

import pytest
from conftest import run_cli

# One training batch and one eval batch of CPU-sized work; mining from the first step (no warm-up),
# so the mining code runs even though the bank still holds its random initial keys.
FAST = [
    "debug=tiny",
    "dataset=digits",
    "dataset.image_size=16",
    "backbone.width=8",
    "model.proj_hidden=64",
    "data.eval_batch_size=64",
    "trainer.fast_dev_run=true",
    "logger=none",
    "callbacks=none",
    "++mining.positive.warmup=false",  # ++: the sweep is first composed with the default `none`/`all`, which have no warm-up
    "++mining.negative.warmup=false",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SWEEPS = {
    "positives": ["mining.positive=nn,soft,hard,soft_hard", "mining.negative=gradient"],
    "negatives": ["mining.positive=nn", "mining.negative=gradient,ring,fn_elimination,hard,debiased"],
}


@pytest.mark.slow
@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_strategy_trains_through_the_cli(tmp_path, sweep):
    """`none` and `all` have no warm-up knob; they are MoCo v2, which every other CLI test runs."""
    result = run_cli(["-m", *FAST, *SWEEPS[sweep], f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=ONE_THREAD)
    jobs = len(SWEEPS[sweep][0 if sweep == "positives" else 1].split(","))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("== mcl summary ==") == jobs, result.stdout[-2000:] + result.stderr[-4000:]
    assert "failed" not in result.stdout


# Every strategy at least once, in pairs (a 2-process run costs ~20 s here); the last mines among SimCLR's in-batch candidates.
DDP_PAIRS = [
    ["mining.positive=soft_hard", "mining.negative=gradient"],
    ["mining.positive=nn", "mining.negative=ring"],
    ["mining.positive=soft", "mining.negative=fn_elimination"],
    ["mining.positive=hard", "mining.negative=hard"],
    ["mining.positive=soft_hard", "mining.negative=debiased"],
    ["experiment=simclr", "mining.positive=soft_hard", "mining.negative=gradient"],
]


@pytest.mark.slow
@pytest.mark.parametrize("pair", DDP_PAIRS, ids=lambda pair: "+".join(o.split("=")[1] for o in pair))
def test_every_strategy_trains_under_two_process_cpu_ddp(tmp_path, pair):
    """Mined positives, negative selection and diagnostics (logged per rank without a collective) on two
    processes; `none` + `all` is MoCo v2, which tests/test_ddp.py runs. With in-batch candidates the keys of
    both ranks are gathered with their gradient."""
    args = [*pair, *FAST, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_cli(args, cwd=tmp_path, env=ONE_THREAD)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert result.stdout.count("== mcl summary ==") == 1  # printed by rank 0 only
