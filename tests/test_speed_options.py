"""Speed: the mining step is batched (no Python loop over the batch, no copy of the bank), and the
speed options users expect (channels_last, bf16 mixed precision, torch.compile) each train."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from mcl.bank import MemoryBank
from mcl.mining.base import MiningContext, NoPositives
from mcl.mining.diagnostics import MiningMeter, diagnostic_sums, mining_diagnostics
from mcl.mining.negative import GradientBandNegatives
from mcl.mining.positive import NeighbourPositives
from mcl.module import MCLModule
from mcl.reliability import NonFiniteGradientError, NonFiniteGuard
from mcl.train import CONF_DIR, build
from tests.conftest import REPO

SMALL = ["debug=tiny", "logger=none", "callbacks=none", "dataset=digits", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]
SMALL += ["trainer.limit_val_batches=0", "data.batch_size=8", "model.queue_size=64"]


class CountCalls(TorchFunctionMode):
    """Counts every torch function and tensor method call; records results as large as the bank."""

    def __init__(self, bank: torch.Tensor):
        super().__init__()
        self.calls: Counter = Counter()
        self.bank_sized: list[str] = []
        self.bank, self.bank_ptr = bank, bank.untyped_storage().data_ptr()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", str(func))
        self.calls[name] += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.bank.numel() and t.untyped_storage().data_ptr() != self.bank_ptr:
                self.bank_sized.append(f"{name} -> {tuple(t.shape)}")
        return out


SIDES = ("positive", "negative")


def strategies(side: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / f"mining.{side}").glob("*.yaml"))


def test_mining_step_has_no_python_loop_over_the_batch_and_never_copies_the_bank(cfg_factory):
    """Every pair of strategies in conf/mining.*: the calls one loss direction makes do not grow with the batch.

    A Python loop over queries would make B-proportional calls; a copy of the bank would create a
    tensor of K x D = 1024 x 128 elements (more than anything the step needs: B x K, B x k x D).
    """
    _, model, _ = build(cfg_factory([*SMALL, "model.queue_size=1024"]))
    bank = model.bank
    bank.enqueue(F.normalize(torch.randn(1024, 128), dim=1), torch.arange(1024) % 97, torch.arange(1024) % 10)
    assert bank.is_full  # warm-up over: every strategy mines
    node = {(side, name): cfg_factory([*SMALL, f"mining.{side}={name}"]).mining[side] for side in SIDES for name in strategies(side)}
    for positive in strategies("positive"):
        for negative in strategies("negative"):
            model.positive = hydra.utils.instantiate(node["positive", positive])
            model.negative = hydra.utils.instantiate(node["negative", negative])
            counts = []
            for b in (4, 32):
                q, k = (F.normalize(torch.randn(b, bank.keys.shape[1]), dim=1) for _ in range(2))
                with CountCalls(bank.keys) as mode:
                    loss, *_ = model.contrast(q.requires_grad_(True), k, torch.arange(b) % 97)
                assert torch.isfinite(loss), f"{positive}+{negative}"
                assert not mode.bank_sized, f"{positive}+{negative} copies the bank: {mode.bank_sized}"
                counts.append(mode.calls)
            assert counts[0] == counts[1], f"{positive}+{negative}: calls grow with the batch: {counts[1] - counts[0]}"


def test_the_counter_sees_a_loop_over_the_batch():
    """The structural check above can fail: a per-query loop is caught."""
    bank = torch.randn(64, 8)
    counts = []
    for b in (4, 32):
        with CountCalls(bank) as mode:
            [row @ bank.T for row in torch.randn(b, 8)]
        counts.append(sum(mode.calls.values()))
    assert counts[1] > counts[0]
    with CountCalls(bank) as mode:
        bank.clone()
    assert mode.bank_sized == ["clone -> (64, 8)"]


class HostReads(TorchFunctionMode):
    """Records the calls that make the host wait for the device: values read into Python, data-dependent shapes."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        index = args[1] if name == "__getitem__" else ()
        masks = [i for i in (index if isinstance(index, tuple) else (index,)) if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        if name in self.READS or masks:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_a_mining_step_never_reads_the_device(cfg_factory):
    """Every pair of strategies: both loss directions, their diagnostics (accumulated on the device),
    the backward and the enqueue make the host wait for the device zero times, from an empty bank
    (`is_full` is counted on the host) to a full one."""
    _, model, _ = build(cfg_factory([*SMALL, "model.queue_size=1024"]))
    bank, meter = model.bank, model.mining_meter
    node = {(side, name): cfg_factory([*SMALL, f"mining.{side}={name}"]).mining[side] for side in SIDES for name in strategies(side)}
    labels = torch.arange(8) % 10
    for positive in strategies("positive"):
        for negative in strategies("negative"):
            model.positive = hydra.utils.instantiate(node["positive", positive])
            model.negative = hydra.utils.instantiate(node["negative", negative])
            for fill in (False, True):  # warm-up (bank filling), then mining
                bank.load_state_dict(MemoryBank(1024, 128).state_dict())
                if fill:
                    bank.enqueue(F.normalize(torch.randn(1024, 128), dim=1), torch.arange(1024) % 97, torch.arange(1024) % 10)
                q1, q2, k1, k2 = (F.normalize(torch.randn(8, 128), dim=1) for _ in range(4))
                with HostReads() as mode:
                    loss, _, *directions = model.symmetric_loss(q1.requires_grad_(True), q2.requires_grad_(True), k1, k2, labels, labels)
                    meter.update(*(diagnostic_sums(ctx, pos, neg, labels, bank.labels) for ctx, pos, neg in directions))
                    loss.backward()
                    bank.enqueue(torch.cat([k1, k2]), torch.arange(16), torch.arange(16))
                assert mode.reads == [], f"{positive}+{negative} (bank full: {fill}): {mode.reads}"
                assert bank.is_full == fill
    with HostReads() as mode:  # the census can fail: the one-read diagnostics, and reads of every kind
        mining_diagnostics(*directions[0], labels, bank.labels)
        bool(bank.keys.any()), bank.keys[bank.labels > 0], int(bank.ptr)
    assert mode.reads == ["tolist", "__bool__", "__getitem__", "__int__"]


class StepCensus(L.Callback):
    """The host reads of each training batch (training_step, backward, enqueue, optimizer), and whether Lightning logs it."""

    def __init__(self):
        self.steps: list[tuple[bool, list[str]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.logs = trainer._logger_connector.should_update_logs
        self.mode = HostReads().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mode.__exit__(None, None, None)
        self.steps.append((self.logs, self.mode.reads))


@pytest.mark.parametrize("experiment", ["moco_v2", "paper_cifar10"])
def test_a_training_step_reads_the_device_only_when_it_logs(cfg_factory, experiment):
    """A real fit (the default progress bar, refreshed every log_every_n_steps, and no other callback; the
    non-finite guard is a callback with its own read, counted apart): no host read
    in a step that does not log, also while the bank fills and the mining warm-up ends (bank of 32 =
    two steps of 16 keys); the logging steps read the diagnostics. Their logged means are those of
    the steps: the epoch mean equals the mean of the two interval means (two steps each)."""
    overrides = [*SMALL, f"experiment={experiment}", "model.queue_size=32", "trainer.limit_train_batches=4", "trainer.log_every_n_steps=2"]
    cfg = cfg_factory([*overrides, "logger=csv", "callbacks=default"])
    # the shipped progress bar (it reads train/loss from the device at each refresh: at the logging steps)
    cfg.callbacks = {"progress_bar": cfg.callbacks.progress_bar}
    datamodule, model, trainer = build(cfg)
    census = StepCensus()
    trainer.callbacks.append(census)
    trainer.fit(model, datamodule)
    assert [logs for logs, _ in census.steps] == [False, True, False, True]
    assert [reads for logs, reads in census.steps if not logs] == [[], []]
    assert all("tolist" in reads for logs, reads in census.steps if logs)  # the census sees the logging steps' read
    (metrics,) = list(Path(trainer.log_dir).rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    for name in ("neg_kept", "neg_grad_share_kept", "neg_sim_kept"):
        steps = [float(r[f"mining/{name}_step"]) for r in rows if r.get(f"mining/{name}_step")]
        (epoch,) = [float(r[f"mining/{name}_epoch"]) for r in rows if r.get(f"mining/{name}_epoch")]
        assert len(steps) == 2 and epoch == pytest.approx(sum(steps) / 2, rel=1e-6)


def test_accumulated_diagnostics_are_the_means_of_the_step_values():
    """MiningMeter's interval and epoch means are the means over steps of 0.5 * (direction 1 + direction 2)
    of `mining_diagnostics`, counting a step only where both directions define the diagnostic."""
    torch.manual_seed(0)
    meter, bank_labels = MiningMeter(), torch.arange(64) % 5
    expected: list[dict[str, float]] = []  # plain floats: pytest.approx compares numbers, not tensors
    for step in range(3):
        directions = []
        for _ in range(2):
            q, k, bank = (F.normalize(torch.randn(n, 16), dim=1) for n in (6, 6, 64))
            ctx = MiningContext(q, k, bank, q @ bank.T, torch.arange(64), torch.arange(6), 0.2)
            pos = (
                NeighbourPositives(topk=3, lam=0.5, soft=True, hard_rule="above_mean")(ctx) if step else NoPositives()(ctx)
            )  # step 0: purity undefined
            neg = GradientBandNegatives(start=0.1, end=0.5)(ctx)
            query_labels = torch.arange(6) % 5 if step < 2 else torch.full((6,), -1)  # step 2: unlabelled queries
            directions.append((ctx, pos, neg, query_labels))
        stats = [mining_diagnostics(ctx, pos, neg, y, bank_labels) for ctx, pos, neg, y in directions]
        expected.append({n: 0.5 * (stats[0][n] + stats[1][n]).item() for n in stats[0].keys() & stats[1].keys()})
        meter.update(*(diagnostic_sums(ctx, pos, neg, y, bank_labels) for ctx, pos, neg, y in directions))
        if step == 1:
            interval = meter.read("interval")
            means = {n: sum(v := [e[n] for e in expected if n in e]) / len(v) for n in set().union(*expected)}
            assert interval == pytest.approx(means, rel=1e-5)
    epoch = meter.read("epoch")
    means = {n: sum(v := [e[n] for e in expected if n in e]) / len(v) for n in set().union(*expected)}
    assert "pos_purity" in epoch and sum("pos_purity" in e for e in expected) == 1  # defined in step 1 only
    assert epoch == pytest.approx(means, rel=1e-5)
    assert meter.read("interval") == pytest.approx({n: v for n, v in expected[2].items()}, rel=1e-5)  # since the last read
    assert meter.read("epoch") == {}  # read starts the accumulator again


def test_the_nonfinite_guard_reads_the_device_once_a_step(cfg_factory):
    """The loss and every gradient are checked with one device->host read, before the optimizer step."""
    _, model, trainer = build(cfg_factory(SMALL))
    guard = NonFiniteGuard()
    q, k = (F.normalize(torch.randn(8, 128), dim=1) for _ in range(2))
    model.bank.enqueue(F.normalize(torch.randn(64, 128), dim=1), torch.arange(64) + 1000, torch.arange(64) % 10)
    z = model.projector(model.backbone(torch.randn(8, 3, 32, 32)))  # 8 x 128, through every encoder parameter
    loss, *_ = model.contrast(F.normalize(z, dim=1), k, torch.arange(8))
    with HostReads() as mode:
        guard.on_before_backward(trainer, model, loss)
        loss.backward()
        guard.on_before_optimizer_step(trainer, model, None)
    assert mode.reads == ["__bool__"]
    assert sum(p.grad is not None for p in model.parameters()) > 20
    model.projector[0].weight.grad[0, 0] = float("inf")  # the same check can fail: one gradient entry is enough
    guard.on_before_backward(trainer, model, loss.detach())
    with pytest.raises(NonFiniteGradientError, match=r"gradient of projector.0.weight with a finite loss"):
        guard.on_before_optimizer_step(trainer, model, None)


def fit_with_probe(cfg_factory, overrides: list[str], probe: bool = True):
    """A tiny fit; records the first convolution's input and output during training steps."""
    datamodule, model, trainer = build(cfg_factory([*SMALL, "seed=0", *overrides]))
    seen: dict[str, torch.Tensor] = {}

    def record(module, inputs, output):
        if module.training:
            seen["input"], seen["output"] = inputs[0], output

    if probe:
        model.backbone.conv1.register_forward_hook(record)
    trainer.fit(model, datamodule)
    loss = float(trainer.callback_metrics["train/loss"])
    assert trainer.global_step == 2 and torch.isfinite(torch.tensor(loss))
    return model, seen


def test_channels_last_trains_with_channels_last_inputs_and_weights(cfg_factory):
    model, seen = fit_with_probe(cfg_factory, ["model.channels_last=true"])
    assert seen["input"].is_contiguous(memory_format=torch.channels_last)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert seen["input"].shape[1] == 3 and not seen["input"].is_contiguous()  # really NHWC, not a 1-channel coincidence


def test_bf16_mixed_precision_trains_on_cpu(cfg_factory):
    model, seen = fit_with_probe(cfg_factory, ["trainer.precision=bf16-mixed"])
    assert seen["output"].dtype == torch.bfloat16  # the convolutions ran in bf16 ...
    assert model.backbone.conv1.weight.dtype == torch.float32  # ... on float32 master weights


class StepLosses(L.Callback):
    """The loss each training step returned (kept on the device, compared after the fit)."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())


def step_losses(cfg_factory, experiment: str, overrides: list[str]) -> tuple[torch.Tensor, MCLModule]:
    """The losses of a seeded three-step fit, width-8 ResNet on 16 x 16 digits. The bank (8 = one step's
    keys, one an image) is full after step 1, so the paper's mining runs in steps 2 and 3, after weights, EMA and
    bank have moved."""
    tiny = ["dataset.image_size=16", "backbone.width=8", "model.queue_size=8", "trainer.limit_train_batches=3"]
    datamodule, model, trainer = build(cfg_factory([*SMALL, f"experiment={experiment}", "seed=0", *tiny, *overrides]))
    record = StepLosses()
    trainer.callbacks.append(record)
    trainer.fit(model, datamodule)
    return torch.stack(record.losses), model


EXPERIMENTS = ("moco_v2", "paper_cifar10")  # MoCo v2 and the paper's pair (soft_hard + gradient)


def test_the_speed_options_change_no_result(cfg_factory):
    """Reading the diagnostics every 50 steps instead of every step gives bit-identical losses; channels_last
    the same losses within float tolerance: 1e-5 in step 1 (same weights), 1e-3 later (batch norm over 8
    images of a width-8 network amplifies the convolutions' reordered sums). The mining did change the
    paper's loss, by far more than that (the comparison can fail)."""
    base = {}
    for experiment in EXPERIMENTS:
        base[experiment], _ = step_losses(cfg_factory, experiment, ["trainer.log_every_n_steps=1"])
        assert torch.equal(step_losses(cfg_factory, experiment, ["trainer.log_every_n_steps=50"])[0], base[experiment])
        channels_last, _ = step_losses(cfg_factory, experiment, ["model.channels_last=true"])
        torch.testing.assert_close(channels_last[0], base[experiment][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(channels_last, base[experiment], rtol=1e-3, atol=1e-3)
    assert (base["paper_cifar10"][1:] - base["moco_v2"][1:]).abs().min() > 0.1


@pytest.mark.slow
def test_the_compiled_step_gives_the_eager_loss_and_keeps_parameter_names(cfg_factory):
    """model.compile=true (inductor, C++ codegen on the CPU: minutes on two cores) for MoCo v2 and the paper's
    pair: the same losses as eager within the tolerances of test_the_speed_options_change_no_result
    (compiled kernels reorder sums); parameter names and checkpoints stay those of the eager module."""
    torch._dynamo.reset()
    for experiment in EXPERIMENTS:
        eager, _ = step_losses(cfg_factory, experiment, [])
        compiled, model = step_losses(cfg_factory, experiment, ["model.compile=true"])
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert model.backbone._compiled_call_impl is not None and model.key_backbone._compiled_call_impl is not None
    names = set(model.state_dict())
    assert "backbone.conv1.weight" in names and not any("_orig_mod" in n for n in names)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_on_a_cpu(tmp_path, npz_file):
    """`benchmarks/gpu.py --device cpu --tiny`: the speed table (a row for every preset of conf/experiment/ but
    the CPU demo, each with its ratio to moco_v2, the ceiling, lightly measured or reported missing, syncs n/a
    on a CPU) and the quality table (two presets x two seeds at once, with the paper's mining diagnostics),
    from one command."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--tiny", "--npz", str(npz_file), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = {row[0]: row for row in json.loads((out / "speed.json").read_text())["rows"]}
    presets = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml") if p.stem != "demo")
    assert {f"mcl experiment={p}" for p in presets} <= set(rows), sorted(rows)
    for name in [f"mcl experiment={p}" for p in presets] + ["backbone forward+backward+SGD (ceiling)"]:
        assert isinstance(rows[name][1], float) and rows[name][1] > 0, rows[name]
    assert rows["mcl experiment=moco_v2"][2] == 1.0 and all(isinstance(rows[f"mcl experiment={p}"][2], float) for p in presets)
    assert all(rows[f"mcl experiment={p}"][4] == "n/a (CPU)" for p in presets)
    assert isinstance(rows["lightly MoCo v2"][1], float) or rows["lightly MoCo v2"][1] == "lightly not installed"
    assert "200 epochs" in done.stdout and "paper / MoCo v2 wall time" in done.stdout
    results = json.loads((out / "quality.json").read_text())
    assert sorted((r["variant"], r["seed"]) for r in results) == [("moco_v2", 1339), ("moco_v2", 1340), ("paper", 1339), ("paper", 1340)]
    assert all(0 <= r["knn_top1"] <= 1 for r in results)
    assert all("pos_purity" in r for r in results if r["variant"] == "paper")  # the bank filled and the paper's method mined
    assert "kNN top-1 (mean ± std)" in done.stdout
