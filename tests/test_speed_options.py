"""Speed: the mining step is batched (no Python loop over the batch, no copy of the bank), and the
speed options users expect (channels_last, bf16 mixed precision, torch.compile) each train."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import hydra
import pytest
import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from mcl.mining.diagnostics import mining_diagnostics
from mcl.reliability import NonFiniteGradientError, NonFiniteGuard
from mcl.train import CONF_DIR, build

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
    bank.num_written.fill_(bank.size)  # warm-up over: every strategy mines
    assert bank.is_full  # read (and remembered) here, not inside the counted calls
    bank.indices.copy_(torch.arange(bank.size) % 97)
    bank.labels.copy_(torch.arange(bank.size) % 10)
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


def test_a_mining_step_reads_the_device_once_per_direction(cfg_factory):
    """Every pair of strategies: a loss direction, its diagnostics, the backward and the enqueue wait for
    the device once (the diagnostics' counts, read together): a GPU step is not held up by host reads."""
    _, model, _ = build(cfg_factory([*SMALL, "model.queue_size=1024"]))
    bank = model.bank
    bank.enqueue(F.normalize(torch.randn(1024, 128), dim=1), torch.arange(1024) % 97, torch.arange(1024) % 10)
    assert bank.is_full  # read once, before the step
    node = {(side, name): cfg_factory([*SMALL, f"mining.{side}={name}"]).mining[side] for side in SIDES for name in strategies(side)}
    for positive in strategies("positive"):
        for negative in strategies("negative"):
            model.positive = hydra.utils.instantiate(node["positive", positive])
            model.negative = hydra.utils.instantiate(node["negative", negative])
            q, k = (F.normalize(torch.randn(8, 128), dim=1) for _ in range(2))
            with HostReads() as mode:
                loss, ctx, pos, neg = model.contrast(q.requires_grad_(True), k, torch.arange(8) % 97)
                mining_diagnostics(ctx, pos, neg, torch.arange(8) % 10, bank.labels)
                loss.backward()
                bank.enqueue(k.repeat(2, 1), torch.arange(16), torch.arange(16))
            assert mode.reads == ["tolist"], f"{positive}+{negative}: {mode.reads}"
    with HostReads() as mode:  # the census can fail
        bool(bank.keys.any()), bank.keys[bank.labels > 0], int(bank.ptr)
    assert mode.reads == ["__bool__", "__getitem__", "__int__"]


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


@pytest.mark.slow
def test_compile_trains_and_keeps_parameter_names(cfg_factory):
    """torch.compile on CPU (inductor, C++ codegen): minutes on two cores, hence slow."""
    torch._dynamo.reset()
    model, _ = fit_with_probe(cfg_factory, ["model.compile=true"], probe=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert model.backbone._compiled_call_impl is not None and model.key_backbone._compiled_call_impl is not None
    names = set(model.state_dict())
    assert "backbone.conv1.weight" in names and not any("_orig_mod" in n for n in names)
