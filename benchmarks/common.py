"""What the benchmarks share: the machine, the real config, the training-step harness, timing, tables.

Every benchmark measures the things it compares side by side in one run (interleaved, so a
machine shared with other jobs slows all of them alike) and prints the machine and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python benchmarks/x.py` from a checkout that is not pip-installed
DEPS = ROOT / "build" / "bench_deps"  # optional pure-Python wheels (hydra-core, omegaconf, lightly) for a bare GPU machine
if DEPS.is_dir():
    sys.path.insert(1, str(DEPS))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

CONF_DIR = ROOT / "conf"
# the CIFAR-10 dev subset: beside the checkout, in a copied shared/, or copied into build/ for a bare machine
CIFAR_DEVS = [
    ROOT.parent / "shared" / "data" / "cifar10_dev.npz",
    ROOT / "shared" / "data" / "cifar10_dev.npz",
    ROOT / "build" / "cifar10_dev.npz",
]
CIFAR_DEV = next((p for p in CIFAR_DEVS if p.is_file()), CIFAR_DEVS[0])
MOCO = ("none", "all")  # the in-framework MoCo v2 step every ratio is taken against


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    p.add_argument("--out", type=Path, default=None, help="also write <name>.md and <name>.json here")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    return torch.device(args.device)


def machine(device: torch.device) -> str:
    """One line: CPU model and cores (and the load other jobs put on them), torch, the GPU if used."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    line = f"{cpu}, {os.cpu_count()} cores{load}, {torch.get_num_threads()} torch threads; torch {torch.__version__}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        line += f"; {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return line


def config(overrides: list[str], with_choices: bool = False):
    """conf/train.yaml composed as the CLI composes it (needs hydra-core and omegaconf)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train", overrides=[*overrides, f"paths.output_dir={tempfile.mkdtemp(prefix='mcl_bench_')}"], return_hydra_config=with_choices
        )
    return cfg


def strategies(side: str) -> list[str]:
    """The strategy files of conf/mining.<side>/, whatever exists when the benchmark runs."""
    return sorted(p.stem for p in (CONF_DIR / f"mining.{side}").glob("*.yaml"))


def paper_pair() -> tuple[str, str] | None:
    """(positive, negative) of the paper's preset, conf/experiment/paper_cifar10.yaml, if it exists."""
    if not (CONF_DIR / "experiment" / "paper_cifar10.yaml").is_file():
        return None
    choices = config(["experiment=paper_cifar10"], with_choices=True).hydra.runtime.choices
    return choices["mining.positive"], choices["mining.negative"]


def variants() -> list[tuple[str, str]]:
    """MoCo v2 first, each strategy of each side against the other side's MoCo choice, then the paper's pair."""
    found = [MOCO] + [(p, MOCO[1]) for p in strategies("positive") if p != MOCO[0]]
    found += [(MOCO[0], n) for n in strategies("negative") if n != MOCO[1]]
    paper = paper_pair()
    return found + ([paper] if paper and paper not in found else [])


def name(pair: tuple[str, str]) -> str:
    return "MoCo v2 (none+all)" if pair == MOCO else f"{pair[0]}+{pair[1]}"


def build_module(overrides: list[str], num_classes: int = 10):
    """MCLModule exactly as `mcl.train.build` makes it, from the composed config (no data needed)."""
    from mcl.train import build_module as module_of

    cfg = config(overrides)
    return module_of(cfg, num_classes), cfg


class FixedBatches(L.LightningDataModule):
    """The same ready-made batch `steps` times: the step alone, no data path."""

    def __init__(self, batch: tuple[torch.Tensor, ...], steps: int):
        super().__init__()
        self.batch, self.steps, self.batch_size = batch, steps, batch[0].shape[0]

    def train_dataloader(self):
        return Repeat(self.batch, self.steps)


class Repeat:
    """An iterable of one batch, n times (a list would read as n data loaders to Lightning)."""

    def __init__(self, batch: tuple[torch.Tensor, ...], n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)


class StepTimer(L.Callback):
    """Seconds of each training step (on_train_batch_start -> end: forward, mining, loss, backward,
    enqueue, optimizer) and of each loop iteration (end -> end: also fetching, moving and augmenting the batch)."""

    def __init__(self, device: torch.device):
        self.device, self.step, self.loop = device, [], []
        self._start = self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.step.append(now - self._start)
        if self._last_end is not None:
            self.loop.append(now - self._last_end)
        self._last_end = now


def trainer(device: torch.device, precision: str, callbacks: list, **kwargs) -> L.Trainer:
    """A Lightning Trainer that trains only: no validation, logging, checkpoints or progress bar."""
    return L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def fill_bank(module) -> None:
    """A bank full of real-looking keys: every mining strategy is past its warm-up and does its full work."""
    bank, n = module.bank, module.bank.size
    device = bank.keys.device
    keys = F.normalize(torch.randn(n, bank.keys.shape[1], device=device), dim=1)  # K x D
    bank.enqueue(
        keys, torch.arange(n, device=device) + 10**6, torch.randint(0, 10, (n,), device=device)
    )  # indices: never an image of the batch


def step_seconds(module, batch: tuple[torch.Tensor, ...], device: torch.device, precision: str, steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` training steps of `module` on `batch`, after `warmup` steps, as Lightning runs them."""
    timer = StepTimer(device)
    trainer(device, precision, [timer], max_steps=warmup + steps).fit(module, FixedBatches(batch, warmup + steps))
    return timer.step[warmup:]


def warm_up(module, batch: tuple[torch.Tensor, ...], device: torch.device, precision: str) -> None:
    """One small untimed step of an MCLModule, so the process's one-time costs fall on no timed step."""
    step_seconds(module, tuple(t[:8] for t in batch), device, precision, 1, 0)
    module.bank.ptr.zero_()  # 8 keys went in; back on a multiple of the keys per step


def random_views(batch_size: int, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A training batch of the per-image path's shape: (view_q, view_k, index, label)."""
    x1, x2 = (torch.randn(batch_size, 3, size, size, device=device) for _ in range(2))
    return x1, x2, torch.arange(batch_size, device=device), torch.randint(0, 10, (batch_size,), device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn each round (warm-up rounds discarded)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + rounds):
        for key, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def report(title: str, settings: dict[str, Any], headers: list[str], rows: list[list[Any]], out: Path | None, stem: str) -> str:
    """Print (and with --out, write) the table under its title, machine and settings."""
    text = f"## {title}\n\n" + "\n".join(f"- {k}: {v}" for k, v in settings.items()) + "\n\n" + table(headers, rows) + "\n"
    print(text, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(text)
        (out / f"{stem}.json").write_text(json.dumps({"settings": settings, "headers": headers, "rows": rows}, indent=1, default=str))
    return text
