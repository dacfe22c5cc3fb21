"""Training-step time of each mining variant / the in-framework MoCo v2 step, same backbone and batch.

    python benchmarks/step.py                      # GPU if there is one: widths 16 and 64, banks 4096 and 16384
    python benchmarks/step.py --device cpu --threads 1 --widths 16 --steps 2 --warmup 1

Variants: every file of conf/mining.positive/ (negatives: all) and conf/mining.negative/ (positives:
none) as they exist when this runs, plus the paper's preset pair (conf/experiment/paper_cifar10.yaml).
Each step runs through Lightning (forward of both encoders, mining, loss, diagnostics, backward,
bank enqueue, SGD) on a fixed batch, with the bank full so every strategy does its full work;
variants take turns within each round. `loss part` times what mining changes alone: both loss
directions (similarities, mining, targets, loss, diagnostics) and their backward, without the
backbones; `from parts` is MoCo's measured step with the variant's loss part in place of MoCo's,
a steadier estimate of the ratio where other jobs make single step times noisy.
"""

from __future__ import annotations

import statistics

import common as bench
import torch
from torch.nn import functional as F

from mcl.mining.diagnostics import diagnostic_sums

GOAL = 1.05  # the paper's method / MoCo v2


def loss_part_seconds(module, batch_size: int, device: torch.device, precision: str, repeats: int) -> float:
    """Median seconds of both `contrast` directions, their diagnostics and backward, on random unit queries and keys."""
    module.to(device)
    q1, q2, k1, k2 = (F.normalize(torch.randn(batch_size, module.bank.keys.shape[1], device=device), dim=1) for _ in range(4))
    index, labels = torch.arange(batch_size, device=device), torch.randint(0, 10, (batch_size,), device=device)

    def both_directions() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
            loss12, *mined12 = module.contrast(q1.requires_grad_(True), k2, index)
            loss21, *mined21 = module.contrast(q2.requires_grad_(True), k1, index)
            for ctx, pos, neg in (mined12, mined21):
                diagnostic_sums(ctx, pos, neg, labels, module.bank.labels)  # as training: summed on the device, no read
        (0.5 * (loss12 + loss21)).backward()

    return bench.interleaved({"loss": both_directions}, repeats, 1, device)["loss"]


def main() -> None:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[16, 64], help="backbone.width; 64 is the full ResNet-18")
    p.add_argument("--banks", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", default="32-true", help="Lightning precision: 32-true, bf16-mixed, 16-mixed")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--only-paper", nargs="*", type=int, default=[], metavar="WIDTH", help="widths timed for MoCo and the paper's pair only")
    p.add_argument("--loss-repeats", type=int, default=10)
    args = p.parse_args()
    device = bench.setup(args)
    pairs, paper = bench.variants(), bench.paper_pair()
    rows = []
    for width in args.widths:
        chosen = [bench.MOCO, paper] if width in args.only_paper and paper else pairs
        for bank in args.banks:
            common = [f"backbone.width={width}", f"model.queue_size={bank}", f"data.batch_size={args.batch}", "dataset=cifar10"]
            common.append(f"model.channels_last={args.channels_last}")
            modules = {}
            for pair in chosen:
                modules[pair] = bench.build_module([*common, f"mining.positive={pair[0]}", f"mining.negative={pair[1]}"])[0]
                bench.fill_bank(modules[pair])
            batch = bench.random_views(args.batch, 32, device)
            bench.warm_up(modules[bench.MOCO], batch, device, args.precision)
            times: dict = {pair: [] for pair in chosen}
            for _ in range(args.rounds):
                for pair, module in modules.items():
                    times[pair] += bench.step_seconds(module, batch, device, args.precision, args.steps, args.warmup)
            base = statistics.median(times[bench.MOCO])
            parts = {
                pair: loss_part_seconds(module, args.batch, device, args.precision, args.loss_repeats) for pair, module in modules.items()
            }
            for pair in modules:
                step, part = statistics.median(times[pair]), parts[pair]
                from_parts = (base + part - parts[bench.MOCO]) / base  # MoCo's step with this variant's loss part instead of MoCo's
                label = bench.name(pair) + (" (paper)" if pair == paper else "")
                rows.append([width, bank, label, 1000 * step, step / base, 1000 * part, from_parts])
                print(rows[-1], flush=True)
            del modules
    settings = {
        "machine": bench.machine(device),
        "device": str(device),
        "batch": args.batch,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "timing": f"median of {args.rounds} rounds x {args.steps} steps (after {args.warmup} warm-up steps each), variants in turn",
        "input": "a fixed random batch of 32x32 views; bank pre-filled (warm-up over)",
    }
    paper_rows = [r for r in rows if r[2].endswith("(paper)")]
    if paper_rows:
        worst, worst_parts = max(r[4] for r in paper_rows), max(r[6] for r in paper_rows)
        verdict = lambda v: "met" if v <= GOAL else "not met"  # noqa: E731
        settings["goal"] = (
            f"paper's method / MoCo v2 <= {GOAL}: measured {verdict(worst)} (worst {worst:.3f}); "
            f"from the loss parts {verdict(worst_parts)} (worst {worst_parts:.3f})"
        )
    headers = ["width", "bank", "variant", "step ms", "/ MoCo v2", "loss part ms", "/ MoCo v2 from parts"]
    bench.report("step: training step of each mining variant / MoCo v2", settings, headers, rows, args.out, "step")


if __name__ == "__main__":
    main()
