"""Two-view images/s of the batched augmentation path / the per-image torchvision path, same recipe.

    python benchmarks/data.py --device cpu --threads 1        # this CPU, one core each
    python benchmarks/data.py                                 # GPU if there is one (batched on the GPU)

Both paths come from the real data module (conf/train.yaml's recipe: MoCo v2 strong views for both
branches) on the CIFAR-10 dev subset (../shared/data/cifar10_dev.npz; random CIFAR-sized images if
it is missing). Per-image: the training DataLoader (`--workers` processes), each image through
torchvision.transforms.v2 twice. Batched: the training DataLoader's uint8 batches, moved to the
device, then both views made for the whole batch, as `on_after_batch_transfer` does in training.
The two take turns, `--batches` batches each per round.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import common as bench
import numpy as np


def npz_or_random(path: Path) -> tuple[Path, str]:
    """The dev subset, or a stand-in of the same shape (pixels do not change the speed)."""
    if path.is_file():
        return path, str(path.name)
    rng = np.random.default_rng(0)
    out = Path(tempfile.mkdtemp()) / "random_cifar.npz"
    x = rng.integers(0, 256, (10000, 32, 32, 3), dtype=np.uint8)
    np.savez(out, x_train=x, y_train=rng.integers(0, 10, 10000), x_test=x[:2000], y_test=rng.integers(0, 10, 2000))
    return out, f"random uint8 10000 x 32 x 32 x 3 ({path} not found)"


def endless(loader) -> Iterator:
    """Batches of `loader`, epoch after epoch (a run may ask for more batches than one epoch holds)."""
    while True:
        yield from loader


def datamodule(npz: Path, batch: int, workers: int, batched: bool, on_device: bool):
    from mcl.data.datamodule import ContrastiveDataModule
    from mcl.train import plain

    overrides = ["dataset=npz", f"dataset.path={npz}", f"data.batch_size={batch}", f"data.num_workers={workers}", "seed=0"]
    overrides += [f"data.batched_augment={batched}", f"data.images_on_device={on_device and batched}"]
    cfg = bench.config(overrides)
    dm = ContrastiveDataModule(dataset=plain(cfg.dataset), **plain(cfg.data))
    dm.setup("fit")
    return dm, cfg


def main() -> None:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--npz", type=Path, default=bench.CIFAR_DEV)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=4, help="batches per path and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes of the per-image path")
    args = p.parse_args()
    device = bench.setup(args)
    npz, source = npz_or_random(args.npz)
    per_image, cfg = datamodule(npz, args.batch, args.workers, batched=False, on_device=False)
    fast, _ = datamodule(npz, args.batch, 0, batched=True, on_device=device.type == "cuda")
    per_image_iter, fast_iter = endless(per_image.train_dataloader()), endless(fast.train_dataloader())
    fast.trainer = SimpleNamespace(training=True)  # what on_after_batch_transfer asks of the trainer

    def per_image_batch() -> None:
        [t.to(device, non_blocking=True) for t in next(per_image_iter)]

    def batched_batch() -> None:
        fast.on_after_batch_transfer([t.to(device, non_blocking=True) for t in next(fast_iter)], 0)

    seconds = {"per-image": 0.0, "batched": 0.0}
    fns = {"per-image": per_image_batch, "batched": batched_batch}
    for round_ in range(args.rounds + 1):  # round 0 warms up (worker start, first allocations)
        for key, fn in fns.items():
            bench.sync(device)
            start = time.perf_counter()
            for _ in range(args.batches):
                fn()
            bench.sync(device)
            seconds[key] += (time.perf_counter() - start) if round_ else 0.0
    images = args.rounds * args.batches * args.batch
    rate = {k: images / v for k, v in seconds.items()}
    ratio = rate["batched"] / rate["per-image"]
    settings = {
        "machine": bench.machine(device),
        "device": f"batched views on {device}; per-image views on the CPU, {args.workers} loader workers",
        "data": source,
        "recipe": f"strong views for both branches, data.augment = {dict(cfg.data.augment)}",
        "batch": args.batch,
        "timing": f"{args.rounds} rounds x {args.batches} batches per path, in turn, after one warm-up round",
        "goal": f"batched / per-image >= 3 on this CPU: {'met' if ratio >= 3 else 'not met'} ({ratio:.1f}x)",
    }
    rows = [["per-image (torchvision)", rate["per-image"], 1.0], ["batched", rate["batched"], ratio]]
    bench.report(
        "data: two-view images/s, batched / per-image", settings, ["path", "images/s (2 views each)", "x per-image"], rows, args.out, "data"
    )


if __name__ == "__main__":
    main()
