"""What the mining picks, as pictures: fixed validation queries with their mined positives and
their kept and dropped negatives.

`MiningPanel` (a Lightning callback, conf/callbacks/default.yaml) draws the panel every N epochs
into `<run dir>/panels/epoch<NNN>.png` and, with `logger=wandb`, logs it as the image
`mining/panel`. `mining_panel` draws the same figure from any module and data module (the
gallery notebook uses it on a checkpoint).

Each row is one query (an un-augmented test image; its key is the key encoder's embedding of
the same image). Columns: the query with lambda, the target weight of its augmented positive;
the mined positives with their target weights (1 - lambda) * w; the kept and the dropped
negatives most similar to the query, with their cosine similarity s. A green frame marks a bank
image of the query's class, a red one another class: labels are read for display only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from matplotlib.figure import Figure
from torch.nn import functional as F

from mcl.data.datamodule import ContrastiveDataModule
from mcl.data.sources import Images
from mcl.mining.base import select
from mcl.module import MCLModule

NOT_IN_BANK = -2  # dataset index of the validation queries: bank slots hold >= -1, so none is "self"


@dataclass
class Mined:
    """For one query: bank slots and values, most important first."""

    lam: float
    positives: list[tuple[int, float]]  # (slot, target weight (1 - lam) * w)
    kept: list[tuple[int, float]]  # (slot, cosine to the query)
    dropped: list[tuple[int, float]]


@torch.no_grad()
def mine(module: MCLModule, images: torch.Tensor, num_positives: int = 5, num_negatives: int = 4) -> list[Mined]:
    """Run the module's own strategies on a batch of (model-ready) images: B x 3 x H x W.

    The module is put in eval mode for this (batch-norm statistics untouched) and restored.
    """
    was_training = module.training
    module.eval()
    try:
        q = F.normalize(module.predictor(module.projector(module.backbone(images))), dim=1)  # B x D
        k = F.normalize(module.key_projector(module.key_backbone(images)), dim=1)  # B x D
        ctx = module.mining_context(q, k, torch.full((len(images),), NOT_IN_BANK, device=q.device))
        pos, neg = select(ctx, module.positive, module.negative)
    finally:
        module.train(was_training)
    positive = torch.zeros_like(ctx.bank_sim, dtype=torch.bool)  # B x K: slots mined as positives
    positive.scatter_(1, pos.index, pos.weight > 0)
    keep = torch.ones_like(positive) if neg.weight is None else neg.weight > 0  # B x K
    out = []
    for i in range(len(images)):
        order = ctx.bank_sim[i].argsort(descending=True)  # K: most similar to the query first
        kept = [j for j in order.tolist() if keep[i, j] and not positive[i, j]][:num_negatives]
        dropped = [j for j in order.tolist() if not keep[i, j] and not positive[i, j]][:num_negatives]
        mined = sorted(((int(j), float(w)) for j, w in zip(pos.index[i], pos.weight[i]) if w > 0), key=lambda jw: -jw[1])
        lam = float(pos.lam[i]) if isinstance(pos.lam, torch.Tensor) else float(pos.lam)  # SCE: a share per row
        out.append(
            Mined(
                lam=lam if mined else 1.0,
                positives=[(j, (1.0 - lam) * w) for j, w in mined[:num_positives]],
                kept=[(j, float(ctx.bank_sim[i, j])) for j in kept],
                dropped=[(j, float(ctx.bank_sim[i, j])) for j in dropped],
            )
        )
    return out


def _show(ax, image: torch.Tensor | None, title: str, colour: str | None = None) -> None:
    if image is not None:
        ax.imshow(image.permute(1, 2, 0).numpy())  # H x W x 3 uint8
    else:
        ax.text(0.5, 0.5, "empty\nslot", ha="center", va="center", fontsize=7)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(2.5)


def draw(
    queries: list[tuple[torch.Tensor, int]],
    mined: list[Mined],
    bank_index: torch.Tensor,
    bank_labels: torch.Tensor,
    train: Images,
    title: str = "",
) -> Figure:
    """The panel: one row per query (image 3 x H x W uint8, label); bank slots shown as train images.

    A group of columns that is empty for every query (no mined positives, nothing dropped) is
    left out and named in the title.
    """
    groups = {
        "mined positives\n(target weight w)": [m.positives for m in mined],
        "kept negatives\n(most similar to the query, cosine s)": [m.kept for m in mined],
        "dropped negatives\n(most similar to the query, cosine s)": [m.dropped for m in mined],
    }
    empty = [header.split("\n")[0] for header, rows in groups.items() if not any(rows)]
    groups = {header: rows for header, rows in groups.items() if any(rows)}
    widths = [1, *(max(len(r) for r in rows) for rows in groups.values())]
    fig = Figure(figsize=(1.05 * sum(widths) + 0.3, 1.25 * len(queries) + 1.0), layout="constrained")
    subfigs = fig.subfigures(1, len(widths), width_ratios=widths, squeeze=False)[0]
    for subfig, header, n in zip(subfigs, ["query\n", *groups], widths):
        subfig.suptitle(header, fontsize=8, weight="bold")
        axes = np.array(subfig.subplots(len(queries), n, squeeze=False))  # rows x n
        for ax in axes.ravel():
            ax.set_axis_off()
        for row, (image, label) in enumerate(queries):
            if header == "query\n":
                axes[row, 0].set_axis_on()
                _show(axes[row, 0], image, f"y={label}, λ={mined[row].lam:.2f}")
                continue
            for col, (slot, value) in enumerate(groups[header][row]):
                index, slot_label = int(bank_index[slot]), int(bank_labels[slot])
                colour = None if slot_label < 0 or label < 0 else ("tab:green" if slot_label == label else "tab:red")
                axes[row, col].set_axis_on()
                _show(axes[row, col], train.image(index) if index >= 0 else None, f"{value:.2f}", colour)
    lines = [title] if title else []
    lines += ["frame: green = the query's class, red = another class (labels are shown, never trained on)"]
    lines += [f"none for any query: {', '.join(empty)}"] if empty else []
    fig.suptitle("\n".join(lines), fontsize=8)
    return fig


def query_indices(num_test: int, num_queries: int, seed: int) -> list[int]:
    """The fixed validation queries: the same `num_queries` test images at every epoch."""
    return sorted(np.random.default_rng(seed).choice(num_test, size=min(num_queries, num_test), replace=False).tolist())


def mining_panel(
    module: MCLModule,
    datamodule: ContrastiveDataModule,
    indices: list[int],
    num_positives: int = 5,
    num_negatives: int = 4,
    title: str = "",
) -> Figure:
    """The panel for the test images `indices`, from the module's current bank and strategies."""
    test_view = datamodule.val_dataloader()[1].dataset  # un-augmented, model-ready test images
    images = torch.stack([test_view[i][0] for i in indices]).to(module.device)  # B x 3 x H x W
    mined = mine(module, images, num_positives, num_negatives)
    queries = [(datamodule.test_images.image(i), int(datamodule.test_images.labels[i])) for i in indices]
    bank = module.bank
    return draw(queries, mined, bank.indices.cpu(), bank.labels.cpu(), datamodule.train_images, title)


class MiningPanel(L.Callback):
    """Every `every_n_epochs` training epochs and after the last one (trainer.max_epochs): the panel as
    `<dirpath>/epoch<NNN>.png` (NNN: epochs trained, from 1), and as the W&B image `mining/panel`
    (none with trainer.fast_dev_run).

    num_queries: fixed test images (chosen once with `seed`); num_positives / num_negatives:
    columns per group. Drawn on global rank 0 only.
    """

    def __init__(
        self, dirpath: str, every_n_epochs: int = 10, num_queries: int = 6, num_positives: int = 5, num_negatives: int = 4, seed: int = 0
    ):
        if every_n_epochs < 1 or num_queries < 1:
            raise ValueError(f"the mining panel needs every_n_epochs >= 1 and num_queries >= 1, got {every_n_epochs}, {num_queries}")
        self.dirpath, self.every_n_epochs, self.num_queries = Path(dirpath), every_n_epochs, num_queries
        self.num_positives, self.num_negatives, self.seed = num_positives, num_negatives, seed

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: MCLModule) -> None:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 == trainer.max_epochs  # a short run (debug=tiny) shows one too
        due = (epoch + 1) % self.every_n_epochs == 0 or last
        if not due or not trainer.is_global_zero or trainer.sanity_checking or trainer.fast_dev_run:
            return
        datamodule = trainer.datamodule
        indices = query_indices(len(datamodule.test_images), self.num_queries, self.seed)
        title = f"epoch {epoch + 1}, step {trainer.global_step}"  # epochs trained, counted from 1 as in the report's plots
        fig = mining_panel(pl_module, datamodule, indices, self.num_positives, self.num_negatives, title)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"epoch{epoch + 1:03d}.png"
        fig.savefig(path, dpi=100)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("mining/panel", [str(path)], step=trainer.global_step, caption=[title])
