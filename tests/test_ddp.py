"""2-process CPU DDP through the CLI (Lightning's `ddp` relaunches `sys.argv`, so it runs as a subprocess).

A probe callback (below, imported by the child processes through PYTHONPATH) dumps, per rank, the
bank before every step, the dataset indices of every batch, the lr and the final metrics.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_cli
from test_resume import KEEP_ALL, assert_same_training_state, load

HERE = Path(__file__).resolve().parent
BATCH, QUEUE = 16, 64  # 16 images (one key each) x 2 ranks = 32 keys a step: the bank turns over every 2 steps
DDP_TINY = [
    "trainer=ddp_cpu",
    "debug=tiny",
    "dataset=digits",
    "dataset.image_size=16",
    "backbone.width=8",
    "model.proj_hidden=64",
    f"data.batch_size={BATCH}",
    f"model.queue_size={QUEUE}",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1.0",  # whole splits: the 449 test images are padded to 450 by the sampler
    "trainer.deterministic=true",
    "seed=0",
    "+callbacks.noise._target_=test_resume.NoisyGradients",  # a step that draws from every rank's random streams
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


class BankProbe(L.Callback):
    """Writes probe_rank<r>.pt into the run dir: what this rank saw and held at every step."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        bank = {k: v.detach().clone() for k, v in pl_module.bank.state_dict().items()}  # before this step's enqueue
        self.steps.append({"epoch": trainer.current_epoch, "batch_index": batch[2].clone(), "bank": bank})

    def on_train_end(self, trainer, pl_module) -> None:
        out = {
            "steps": self.steps,
            "final_bank": {k: v.detach().clone() for k, v in pl_module.bank.state_dict().items()},
            "lr": trainer.optimizers[0].param_groups[0]["initial_lr"],
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "world_size": trainer.world_size,
            "not_broadcast": sorted(trainer.strategy.model.parameters_to_ignore),  # buffers DDP leaves out of its broadcasts
        }
        torch.save(out, Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.pt")


def run_ddp(tmp_path: Path, name: str, *extra: str):
    out = tmp_path / name
    args = [*DDP_TINY, f"paths.output_dir={out}", f"hydra.run.dir={out}", "+callbacks.probe._target_=test_ddp.BankProbe", *extra]
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    proc = run_cli(args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, [torch.load(out / f"probe_rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One uninterrupted 2-process run (every step's checkpoint kept) and its probes."""
    return run_ddp(tmp_path_factory.mktemp("ddp"), "run", *KEEP_ALL)


@pytest.mark.slow
def test_ddp_bank_identical_disjoint_shards_scaled_lr_reduced_metrics(ddp_run):
    _, (r0, r1) = ddp_run
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["steps"]) == len(r1["steps"]) == 6

    # the bank is identical on both ranks before every step and at the end
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        for name in ("keys", "indices", "labels", "ptr", "num_written"):
            assert torch.equal(s0["bank"][name], s1["bank"][name]), name
    for name in ("keys", "indices", "labels", "ptr", "num_written"):
        assert torch.equal(r0["final_bank"][name], r1["final_bank"][name]), name

    # ... by construction: DDP does not broadcast the bank (mcl.ddp), only the other buffers
    assert r0["not_broadcast"] == r1["not_broadcast"] == ["bank.indices", "bank.keys", "bank.labels", "bank.num_written", "bank.ptr"]

    # each step enqueues one key an image (view 2's) of both ranks, in rank order: [rank 0 | rank 1]
    banks = [s["bank"] for s in r0["steps"]] + [r0["final_bank"]]
    keys_per_step = BATCH * 2
    for t, (s0, s1) in enumerate(zip(r0["steps"], r1["steps"])):
        before, after = banks[t], banks[t + 1]
        ptr = int(before["ptr"])
        expected = torch.cat([s0["batch_index"], s1["batch_index"]])
        assert torch.equal(after["indices"][ptr : ptr + keys_per_step], expected)
        assert int(after["num_written"]) == int(before["num_written"]) + keys_per_step
    final_indices = set(r0["final_bank"]["indices"].tolist())
    assert final_indices & set(torch.cat([s["batch_index"] for s in r0["steps"]]).tolist())
    assert final_indices & set(torch.cat([s["batch_index"] for s in r1["steps"]]).tolist())

    # each rank sees a disjoint shard of every epoch, and the order changes between epochs
    for epoch in (0, 1):
        seen = [torch.cat([s["batch_index"] for s in r["steps"] if s["epoch"] == epoch]) for r in (r0, r1)]
        assert len(set(seen[0].tolist())) == len(seen[0]) == 3 * BATCH
        assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert not torch.equal(r0["steps"][0]["batch_index"], r0["steps"][3]["batch_index"])

    # the lr scales with the global batch (2 ranks x 16), not the per-device one
    assert r0["lr"] == r1["lr"] == pytest.approx(0.06 * 2 * BATCH / 256)

    # metrics are reduced across ranks: every rank reports the same value
    for key in ("train/loss", "val/knn_top1", "val/linear_top1", "val/knn_memory_size", "val/knn_queries"):
        assert key in r0["metrics"]
        assert r0["metrics"][key] == r1["metrics"][key], key

    # every image votes or is scored once: the sampler's padding duplicate is dropped
    assert (r0["metrics"]["val/knn_memory_size"], r0["metrics"]["val/knn_queries"]) == (1348, 449)


@pytest.mark.slow
def test_ddp_resume_mid_epoch_equals_uninterrupted(ddp_run, tmp_path):
    ref, _ = ddp_run
    out, (r0, r1) = run_ddp(tmp_path, "resumed", f"ckpt_path={ref / 'kept' / 'step4.ckpt'}")
    assert len(r0["steps"]) == len(r1["steps"]) == 2  # epoch 1's last two batches, on each rank
    for name in ("keys", "indices", "ptr"):
        assert torch.equal(r0["final_bank"][name], r1["final_bank"][name])
    assert_same_training_state(load(out / "checkpoints" / "last.ckpt"), load(ref / "checkpoints" / "last.ckpt"))


def test_one_gather_carries_keys_indices_and_labels_bit_for_bit():
    """gather_rows packs float32 keys and int64 indices/labels into one all_gather; two ranks simulated
    (each rank's rows, then the other's), with indices beyond float32's exact integers."""
    from mcl.ddp import gather_rows

    keys = torch.randn(4, 3)
    index = torch.tensor([2**40 + 3, -1, 7, 2**62 - 1])
    labels = torch.tensor([1, -1, 5, 9])
    other = [keys + 1, index + 1, labels + 1]
    calls = []

    def gather(t):  # rank 0's rows, then rank 1's, as Lightning's all_gather().flatten(0, 1)
        calls.append(t.shape)
        mine = torch.cat([p.reshape(4, -1).view(torch.float32) for p in other], dim=1)
        return torch.cat([t, mine])

    k, i, y, aux = gather_rows(gather, 2, keys, index, labels, None)
    assert len(calls) == 1 and aux is None
    for ours, expected in zip((k, i, y), ([keys, other[0]], [index, other[1]], [labels, other[2]])):
        assert ours.dtype == expected[0].dtype and torch.equal(ours, torch.cat(expected))
    alone = gather_rows(gather, 1, keys, index)
    assert alone[0] is keys and alone[1] is index and len(calls) == 1  # one device: no collective
