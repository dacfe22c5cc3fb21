"""The GPU figures in one command (at most 8 minutes on one H200): speed end to end, then quality.

    python benchmarks/gpu.py [--npz PATH] [--out DIR]              # GPU
    python benchmarks/gpu.py --device cpu --tiny --out DIR          # the script itself, on a CPU (a few minutes)

(a) Speed of every experiment preset (conf/experiment/*.yaml, listed when the script runs, so a new
preset joins the table; `demo` is the CPU demo on digits, not a protocol preset, and is left out),
in the lab protocol (ResNet-18 width 64, batch 256, bank 4096) on CIFAR-10-sized data (the dev
subset's 10,000 training images repeated to 50,000): one `Trainer.fit` epoch of 50,000 images per
preset with trainer=gpu's settings as a user gets them (bf16-mixed; the "auto" speed options:
channels_last, views made on the GPU from the training set kept there; the table lists what they
resolved to); CSV logging every 20 steps; callbacks=default; no progress bar. Per preset: training
images/s over the epoch after its first `--warmup-steps` steps (cudnn's search), the ratio to
moco_v2 in the same run, the share of the ceiling, the device synchronisations per step that
`torch.cuda.set_sync_debug_mode("warn")` reports (steps that log apart from the others; n/a on a
CPU) and the projected 200-epoch wall time with the kNN/linear monitors every 5 epochs (the
monitors are timed once, after moco_v2's epoch: they encode the same images for every preset).
The presets run one after the other in one process, each within an equal share of
`--speed-minutes` (a preset that runs out of time is timed over the steps it made, and says so).
Beside them: the backbone's forward+backward+SGD on the same 2 x 256 views (the ceiling) and
lightly's MoCo v2 step with lightly's own per-image transforms (MoCoV2Transform, a DataLoader of up
to 16 workers), when lightly is installed (`pip install -e ".[bench]"`; else the table says so).

(b) Quality: moco_v2 and paper_cifar10 on the dev npz, full-width ResNet-18, 2 seeds each, the four
jobs at once on the one GPU, as many epochs as fit in --quality-minutes (from the speed measured in
(a)); kNN top-1 (k=200) mean ± std over the seeds and the last logged `mining/*` diagnostics.

Where hydra-core, omegaconf or lightly are missing, pure-Python copies in build/bench_deps are used
(`pip install --no-deps --target build/bench_deps hydra-core omegaconf antlr4-python3-runtime==4.9.3 lightly`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import common as bench
import lightning as L
import numpy as np
import torch
from mining_quality import final_diagnostics
from mining_quality import table as quality_table
from omegaconf import OmegaConf

HERE = Path(__file__).resolve().parent
EXPERIMENTS = {"moco_v2": "moco_v2", "paper": "paper_cifar10"}  # quality-table name -> preset
NOT_TIMED = {"demo": "the CPU demo (digits, trainer=cpu), not a protocol preset"}
GOALS = {"images/s": 11_500, "paper / MoCo v2": 1.05, "ours / lightly": 0.5}


class EpochClock(L.Callback):
    """Seconds of each training epoch without the monitors, and of each validation (the monitors)."""

    def __init__(self, device: torch.device):
        self.device, self.train, self.val = device, [], []

    def _now(self) -> float:
        bench.sync(self.device)
        return time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._val_in_epoch = self._now(), 0.0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = self._now()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val.append(self._now() - self._val_start)
        self._val_in_epoch += self.val[-1]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.train.append(self._now() - self._start - self._val_in_epoch)


def sized_npz(npz: Path, out: Path, images: int | None = None) -> Path:
    """The npz with both splits in a fixed random order (the dev subset is sorted by class: a cut
    kNN memory or query set, as under --tiny, still holds every class), the training images
    repeated (or cut) to `images` (None: as many as there are)."""
    data, rng = dict(np.load(npz)), np.random.default_rng(0)
    for split in ("train", "test"):
        n = len(data[f"y_{split}"])
        order = np.resize(rng.permutation(n), images if split == "train" and images else n)
        data[f"x_{split}"], data[f"y_{split}"] = data[f"x_{split}"][order], data[f"y_{split}"][order]
    np.savez(out, **data)
    return out


SPEED_KEYS = ("data.batched_augment", "data.images_on_device", "data.num_workers", "model.channels_last")


def speed_overrides(gpu: bool) -> list[str]:
    """On a GPU, trainer=gpu's own settings (the data path, images on the device, channels_last: auto); on a
    CPU the same batched path and channels_last, set explicitly (auto would pick the per-image path there)."""
    return [] if gpu else ["data.batched_augment=true", "data.num_workers=0", "model.channels_last=true"]


def speed_presets() -> list[str]:
    """Every preset of conf/experiment/ but the NOT_TIMED ones, moco_v2 first (the ratios' reference)."""
    names = sorted(p.stem for p in (bench.CONF_DIR / "experiment").glob("*.yaml") if p.stem not in NOT_TIMED)
    return sorted(names, key=lambda n: n != "moco_v2")


class StepCounter(L.Callback):
    """Per training step: whether it logs, and the synchronisations torch.cuda.set_sync_debug_mode("warn")
    reports in it (CUDA only); the clock starts at the start of step `warmup` and stops at the epoch's end."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.syncs: list[tuple[bool, int]] = []  # (logs, synchronisations) per counted step
        self.start = self.seconds = None
        self.steps = 0
        self._caught = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            bench.sync(self.device)
            self.start = time.perf_counter()
        self._logs = trainer._logger_connector.should_update_logs
        if self.device.type == "cuda" and batch_idx >= self.warmup:
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.steps += 1
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self.syncs.append((self._logs, sum("synchroniz" in str(w.message) for w in self._records)))
            self._caught = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.start is not None and self.seconds is None:
            bench.sync(self.device)
            self.seconds = time.perf_counter() - self.start

    on_train_end = on_train_epoch_end  # stopped by max_time before the epoch's end


def one_preset(args, device: torch.device, preset: str, seconds: float, monitors: bool) -> dict:
    """One training epoch of a preset through Trainer.fit, the CLI's code path (the monitors after it if asked)."""
    from mcl.train import build

    gpu = device.type == "cuda"
    overrides = [
        f"experiment={preset}",
        "dataset=npz",
        f"dataset.path={args.npz}",
        f"trainer={'gpu' if gpu else 'cpu'}",
        f"backbone.width={args.width}",
        f"data.batch_size={args.batch}",
        f"model.queue_size={args.bank}",
        *speed_overrides(gpu),
        f"model.compile={args.compile}",
        "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1",
        f"+trainer.max_time=00:00:{int(seconds) // 60:02d}:{int(seconds) % 60:02d}",  # DD:HH:MM:SS
        "logger=csv",
        "callbacks=default",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        f"paths.output_dir={Path(args.run_dir) / preset}",
        *args.extra,
        *([] if monitors else ["trainer.limit_val_batches=0"]),
    ]
    cfg = bench.config(overrides)
    datamodule, model, trainer = build(cfg)  # resolves the "auto" speed settings into cfg
    counter, clock = StepCounter(device, args.warmup_steps), EpochClock(device)
    trainer.callbacks.extend([counter, clock])
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    quiet, logging = ([n for logs, n in counter.syncs if logs == want] for want in (False, True))
    return {
        "preset": preset,
        "images": counter.steps * args.batch,
        "seconds": counter.seconds,
        "complete": counter.steps + args.warmup_steps >= trainer.num_training_batches,
        "epoch_images": trainer.num_training_batches * args.batch,
        "monitors": clock.val[0] if clock.val else None,
        "syncs": statistics.mean(quiet) if quiet else None,
        "syncs_logging": statistics.mean(logging) if logging else None,
        "fit": time.perf_counter() - start,
        "settings": ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in ("trainer.precision", *SPEED_KEYS)),
    }


def presets(args, device: torch.device) -> list[dict]:
    """Every preset of --presets in turn, in this one process, each within its share of --speed-minutes."""
    names, results = args.presets.split(","), []
    deadline = time.perf_counter() + 60 * args.speed_minutes
    for i, preset in enumerate(names):
        share = (deadline - time.perf_counter()) / (len(names) - i)
        if share < 5:
            results.append({"preset": preset, "status": "not run: the speed budget (--speed-minutes) was spent"})
            continue
        try:
            results.append(one_preset(args, device, preset, share - 3, monitors=i == 0))  # 3 s: building it
        except Exception as err:  # one preset's failure is its row, not the table's end
            results.append({"preset": preset, "status": f"failed: {type(err).__name__}: {' '.join(str(err).split())[:160]}"})
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return results


def lightly_moco(args, device: torch.device) -> dict:
    """lightly's MoCo v2 (peers.LightlyMoCo, our backbone and head) fed by lightly's per-image transforms."""
    from lightly.transforms import MoCoV2Transform
    from peers import LightlyMoCo
    from torchvision.transforms.v2.functional import to_pil_image

    cfg = bench.config(["experiment=moco_v2"])
    proj = {k: cfg.model[k] for k in ("proj_hidden", "proj_out", "proj_layers", "proj_last_bn", "proj_bn")}
    images = torch.from_numpy(np.load(args.npz)["x_train"]).permute(0, 3, 1, 2)  # N x 3 x 32 x 32 uint8
    transform = MoCoV2Transform(input_size=32, gaussian_blur=0.5)  # the lab's recipe: PIL's blur, p = 0.5, sigma in [0.1, 2]

    class Views(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            return transform(to_pil_image(images[i]))  # [view 1, view 2]

    workers = min(16, os.cpu_count() or 1) if device.type == "cuda" else 0
    loader = torch.utils.data.DataLoader(
        Views(),
        args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    module = LightlyMoCo(args.width, args.bank, cfg.model.temperature, cfg.model.momentum, cfg.optim.lr, proj, channels_last=True)
    clock = EpochClock(device)
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    start = time.perf_counter()
    bench.trainer(device, precision, [clock], max_epochs=2, benchmark=device.type == "cuda").fit(module, loader)  # warm-up + 1
    return {"train": clock.train, "val": [], "fit": time.perf_counter() - start, "images": len(loader) * args.batch}


def ceiling(args, device: torch.device) -> dict:
    """Seconds of the backbone's forward+backward+SGD on 2 x batch views: no step can beat it."""
    from mcl.models import WidthResNet

    net = WidthResNet("resnet18", args.width, cifar_stem=True).to(device, memory_format=torch.channels_last)
    x = torch.randn(2 * args.batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = net(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"step": bench.interleaved({"ceiling": forward_backward}, args.steps, 2, device)["ceiling"]}


CHILDREN = {"presets": presets, "lightly": lightly_moco, "ceiling": ceiling}


def child(what: str, args, limit: float, extra: list[str] = ()) -> tuple[dict | None, str]:
    """Run one measurement in its own process; (result, status)."""
    cmd = [sys.executable, __file__, "--child", what, "--device", args.device, "--npz", str(args.speed_npz), *extra]
    cmd += ["--width", str(args.width), "--batch", str(args.batch), "--bank", str(args.bank)]
    cmd += ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)] + (["--compile"] if args.compile else [])
    cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--tiny"] if args.tiny else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {limit:.0f} s"
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
        return None, f"failed (exit {done.returncode}): {tail[0][:200]}"
    return json.loads(done.stdout.strip().splitlines()[-1]), "ok"


def hours(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d} h"


def speed(args) -> tuple[str, dict[str, float]]:
    """Part (a): the speed table; returns each preset's training images/s (for part b)."""
    names = speed_presets()
    extra = ["--presets", ",".join(names), "--speed-minutes", str(args.speed_minutes), "--run-dir", str(args.out / "speed")]
    runs, status = child("presets", args, 60 * args.speed_minutes + 120, extra)  # the presets' budget, plus start-up
    runs = runs or [{"preset": n, "status": status} for n in names]
    lightly, status_lightly = child("lightly", args, args.part_limit) if args.lightly else (None, "lightly not installed")
    top, status_ceiling = child("ceiling", args, args.part_limit)
    top_rate = args.batch / top["step"] if top else None
    monitors = next((r["monitors"] for r in runs if r.get("monitors")), None)  # moco_v2's, the same work for every preset
    gpu = args.device.startswith("cuda")
    rows, rates = [], {}
    for run in runs:
        label = f"mcl experiment={run['preset']}"
        if not run.get("seconds") or not run.get("images"):
            rows.append([label, run.get("status", "no step timed"), "-", "-", "-", "-"])
            continue
        rates[run["preset"]] = rate = run["images"] / run["seconds"]
        epoch = run["epoch_images"] / rate + (monitors or 0.0) / args.val_every
        syncs = "n/a (CPU)" if not gpu else "-" if run["syncs"] is None else f"{run['syncs']:.1f}"
        if gpu and run["syncs_logging"] is not None:
            syncs += f" (logging steps {run['syncs_logging']:.1f})"
        note = "" if run["complete"] else " (partial epoch: its time share ran out)"
        rows.append([label + note, rate, "-", "-" if top_rate is None else rate / top_rate, syncs, hours(200 * epoch)])
    reference = rates.get("moco_v2")
    for row in rows:
        preset = row[0].split("=", 1)[1].split(" ")[0]
        if preset in rates and reference:
            row[2] = rates[preset] / reference
    if lightly is not None and lightly["train"]:
        rate = lightly["images"] / statistics.median(lightly["train"][1:] or lightly["train"])
        rows.append(
            ["lightly MoCo v2", rate, rate / reference if reference else "-", "-" if top_rate is None else rate / top_rate, "-", "-"]
        )
    else:
        rows.append(["lightly MoCo v2", status_lightly, "-", "-", "-", "-"])
    rows.append(["backbone forward+backward+SGD (ceiling)", top_rate or status_ceiling, "-", 1.0 if top_rate else "-", "-", "-"])
    ratios = []
    if reference and "paper_cifar10" in rates:
        ratios.append(f"paper / MoCo v2 wall time {reference / rates['paper_cifar10']:.3f} (goal <= {GOALS['paper / MoCo v2']})")
    if reference and lightly is not None and lightly["train"]:
        ratios.append(f"ours / lightly's MoCo wall time {rows[-2][1] / reference:.3f} (goal <= {GOALS['ours / lightly']})")
    if reference:
        met = "met" if reference >= GOALS["images/s"] else "not met"
        ratios.append(f"MoCo v2 images/s {reference:.0f} (goal >= {GOALS['images/s']:,}: {met})")
    device = torch.device(args.device)
    settings = {
        "machine": bench.machine(device),
        "data": f"{args.speed_images} training images ({args.source}), 32 x 32",
        "model": f"ResNet-18 width {args.width}, batch {args.batch}, bank {args.bank}, compile={args.compile}",
        "settings": f"trainer={'gpu' if gpu else 'cpu'}, csv logging every 20 steps, callbacks=default; "
        + next((r["settings"] for r in runs if "settings" in r), "-"),
        "timing": f"one epoch per preset, timed after its first {args.warmup_steps} steps, each preset within "
        f"{args.speed_minutes} min / {len(names)}; lightly: 2 epochs, the second timed; 200 epochs: with the monitors "
        f"({'-' if monitors is None else f'{monitors:.1f} s'}, after moco_v2's epoch) every {args.val_every} epochs",
        "not timed": ", ".join(f"{k} ({v})" for k, v in NOT_TIMED.items()),
        "status": f"presets: {status}, lightly: {status_lightly}, ceiling: {status_ceiling}",
        "ratios": "; ".join(ratios) or "-",
    }
    headers = ["run", "train images/s", "/ moco_v2", "/ ceiling", "syncs / step", "200 epochs"]
    return bench.report("speed: one epoch end to end, every preset", settings, headers, rows, args.out, "speed"), rates


def quality(args, rates: dict[str, float]) -> str:
    """Part (b): the four jobs at once on the device; the kNN and diagnostics table."""
    images = len(np.load(args.npz)["y_train"])
    jobs = len(EXPERIMENTS) * len(args.seeds)
    if args.quality_epochs:
        epochs = args.quality_epochs
    else:  # the jobs share the device: each runs at about 1/jobs of the slowest preset's rate, plus monitors and start-up
        rate = min([rates[preset] for preset in EXPERIMENTS.values() if preset in rates] or [1000.0])
        epochs = max(1, int((60 * args.quality_minutes - 40) / (1.3 * jobs * images / rate)))
    gpu = args.device.startswith("cuda")
    procs = {}
    for name, preset in EXPERIMENTS.items():
        for seed in args.seeds:
            out = args.out / "quality" / name / str(seed)
            overrides = [f"experiment={preset}", "dataset=npz", f"dataset.path={args.npz}", f"trainer={'gpu' if gpu else 'cpu'}"]
            overrides += [f"backbone.width={args.width}", f"data.batch_size={args.batch}", f"model.queue_size={args.bank}"]
            overrides += speed_overrides(gpu)
            overrides += [f"trainer.max_epochs={epochs}", f"trainer.check_val_every_n_epoch={args.val_every}", f"seed={seed}"]
            overrides += [
                "logger=csv",
                "callbacks=none",
                "+trainer.enable_progress_bar=false",
                f"paths.output_dir={out}",
                f"hydra.run.dir={out}",
            ]
            stop = int(60 * args.quality_minutes + 30)  # seconds: a job stops itself there, then runs its monitors
            overrides += [f"+trainer.max_time=00:00:{stop // 60:02d}:{stop % 60:02d}", *args.quality_extra]
            log = (args.out / "quality" / f"{name}_{seed}.log").open("w")
            procs[name, seed] = (
                subprocess.Popen([sys.executable, "-m", "mcl.train", *overrides], stdout=log, stderr=log, cwd=bench.ROOT),
                out,
            )
    start, results, failed = time.perf_counter(), [], []
    deadline = start + 60 * args.quality_minutes + 150  # the jobs stop themselves 30 s after the budget (trainer.max_time)
    for (name, seed), (proc, out) in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
        knn = last_value(out, "val/knn_top1")
        if proc.returncode or knn is None:
            failed.append(f"{name} seed {seed} (exit {proc.returncode}, log {args.out / 'quality' / f'{name}_{seed}.log'})")
            continue
        results.append({"variant": name, "seed": seed, "knn_top1": knn, **final_diagnostics(out)})
    settings = {
        "data": f"{args.npz} ({images} training images)",
        "model": f"ResNet-18 width {args.width}, batch {args.batch}, bank {args.bank}, {epochs} epochs, monitors every {args.val_every}",
        "jobs": f"{jobs} at once on one {args.device} ({time.perf_counter() - start:.0f} s wall)",
        "failed": ", ".join(failed) or "none",
    }
    text = "## quality: kNN top-1 (k=200) and the last logged mining diagnostics\n\n"
    text += "\n".join(f"- {k}: {v}" for k, v in settings.items()) + "\n\n" + quality_table(results) + "\n"
    print(text, flush=True)
    (args.out / "quality.md").write_text(text)
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    return text


def last_value(run_dir: Path, key: str) -> float | None:
    """The last logged value of `key` in a run's metrics.csv."""
    values = [row[key] for path in run_dir.rglob("metrics.csv") for row in csv.DictReader(path.open()) if row.get(key)]
    return float(values[-1]) if values else None


def main() -> None:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--npz", type=Path, default=bench.CIFAR_DEV, help="the CIFAR-10 dev subset (quality; speed repeats it)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and budgets: checks the script itself (on a CPU)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--bank", type=int, default=4096)
    p.add_argument("--warmup-steps", type=int, default=10, help="speed: steps of each preset's epoch before its clock starts")
    p.add_argument("--speed-minutes", type=float, default=3.0, help="speed: the budget of all presets together")
    p.add_argument("--val-every", type=int, default=5, help="monitors every N epochs (the protocol's 5)")
    p.add_argument("--steps", type=int, default=20, help="ceiling: timed steps")
    p.add_argument("--speed-images", type=int, default=50_000)
    p.add_argument("--part-limit", type=float, default=100, help="seconds allowed to each speed run")
    p.add_argument("--compile", action="store_true", help="model.compile=true in the speed runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[1339, 1340])
    p.add_argument("--quality-minutes", type=float, default=2.5, help="training budget of the quality jobs (they run at once)")
    p.add_argument("--quality-epochs", type=int, default=None, help="default: as many as fit in --quality-minutes")
    p.add_argument("--skip", choices=["speed", "quality"], default=None)
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--presets", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = bench.setup(args)
    args.extra, args.quality_extra = [], []
    if args.tiny:  # a width-8 network, a few hundred images, one-minute budgets
        args.width, args.batch, args.bank, args.steps = 8, 32, 128, 2  # the bank: 4 steps of 32 keys
        args.speed_images, args.quality_minutes, args.quality_epochs, args.warmup_steps = 256, 2.0, 1, 2
        args.speed_minutes = max(args.speed_minutes, 0.75 * len(speed_presets()))  # a CPU: about 45 s a preset
        args.part_limit = max(args.part_limit, 300)
        args.extra = ["data.eval_batch_size=256", "optim.warmup_epochs=0", "trainer.limit_val_batches=2"]
        args.quality_extra = [*args.extra, "trainer.limit_train_batches=6", "trainer.log_every_n_steps=2"]  # mining from step 5
    if args.child:
        result = CHILDREN[args.child](args, device)
        print(json.dumps(result))
        return
    args.out = (args.out or Path("gpu_results")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality").mkdir(exist_ok=True)
    npz, args.source = bench_npz(args.npz)
    args.npz = sized_npz(npz, args.out / "quality.npz")
    try:
        import lightly  # noqa: F401

        args.lightly = True
    except ImportError:
        args.lightly = False
    start, rates, texts = time.perf_counter(), {}, []
    if args.skip != "speed":
        with tempfile.TemporaryDirectory() as tmp:
            args.speed_npz = sized_npz(args.npz, Path(tmp) / "speed.npz", args.speed_images)
            text, rates = speed(args)
            texts.append(text)
    if args.skip != "quality":
        texts.append(quality(args, rates))
    (args.out / "gpu.md").write_text("# GPU figures\n\n" + "\n".join(texts))
    print(f"all tables: {args.out / 'gpu.md'} ({time.perf_counter() - start:.0f} s)")


def bench_npz(path: Path) -> tuple[Path, str]:
    from data import npz_or_random

    npz, source = npz_or_random(path)
    return npz.resolve(), source


if __name__ == "__main__":
    main()
