"""Wall time and peak memory of one training epoch of the CIFAR-10 dev subset, end to end, per data path.

    python benchmarks/epoch.py --device cpu --threads 1 --width 16     # this CPU
    python benchmarks/epoch.py                                         # GPU if there is one (full ResNet-18)

One epoch of ../shared/data/cifar10_dev.npz (10,000 images; random CIFAR-sized images if it is
missing) through `mcl.train.build` and `Trainer.fit`, the CLI's code path: MoCo v2 views, batch 256,
bank 4096, no validation, nothing written. Each data path runs in its own process, so each peak
(resident set; on a GPU also torch's peak allocated memory) is that path's alone. `fit` is the
time of `Trainer.fit`; `total` adds reading the data and building the model.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import common as bench
import torch
from data import npz_or_random

PATHS = {
    "per-image": ["data.batched_augment=false"],
    "batched": ["data.batched_augment=true", "data.num_workers=0"],
}


def child(args, device: torch.device) -> None:
    """One epoch of one data path; prints a JSON line."""
    from mcl.train import build

    overrides = [
        "dataset=npz",
        f"dataset.path={args.npz}",
        f"backbone.width={args.width}",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}",
        f"model.queue_size={args.bank}",
        f"model.channels_last={args.channels_last}",
        f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        f"trainer.precision={args.precision}",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        "logger=none",
        "callbacks=none",
        "+trainer.enable_checkpointing=false",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "seed=0",
        *PATHS[args.child],
    ]
    if args.child == "batched" and device.type == "cuda":
        overrides.append("data.images_on_device=true")
    start = time.perf_counter()
    datamodule, model, trainer = build(bench.config(overrides))
    fit_start = time.perf_counter()
    trainer.fit(model, datamodule)
    bench.sync(device)
    end = time.perf_counter()
    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
    print(json.dumps({"fit": end - fit_start, "total": end - start, "steps": trainer.global_step, "rss_mib": rss, "gpu_mib": peak_gpu}))


def main() -> None:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--npz", type=Path, default=bench.CIFAR_DEV)
    p.add_argument("--width", type=int, default=None, help="backbone.width (default: 64 on a GPU, 16 on a CPU)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--bank", type=int, default=4096)
    p.add_argument("--workers", type=int, default=None, help="per-image loader processes (default: 8 on a GPU machine, 0 on a CPU)")
    p.add_argument("--precision", default=None, help="default: bf16-mixed on a GPU, 32-true on a CPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--child", choices=list(PATHS), help=argparse.SUPPRESS)
    args = p.parse_args()
    device = bench.setup(args)
    gpu = device.type == "cuda"
    args.width = args.width or (64 if gpu else 16)
    args.workers = args.workers if args.workers is not None else (8 if gpu else 0)
    args.precision = args.precision or ("bf16-mixed" if gpu else "32-true")
    if args.child:
        args.npz = Path(args.npz)
        return child(args, device)
    npz, source = npz_or_random(args.npz)
    results = {}
    for path in PATHS:
        cmd = [sys.executable, __file__, "--child", path, "--npz", str(npz), "--device", args.device, "--width", str(args.width)]
        cmd += ["--batch", str(args.batch), "--bank", str(args.bank), "--workers", str(args.workers), "--precision", args.precision]
        cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--channels-last"] if args.channels_last else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{path} failed:\n{out.stderr[-3000:]}")
        results[path] = json.loads(out.stdout.strip().splitlines()[-1])
        print(path, results[path], flush=True)
    rows = []
    for path, r in results.items():
        ratio = results["per-image"]["fit"] / r["fit"]
        gpu_mib = "-" if r["gpu_mib"] is None else r["gpu_mib"]
        rows.append([path, r["steps"], r["fit"], r["total"], r["steps"] * args.batch / r["fit"], ratio, r["rss_mib"], gpu_mib])
    settings = {
        "machine": bench.machine(device),
        "device": str(device),
        "data": source,
        "model": f"ResNet-18 width {args.width}, MoCo v2 (mining none+all), batch {args.batch}, bank {args.bank}",
        "precision": args.precision,
        "channels_last": args.channels_last,
        "per-image loader workers": args.workers,
        "batched": "uint8 batches from the loader" + (", whole training set on the GPU" if gpu else ", views made on the CPU"),
    }
    headers = ["data path", "steps", "fit s", "total s", "images/s", "speed-up", "peak RSS MiB", "peak GPU MiB"]
    bench.report("epoch: one epoch of the CIFAR-10 dev subset, end to end", settings, headers, rows, args.out, "epoch")


if __name__ == "__main__":
    main()
