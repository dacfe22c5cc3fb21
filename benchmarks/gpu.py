"""The GPU figures in one command (at most 8 minutes on one H200): speed end to end, then quality.

    python benchmarks/gpu.py [--npz PATH] [--out DIR]              # GPU
    python benchmarks/gpu.py --device cpu --tiny --out DIR          # the script itself, on a CPU (about a minute)

(a) Speed, in the lab protocol (experiment=moco_v2 and experiment=paper_cifar10: ResNet-18 width 64,
batch 256, bank 4096) on CIFAR-10-sized data (the dev subset's 10,000 training images repeated to
50,000): `Trainer.fit` over `--epochs` epochs with trainer=gpu's settings as a user gets them (bf16-mixed; the
"auto" speed options: channels_last, views made on the GPU from the training set kept there; the
table lists what they resolved to); CSV logging every 20 steps; callbacks=default; no progress bar), the kNN/linear monitors in the last epoch. Per run: images/s of
a training epoch (median after the first, which pays the warm-up), images/s end to end with the
monitors' time spread over the protocol's 5 epochs, the projected 200-epoch wall time. Beside them:
the backbone's forward+backward+SGD on the same 2 x 256 views (the ceiling) and lightly's MoCo v2
step with lightly's own per-image transforms (MoCoV2Transform, a DataLoader of up to 16 workers),
when lightly is installed (`pip install -e ".[bench]"`; else the table says so). Each run is its
own process, with a time limit (--part-limit).

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


def ours(args, device: torch.device) -> dict:
    """One run of an mcl preset through Trainer.fit, the CLI's code path."""
    from mcl.train import build

    gpu = device.type == "cuda"
    overrides = [
        f"experiment={args.experiment}",
        "dataset=npz",
        f"dataset.path={args.npz}",
        f"trainer={'gpu' if gpu else 'cpu'}",
        f"backbone.width={args.width}",
        f"data.batch_size={args.batch}",
        f"model.queue_size={args.bank}",
        *speed_overrides(gpu),
        f"model.compile={args.compile}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.check_val_every_n_epoch={args.epochs}",  # the monitors once, in the last epoch
        "logger=csv",
        "callbacks=default",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        f"paths.output_dir={args.run_dir}",
        *args.extra,
    ]
    cfg = bench.config(overrides)
    datamodule, model, trainer = build(cfg)  # resolves the "auto" speed settings into cfg
    clock = EpochClock(device)
    trainer.callbacks.append(clock)
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    chosen = (f"{k}={OmegaConf.select(cfg, k)}" for k in ("trainer.precision", *SPEED_KEYS))
    return {
        "train": clock.train,
        "val": clock.val,
        "fit": time.perf_counter() - start,
        "images": trainer.num_training_batches * args.batch,
        "settings": ", ".join(chosen),
    }


def lightly_moco(args, device: torch.device) -> dict:
    """lightly's MoCo v2 (peers.LightlyMoCo, our backbone and head) fed by lightly's per-image transforms."""
    from lightly.transforms import MoCoV2Transform
    from peers import LightlyMoCo
    from torchvision.transforms.v2.functional import to_pil_image

    cfg = bench.config(["experiment=moco_v2"])
    proj = {k: cfg.model[k] for k in ("proj_hidden", "proj_out", "proj_layers")}
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


CHILDREN = {"ours": ours, "lightly": lightly_moco, "ceiling": ceiling}


def child(what: str, args, limit: float, extra: list[str] = ()) -> tuple[dict | None, str]:
    """Run one measurement in its own process; (result, status)."""
    cmd = [sys.executable, __file__, "--child", what, "--device", args.device, "--npz", str(args.speed_npz), *extra]
    cmd += ["--width", str(args.width), "--batch", str(args.batch), "--bank", str(args.bank), "--epochs", str(args.epochs)]
    cmd += ["--steps", str(args.steps)] + (["--compile"] if args.compile else [])
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
    """Part (a): the speed table; returns it and each preset's training images/s (for part b)."""
    rows, rates, status = [], {}, {}
    runs = {}
    for name, preset in EXPERIMENTS.items():
        extra = ["--experiment", preset, "--run-dir", str(args.out / "speed" / name)]
        runs[name], status[name] = child("ours", args, args.part_limit, extra)
    runs["lightly"], status["lightly"] = child("lightly", args, args.part_limit) if args.lightly else (None, "lightly not installed")
    top, status["ceiling"] = child("ceiling", args, args.part_limit)
    top_rate = args.batch / top["step"] if top else None
    for name, run in runs.items():
        label = {"moco_v2": "mcl MoCo v2 (experiment=moco_v2)", "paper": "mcl paper (experiment=paper_cifar10)"}.get(
            name, "lightly MoCo v2"
        )
        if run is None or not run["train"]:
            rows.append([label, status[name], "-", "-", "-", "-", "-"])
            continue
        epoch = statistics.median(run["train"][1:] or run["train"])  # the first epoch pays cudnn's search and compilation
        monitor = statistics.median(run["val"]) if run["val"] else 0.0
        per_epoch = epoch + monitor / args.val_every
        rates[name] = run["images"] / epoch
        share = "-" if top_rate is None else rates[name] / top_rate
        monitors = monitor if run["val"] else "none"  # lightly's MoCo has no monitors
        rows.append([label, rates[name], run["images"] / per_epoch, share, epoch, monitors, hours(200 * per_epoch)])
    rows.append(["backbone forward+backward+SGD (ceiling)", top_rate or status["ceiling"], "-", 1.0 if top_rate else "-", "-", "-", "-"])
    ratios = []
    if "moco_v2" in rates and "paper" in rates:
        ratios.append(f"paper / MoCo v2 wall time {rates['moco_v2'] / rates['paper']:.3f} (goal <= {GOALS['paper / MoCo v2']})")
    if "moco_v2" in rates and "lightly" in rates:
        ratios.append(f"ours / lightly's MoCo wall time {rates['lightly'] / rates['moco_v2']:.3f} (goal <= {GOALS['ours / lightly']})")
    if "moco_v2" in rates:
        met = "met" if rates["moco_v2"] >= GOALS["images/s"] else "not met"
        ratios.append(f"MoCo v2 images/s {rates['moco_v2']:.0f} (goal >= {GOALS['images/s']:,}: {met})")
    device = torch.device(args.device)
    settings = {
        "machine": bench.machine(device),
        "data": f"{args.speed_images} training images ({args.source}), 32 x 32",
        "model": f"ResNet-18 width {args.width}, batch {args.batch}, bank {args.bank}, compile={args.compile}",
        "settings": f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}, csv logging every 20 steps, callbacks=default; "
        + next((r["settings"] for r in runs.values() if r and "settings" in r), "-"),
        "timing": f"mcl: {args.epochs} epochs per run, the monitors in the last; lightly: 2 epochs; epoch = median training "
        f"epoch after the first; with monitors and 200 epochs: the monitors every {args.val_every} epochs",
        "status": ", ".join(f"{k}: {v}" for k, v in status.items()),
        "ratios": "; ".join(ratios) or "-",
    }
    headers = ["run", "train images/s", "images/s with monitors", "/ ceiling", "epoch s", "monitors s", "200 epochs"]
    return bench.report("speed: one epoch end to end", settings, headers, rows, args.out, "speed"), rates


def quality(args, rates: dict[str, float]) -> str:
    """Part (b): the four jobs at once on the device; the kNN and diagnostics table."""
    images = len(np.load(args.npz)["y_train"])
    jobs = len(EXPERIMENTS) * len(args.seeds)
    if args.quality_epochs:
        epochs = args.quality_epochs
    else:  # the jobs share the device: each runs at about 1/jobs of the slowest preset's rate, plus monitors and start-up
        rate = min([rates[name] for name in EXPERIMENTS if name in rates] or [1000.0])
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
    p.add_argument("--epochs", type=int, default=3, help="speed: epochs per mcl run (the first is warm-up; the monitors run in the last)")
    p.add_argument("--val-every", type=int, default=5, help="monitors every N epochs (the protocol's 5)")
    p.add_argument("--steps", type=int, default=20, help="ceiling: timed steps")
    p.add_argument("--speed-images", type=int, default=50_000)
    p.add_argument("--part-limit", type=float, default=100, help="seconds allowed to each speed run")
    p.add_argument("--compile", action="store_true", help="model.compile=true in the speed runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[1339, 1340])
    p.add_argument("--quality-minutes", type=float, default=4.5, help="training budget of the quality jobs (they run at once)")
    p.add_argument("--quality-epochs", type=int, default=None, help="default: as many as fit in --quality-minutes")
    p.add_argument("--skip", choices=["speed", "quality"], default=None)
    p.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--experiment", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = bench.setup(args)
    args.extra, args.quality_extra = [], []
    if args.tiny:  # a width-8 network, a few hundred images, one-minute budgets
        args.width, args.batch, args.bank, args.epochs, args.steps = 8, 32, 128, 2, 2  # the bank: 4 steps of 32 keys
        args.speed_images, args.quality_minutes, args.quality_epochs = 256, 2.0, 1
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
