"""Does the mining help? MoCo v2, the paper's method and each of its halves, same budget, 3 seeds.

    python benchmarks/mining_quality.py                       # ../shared/data/cifar10_dev.npz
    python benchmarks/mining_quality.py --epochs 2 --seeds 1339

Every variant is the `paper_cifar10` preset's protocol (the lab's MoCo v2: strong views on both
sides, tau 0.2, EMA 0.99, SplitBatchNorm and ShuffleBN, one key an image enqueued) with a width-16
ResNet-18, trained for the same fixed budget on the npz file (by default 30 steps of 64 images at
16 x 16 px, a 1024-key bank, full after 16 steps: sized for a shared 2-core CPU); only the mining
differs:

    moco_v2         mining.positive=none       mining.negative=all
    paper           mining.positive=soft_hard  mining.negative=gradient
    positive_only   mining.positive=soft_hard  mining.negative=all
    negative_only   mining.positive=none       mining.negative=gradient

Prints, per variant, the final kNN top-1 (k=200, t=0.1; memory: 4 x 512 un-augmented train
images in a fixed random order, queries: the 2000 test images) as mean ± std over the seeds and the `mining/*` diagnostics of the last logged step (means over the seeds);
writes the same as JSON next to the runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

from mcl.mining.diagnostics import NAMES
from mcl.train import CONF_DIR, train

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {
    "moco_v2": ["experiment=moco_v2"],
    "paper": ["experiment=paper_cifar10"],
    "positive_only": ["experiment=paper_cifar10", "mining.negative=all"],
    "negative_only": ["experiment=paper_cifar10", "mining.positive=none"],
}
DIAGNOSTICS = list(NAMES)  # the mining/* diagnostics, in their logging order


def shuffled_copy(path: Path, out: Path) -> Path:
    """The npz with its training images in a fixed random order (the file is sorted by class), so
    that the first eval batches, the kNN memory under --val-batches, hold every class."""
    data = dict(np.load(path))
    order = np.random.default_rng(0).permutation(len(data["y_train"]))
    data["x_train"], data["y_train"] = data["x_train"][order], data["y_train"][order]
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "shuffled.npz", **data)
    return out / "shuffled.npz"


def budget(args: argparse.Namespace) -> list[str]:
    """The fixed small budget every run gets."""
    return [
        "dataset=npz",
        f"dataset.path={args.shuffled.resolve()}",
        f"dataset.image_size={args.image_size}",
        "backbone.width=16",
        f"data.batch_size={args.batch_size}",
        "data.num_workers=0",
        "data.batched_augment=true",  # both views made with tensor ops in the training process
        f"model.queue_size={args.queue_size}",
        f"trainer.max_epochs={args.epochs}",
        f"trainer.limit_train_batches={args.steps}",
        f"trainer.limit_val_batches={args.val_batches}",
        f"trainer.check_val_every_n_epoch={args.epochs}",  # evaluate once, at the end
        "trainer.accelerator=auto",
        "optim.warmup_epochs=0",
        "logger=csv",
        "trainer.log_every_n_steps=5",
        "callbacks=none",
        "+trainer.enable_progress_bar=false",
        *args.overrides,
    ]


def final_diagnostics(output_dir: Path) -> dict[str, float]:
    """The last logged step's `mining/*_step` values in the run's metrics.csv (epoch means would
    mix in the warm-up steps, where nothing is mined)."""
    (metrics,) = list(output_dir.rglob("metrics.csv"))
    values: dict[str, float] = {}
    with metrics.open() as f:
        for row in csv.DictReader(f):
            values.update(
                {
                    k[len("mining/") : -len("_step")]: float(v)
                    for k, v in row.items()
                    if k.startswith("mining/") and k.endswith("_step") and v
                }
            )
    return values


def run(variant: str, seed: int, args: argparse.Namespace) -> dict:
    out = Path(args.out) / variant / str(seed)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*VARIANTS[variant], *budget(args), f"seed={seed}", f"paths.output_dir={out}"])
    start = time.time()
    summary = train(cfg)
    return {
        "variant": variant,
        "seed": seed,
        "knn_top1": summary["val/knn_top1"],
        "seconds": time.time() - start,
        **final_diagnostics(out),
    }


def table(results: list[dict]) -> str:
    lines = ["| variant | kNN top-1 (mean ± std) | runs | " + " | ".join(DIAGNOSTICS) + " |", "|---" * (3 + len(DIAGNOSTICS)) + "|"]
    for variant in VARIANTS:
        rows = [r for r in results if r["variant"] == variant]
        if not rows:
            continue
        knn = [100 * r["knn_top1"] for r in rows]
        std = statistics.stdev(knn) if len(knn) > 1 else 0.0
        diag = [statistics.mean(r[d] for r in rows) if all(d in r for r in rows) else None for d in DIAGNOSTICS]
        cells = ["-" if v is None else f"{v:.3f}" for v in diag]
        lines.append(f"| {variant} | {statistics.mean(knn):.2f} ± {std:.2f} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10_dev.npz"))
    parser.add_argument("--out", default="outputs/mining_quality")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1339, 1340, 1341])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="training steps per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--queue-size", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=16, help="images resized to this side (32: CIFAR's own)")
    parser.add_argument("--val-batches", type=int, default=4, help="eval batches of 512 per split: the kNN memory and the test queries")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run, e.g. trainer.limit_train_batches=10")
    parser.add_argument("--report-only", action="store_true", help="print the table of the runs already in --out")
    args = parser.parse_args()
    if args.report_only:
        results = json.loads((Path(args.out) / "results.json").read_text())
        print(table([{**r, **final_diagnostics(Path(args.out) / r["variant"] / str(r["seed"]))} for r in results]))
        return
    args.shuffled = shuffled_copy(Path(args.data), Path(args.out))

    start, results = time.time(), []
    for seed in args.seeds:  # seed-major: a cut-short benchmark still covers every variant
        for variant in args.variants:
            results.append(run(variant, seed, args))
            print(f"[{time.time() - start:7.0f}s] {variant} seed {seed}: kNN top-1 {100 * results[-1]['knn_top1']:.2f}", flush=True)
    print(
        f"\nbudget: {args.epochs} epoch(s) x {args.steps} steps x {args.batch_size} images of {args.image_size} px, bank {args.queue_size}, "
        f"width-16 ResNet-18, data {args.data}"
    )
    print(f"wall time: {time.time() - start:.0f} s for {len(results)} runs\n")
    print(table(results))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
