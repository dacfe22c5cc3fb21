"""Every GPU figure in one command (about 5 minutes on one H100): step, peers, data, epoch, and the
training images/s against the backbone's own forward+backward on the same batch (the ceiling).

    python benchmarks/gpu.py --out DIR

GPU settings: bf16-mixed, channels_last, the batched data path with the training set on the GPU.
Each part runs in its own process with a time limit; a part that fails or times out is reported as
such and the others still run. All tables are printed and written to DIR (gpu.md: all of them).

Needs torch, torchvision, lightning, torchmetrics, numpy, pillow; plus hydra-core and omegaconf (the
config) and lightly (peers). Where those three are missing, pure-Python copies in build/bench_deps
are used (`pip install --no-deps --target build/bench_deps hydra-core omegaconf
antlr4-python3-runtime==4.9.3 lightly`). The CIFAR-10 dev subset is read from ../shared/data or
build/cifar10_dev.npz; without it, random images of the same shape stand in (speed only).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common as bench
import torch
from data import npz_or_random

HERE = Path(__file__).resolve().parent


def ceiling(args, device: torch.device) -> None:
    """Training images/s on the batched GPU path / the backbone's forward+backward+SGD on the same batch."""
    import lightning as L

    from mcl.models import WidthResNet
    from mcl.train import build

    npz, source = npz_or_random(args.npz)
    rows = []
    pairs = [bench.MOCO] + ([bench.paper_pair()] if bench.paper_pair() else [])
    for pair in pairs:
        overrides = ["dataset=npz", f"dataset.path={npz}", f"backbone.width={args.width}", f"data.batch_size={args.batch}"]
        overrides += ["data.batched_augment=true", f"data.images_on_device={device.type == 'cuda'}", "data.num_workers=0"]
        overrides += [f"model.channels_last={args.channels_last}", f"model.queue_size={args.bank}", "logger=none", "callbacks=none"]
        overrides += [f"mining.positive={pair[0]}", f"mining.negative={pair[1]}", "seed=0"]
        datamodule, model, _ = build(bench.config(overrides))
        bench.fill_bank(model)
        timer = bench.StepTimer(device)
        bench.trainer(device, args.precision, [timer], max_steps=args.warmup + args.steps).fit(model, datamodule)
        loop = statistics.median(timer.loop[args.warmup :])  # fetch + move + views + step
        rows.append([f"training, {bench.name(pair)}", args.batch / loop])
    net = WidthResNet("resnet18", args.width, cifar_stem=True).to(device)
    x = torch.randn(2 * args.batch, 3, 32, 32, device=device)  # the two views of a batch
    if args.channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    fabric = L.Fabric(accelerator=device.type, devices=1, precision=args.precision)

    def forward_backward() -> None:
        with fabric.autocast():
            loss = net(x).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = bench.interleaved({"ceiling": forward_backward}, args.steps, args.warmup, device)["ceiling"]
    top = args.batch / seconds
    rows = [[what, rate, rate / top] for what, rate in rows] + [["backbone forward+backward+SGD (ceiling)", top, 1.0]]
    settings = {
        "machine": bench.machine(device),
        "data": source,
        "model": f"ResNet-18 width {args.width}, batch {args.batch} images (two views each), bank {args.bank}",
        "precision": args.precision,
        "channels_last": args.channels_last,
        "training": "Trainer.fit on the batched path (views made on the device), median loop iteration after warm-up",
        "ceiling": "the backbone alone: forward and backward of the same 2 x batch views, SGD step",
    }
    bench.report(
        "ceiling: training images/s / backbone forward+backward", settings, ["what", "images/s", "/ ceiling"], rows, args.out, "ceiling"
    )


LIMITS = {"step": 200, "peers": 80, "data": 50, "epoch": 110, "ceiling": 70}  # seconds; 510 in all
PARTS = {  # script, arguments (the GPU settings); ceiling runs in this file
    "step": [
        "step.py",
        "--precision",
        "bf16-mixed",
        "--channels-last",
        "--steps",
        "8",
        "--warmup",
        "2",
        "--rounds",
        "1",
        "--loss-repeats",
        "10",
    ],
    "peers": ["peers.py", "--precision", "bf16-mixed", "--steps", "8", "--warmup", "2", "--rounds", "2"],
    "data": ["data.py", "--workers", "8", "--batches", "10", "--rounds", "3"],
    "epoch": ["epoch.py", "--channels-last", "--workers", "8"],
    "ceiling": ["gpu.py", "--part", "ceiling"],
}


def main() -> None:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--part", choices=["ceiling"], help="run one part in this process")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiplies each part's time limit (LIMITS)")
    p.add_argument("--quick", action="store_true", help="tiny settings, to check the script itself (on a CPU too)")
    p.add_argument("--npz", type=Path, default=bench.CIFAR_DEV)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--bank", type=int, default=4096)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    device = bench.setup(args)
    if args.part == "ceiling":
        return ceiling(args, device)
    out = args.out or Path("gpu_results")
    common = ["--device", args.device, "--out", str(out)] + (["--threads", str(args.threads)] if args.threads else [])
    quick = {
        "step": ["--widths", "16", "--banks", "256", "--batch", "32", "--steps", "1", "--warmup", "1", "--loss-repeats", "1"],
        "peers": ["--widths", "16", "--banks", "256", "--batch", "32", "--steps", "1", "--warmup", "1", "--rounds", "1"],
        "data": ["--batch", "32", "--batches", "1", "--rounds", "1", "--workers", "0"],
        "epoch": ["--npz", str(args.npz), "--width", "8", "--batch", "32", "--bank", "256", "--workers", "0"],
        "ceiling": ["--npz", str(args.npz), "--width", "8", "--batch", "32", "--bank", "256", "--steps", "2", "--warmup", "1"],
    }
    status = {}
    for part in args.parts:
        script, *extra = PARTS[part]
        cmd = [sys.executable, str(HERE / script), *extra, *common]
        if part in ("epoch", "ceiling"):
            cmd += ["--npz", str(args.npz)]
        cmd += quick[part] if args.quick else []
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, timeout=LIMITS[part] * args.limit_scale)
            status[part] = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status[part] = f"timed out after {LIMITS[part] * args.limit_scale:.0f} s"
        print(f"== {part}: {status[part]} in {time.perf_counter() - start:.0f} s", flush=True)
    tables = [(out / f"{part}.md").read_text() for part in args.parts if (out / f"{part}.md").is_file()]
    summary = "\n".join(f"- {part}: {s}" for part, s in status.items())
    (out / "gpu.md").write_text(f"# GPU figures\n\n{summary}\n\n" + "\n".join(tables))
    print(f"\n# summary\n{summary}\nall tables: {out / 'gpu.md'}")


if __name__ == "__main__":
    main()
