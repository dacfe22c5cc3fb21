"""Our MoCo v2 training step / lightly's MoCo step: same backbone, projector, batch, bank, temperature.

    pip install -e ".[bench]"      # lightly from PyPI
    python benchmarks/peers.py                     # GPU if there is one
    python benchmarks/peers.py --device cpu --threads 1 --widths 16 --steps 2 --warmup 1

lightly's side is its documented MoCo recipe as a LightningModule: `lightly.loss.NTXentLoss` with
its memory bank and `lightly.models.utils.update_momentum`, made symmetric like ours (both views
through both encoders, two loss directions, both keys enqueued). Both run through Lightning on the
same fixed batch, in turn. Ours also trains its online linear probe and logs its diagnostics. Ours
runs with model.bn_splits=1 model.shuffle_bn=false here, lightly's recipe has neither: both encode
the two views as one batch (the lab protocol's four separate forwards and shuffle are timed by step.py).
"""

from __future__ import annotations

import copy
import statistics

import common as bench
import lightning as L
import torch

from mcl.models import WidthResNet, mlp

GOAL = 1.0  # ours / lightly's


class LightlyMoCo(L.LightningModule):
    """lightly's MoCo v2 step around our backbone and projector (the same modules as MCLModule's)."""

    def __init__(self, width: int, bank: int, temperature: float, momentum: float, lr: float, proj: dict, channels_last: bool = False):
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = WidthResNet("resnet18", width, cifar_stem=True)
        self.projector = mlp(
            self.backbone.out_dim, proj["proj_hidden"], proj["proj_out"], proj["proj_layers"], proj["proj_last_bn"], proj["proj_bn"]
        )
        self.key_backbone, self.key_projector = copy.deepcopy(self.backbone), copy.deepcopy(self.projector)
        deactivate_requires_grad(self.key_backbone)
        deactivate_requires_grad(self.key_projector)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=(bank, proj["proj_out"]))
        self.momentum, self.lr, self.channels_last = momentum, lr, channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        from lightly.models.utils import update_momentum

        x1, x2 = batch[0] if isinstance(batch[0], (list, tuple)) else batch[:2]  # lightly's loader: ([view 1, view 2], label)
        update_momentum(self.backbone, self.key_backbone, m=self.momentum)
        update_momentum(self.projector, self.key_projector, m=self.momentum)
        x = torch.cat([x1, x2])  # 2B x 3 x H x W
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        q1, q2 = self.projector(self.backbone(x)).chunk(2)  # B x D each
        with torch.no_grad():
            k1, k2 = self.key_projector(self.key_backbone(x)).chunk(2)
        return 0.5 * (self.criterion(q1, k2) + self.criterion(q2, k1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def main() -> None:
    p = bench.parser(__doc__.splitlines()[0])
    p.add_argument("--widths", type=int, nargs="+", default=[16, 64], help="backbone.width; 64 is the full ResNet-18")
    p.add_argument("--banks", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--precision", default="32-true")
    args = p.parse_args()
    device = bench.setup(args)
    import lightly

    rows = []
    for width in args.widths:
        for bank in args.banks:
            ours, cfg = bench.build_module(
                [f"backbone.width={width}", f"model.queue_size={bank}", f"data.batch_size={args.batch}", "experiment=moco_v2"]
                + ["model.bn_splits=1", "model.shuffle_bn=false"]
            )
            proj = {k: cfg.model[k] for k in ("proj_hidden", "proj_out", "proj_layers", "proj_last_bn", "proj_bn")}
            theirs = LightlyMoCo(width, bank, cfg.model.temperature, cfg.model.momentum, cfg.optim.lr, proj)
            bench.fill_bank(ours)
            batch = bench.random_views(args.batch, 32, device)
            bench.warm_up(ours, batch, device, args.precision)
            times = {"ours": [], "lightly": []}
            for _ in range(args.rounds):
                for key, module in (("ours", ours), ("lightly", theirs)):
                    times[key] += bench.step_seconds(module, batch, device, args.precision, args.steps, args.warmup)
            a, b = statistics.median(times["ours"]), statistics.median(times["lightly"])
            rows.append([width, bank, 1000 * a, 1000 * b, a / b])
            print(rows[-1], flush=True)
    worst = max(r[4] for r in rows)
    settings = {
        "machine": bench.machine(device),
        "device": str(device),
        "lightly": lightly.__version__,
        "batch": args.batch,
        "temperature": f"{cfg.model.temperature} (both)",
        "precision": args.precision,
        "timing": f"median of {args.rounds} rounds x {args.steps} steps (after {args.warmup} warm-up steps each), in turn",
        "goal": f"ours / lightly <= {GOAL}: {'met' if worst <= GOAL else 'not met'} (worst {worst:.3f})",
    }
    headers = ["width", "bank", "ours ms", "lightly ms", "ours / lightly"]
    bench.report("peers: our MoCo v2 step / lightly's MoCo step", settings, headers, rows, args.out, "peers")


if __name__ == "__main__":
    main()
