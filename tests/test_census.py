"""No host round trip in a step that does not log, for every preset in conf/experiment/.

A CUDA step runs ahead of the host only while the host never waits for the device and never hands
it a Python number to copy. The census sees both on a CPU, at the dispatcher and at the Python API:
    reads     aten._local_scalar_dense (.item(), bool(), int(), float() of a tensor), .tolist(),
              .numpy(), .cpu(); data-dependent shapes: aten.nonzero, aten.masked_select and boolean-
              mask aten.index / aten.index_put_ (each runs nonzero: forward and backward wait);
    copies    aten.lift_fresh: torch.tensor(x) / new_tensor(x) / as_tensor(x) of Python data, which on
              a GPU is a host-to-device copy from pageable memory (self.log of a float is one).
Fills from a scalar (full, new_full, masked_fill, where(m, x, 0.0)) pass the number as a kernel
argument: no copy, not counted. Not counted either: the host-side data loading (frames under
torch/utils/data: its tensors are made on the host and reach the device as the batch), and the
non-finite guard's one read a step (mcl.reliability.NonFiniteGuard, by design: it stops the run
before a non-finite step touches the weights), which is counted apart.
"""

from __future__ import annotations

import csv
import traceback
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import MICRO, make_cfg
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mcl.train import CONF_DIR, build

PRESETS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
READ_OPS = {"_local_scalar_dense", "nonzero", "masked_select"}
MASK_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
PY_READS = {"tolist", "numpy", "cpu", "__array__"}
GUARD = "NonFiniteGuard"


def _source() -> str | None:
    """Where the op was called from: None inside the host-side data loading; GUARD in the non-finite guard;
    else the innermost mcl or Lightning frame (file:function)."""
    frames = traceback.extract_stack()
    if any("torch/utils/data/" in f.filename for f in frames):
        return None
    if any(f.filename.endswith("mcl/reliability.py") and f.name == "on_before_optimizer_step" for f in frames):
        return GUARD
    ours = [f for f in frames if ("/mcl/" in f.filename or "/lightning/" in f.filename) and "/tests/" not in f.filename]
    return f"{Path(ours[-1].filename).name}:{ours[-1].name}" if ours else "?"


class Census(TorchDispatchMode):
    """Records every read and every scalar-to-device copy (see the module docstring) as (op, source)."""

    def __init__(self):
        super().__init__()
        self.records: list[tuple[str, str]] = []
        self.python = _PythonReads(self.records)

    def __enter__(self):
        self.python.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.python.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        op = None
        if name in READ_OPS or name == "lift_fresh":
            op = name
        elif name in MASK_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            op = f"{name}[bool mask]"
        if op is not None and (where := _source()) is not None:
            self.records.append((op, where))
        return func(*args, **(kwargs or {}))


class _PythonReads(TorchFunctionMode):
    """The reads the dispatcher does not see: tolist and numpy read the memory directly, cpu() of a CPU tensor
    is a no-op. (A .to(device) cannot be told from a same-device .to() on a CPU: not counted.)"""

    def __init__(self, records: list[tuple[str, str]]):
        super().__init__()
        self.records = records

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in PY_READS and (where := _source()) is not None:
            self.records.append((name, where))
        return func(*args, **(kwargs or {}))


class StepCensus(L.Callback):
    """One census per training step, from its on_train_batch_start to the next one (or the end of training):
    training_step, backward, optimizer, scheduler, Lightning's per-batch logging bookkeeping. Records per
    step whether Lightning logs it."""

    def __init__(self):
        self.steps: list[tuple[bool, list[tuple[str, str]]]] = []
        self.mode: Census | None = None

    def _close(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.steps.append((self.logs, self.mode.records))
            self.mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close()
        self.logs = trainer._logger_connector.should_update_logs
        self.mode = Census()
        self.mode.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()


STEPS, EVERY = 6, 3  # logging steps 2 and 5; step 5 also ends the epoch; step 0 creates Lightning's metric states once
CENSUS = [*MICRO, "logger=csv", "callbacks=default", "trainer.max_epochs=1", f"trainer.limit_train_batches={STEPS}"]
CENSUS += [
    f"trainer.log_every_n_steps={EVERY}",
    "trainer.limit_val_batches=0",
    "model.queue_size=32",
    "+trainer.enable_model_summary=false",
]


def census_fit(tmp_path: Path, experiment: str) -> tuple[StepCensus, Path]:
    """A real fit of the preset, micro-sized, with the default callbacks and the CSV logger; the bank (32 =
    two steps of 16 keys) fills in steps 0-1 and the mining warm-up ends in step 2."""
    cfg = make_cfg([*CENSUS, f"experiment={experiment}"], tmp_path / experiment)
    datamodule, model, trainer = build(cfg)
    census = StepCensus()
    trainer.callbacks.insert(0, census)  # first: a step's census opens before any other callback's batch-start hook
    trainer.fit(model, datamodule)
    return census, Path(trainer.log_dir)


def quiet_steps(census: StepCensus) -> dict[int, Counter]:
    """The records of the steps that neither log nor end the epoch, after the first, without the guard's."""
    assert [logs for logs, _ in census.steps] == [(i + 1) % EVERY == 0 for i in range(STEPS)]
    return {
        i: Counter(r for r in records if r[1] != GUARD) for i, (logs, records) in enumerate(census.steps) if not logs and 0 < i < STEPS - 1
    }


@pytest.mark.parametrize("experiment", PRESETS)
def test_a_step_that_does_not_log_never_waits_for_the_device(tmp_path, experiment):
    """Every preset: zero reads and zero scalar-to-device copies in steps 1, 3 and 4 (bank filling, then
    full and mining), the guard's one read in every step; the logging steps read (the census sees them);
    the learning rate is logged at the logging steps only."""
    census, log_dir = census_fit(tmp_path, experiment)
    assert quiet_steps(census) == {1: Counter(), 3: Counter(), 4: Counter()}
    assert [sum(r[1] == GUARD for r in records) for _, records in census.steps] == [1] * STEPS
    assert all(any(op == "_local_scalar_dense" for op, _ in records) for logs, records in census.steps if logs)
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    lr = [int(r["step"]) for r in rows if r.get("train/lr")]
    assert lr == [EVERY - 1, 2 * EVERY - 1], lr


def test_the_census_sees_each_kind_of_round_trip():
    """Each thing the census must catch, caught: item/bool, tolist, a boolean mask read and written, nonzero,
    torch.tensor and new_tensor of a Python number; and what it must not count: scalar fills and arguments."""
    x = torch.randn(4, 3)
    with Census() as census:
        x.sum().item(), bool(x.any()), x.tolist()
        x[x > 0]
        y = x.clone()
        y[y > 0] = 0.0
        (x > 0).nonzero()
        torch.tensor(0.5), x.new_tensor(float(3))
        x.cpu()
    ops = Counter(op for op, _ in census.records)
    assert ops == Counter(
        {"_local_scalar_dense": 2, "tolist": 1, "index[bool mask]": 1, "index_put_[bool mask]": 1, "nonzero": 1, "lift_fresh": 3, "cpu": 1}
    ), ops  # y[mask] = 0.0 also lifts its 0.0: a copy on a GPU
    with Census() as census:
        torch.where(x > 0, x, 0.0), x.masked_fill(x > 0, float("-inf")), x.new_full((), 4.0), torch.full((2,), 1.0), x * 2.0
        x[torch.arange(2)], x.index_select(0, torch.arange(2))
    assert census.records == []


# --- the round-trip-free bodies give the former results ----------------------------------------------
def former_nnclr_rows(p: torch.Tensor, neighbours: torch.Tensor, tau: float) -> torch.Tensor:
    """nnclr_loss's row term as it was: the query's own neighbours picked with a boolean mask."""
    b, k, _ = neighbours.shape
    logits = p @ neighbours.flatten(0, 1).T / tau  # B x Bk
    target = torch.arange(b).repeat_interleave(k)[None, :] == torch.arange(b)[:, None]  # B x Bk
    rows = -F.log_softmax(logits, dim=1)[target].view(b, k).sum(dim=1).mean()
    return 0.5 * (rows + F.cross_entropy(logits.T, torch.arange(b).repeat_interleave(k)))


def former_snclr_target(weight: torch.Tensor) -> torch.Tensor:
    """snclr_loss's target as it was: the diagonal blocks written through a boolean mask."""
    b, k = weight.shape
    target = torch.zeros(b, b, 1 + k, dtype=weight.dtype)
    target[torch.eye(b, dtype=torch.bool)] = torch.cat([torch.ones_like(weight[:, :1]), weight], dim=1)
    return target.flatten(1)


def test_the_losses_without_masks_equal_their_former_bodies():
    """Seeded inputs with awkward ties (two identical neighbours): nnclr_loss and snclr_loss and their input
    gradients equal the former masked bodies (written above), and the diagnostics' counts are the same."""
    from mcl.neighbours import neighbour_diagnostics, nnclr_loss, snclr_loss, snclr_weights

    torch.manual_seed(0)
    b, k, d, tau = 6, 3, 8, 0.2
    neighbours = F.normalize(torch.randn(b, k, d), dim=2)
    neighbours[:, 1] = neighbours[:, 0]  # tied neighbours
    p, z = F.normalize(torch.randn(b, d), dim=1).requires_grad_(True), torch.randn(b, d, requires_grad=True)
    keys = F.normalize(torch.randn(b, d), dim=1)
    ours, former = nnclr_loss(p, neighbours, tau), former_nnclr_rows(p, neighbours, tau)
    torch.testing.assert_close(ours, former, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, p)[0], torch.autograd.grad(former, p)[0], rtol=1e-6, atol=1e-7)
    for threshold in (False, True):
        loss, weight = snclr_loss(p, z, keys, neighbours, tau, threshold)
        logits = p @ torch.cat([keys[:, None], neighbours], dim=1).flatten(0, 1).T / tau  # B x B(1+k)
        target = former_snclr_target(snclr_weights(z, neighbours, threshold))
        former = -(target * F.log_softmax(logits, dim=1).masked_fill(target == 0, 0.0)).sum(dim=1).mean()
        torch.testing.assert_close(loss, former, rtol=1e-6, atol=1e-6)
        for a, c in zip(torch.autograd.grad(loss, (p, z)), torch.autograd.grad(former, (p, z))):
            torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
    labels, query_labels = torch.randint(-1, 3, (b, k)), torch.randint(-1, 3, (b,))
    stats = neighbour_diagnostics(weight, labels, query_labels)
    assert stats[1, 0] == b and stats[0, 0] == (weight > 0).sum()  # pos_kept: kept neighbours over B queries
