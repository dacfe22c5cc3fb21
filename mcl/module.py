"""The LightningModule: query encoder, EMA key encoder, memory bank and the mining strategies.

Symmetric MoCo v2 with pluggable mining. Per direction (query view a, key view b):
    logits = [q_a . k_b | q_a . candidates] / tau               B x (1+K)
    targets from the positive strategy, weights from the negative strategy,
    loss = weighted_infonce(logits, targets, log(weights))       (mcl.loss)
The candidates (where mined positives and negatives come from) are, with `model.candidates`:
    bank   the memory bank of EMA keys (MoCo). Both keys of all ranks are gathered and enqueued
           after the backward pass: the bank read in a step never contains that step's keys.
    batch  both views' projections of the global batch, with gradient, one encoder, no bank
           (SimCLR's NT-Xent: the query's own two views are excluded as its own image).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import hydra
import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from mcl.bank import MemoryBank
from mcl.loss import weighted_infonce
from mcl.mining.base import MiningContext, NegativeSelection, PositiveSelection, select
from mcl.mining.diagnostics import MiningMeter, diagnostic_sums
from mcl.models import mlp
from mcl.monitors import knn_predict, topk_accuracy


def momentum_at(base: float, progress: float, schedule: str) -> float:
    """EMA momentum: constant, or cosine from `base` to 1 over training (BYOL)."""
    if schedule == "const":
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def build_targets(pos: PositiveSelection, num_bank: int, like: torch.Tensor) -> torch.Tensor | None:
    """B x (1+K) targets: lam on the augmented positive, (1-lam)*weight on the mined bank entries.

    None when nothing was mined: the loss is then MoCo's cross-entropy on column 0.
    """
    if pos.index.shape[1] == 0:
        return None
    targets = like.new_zeros(like.shape[0], 1 + num_bank)
    mined = pos.weight.sum(dim=1, keepdim=True) > 0  # B x 1; rows where something was mined
    lam = torch.where(mined, torch.full_like(mined, pos.lam, dtype=like.dtype), torch.ones_like(mined, dtype=like.dtype))
    targets[:, :1] = lam
    targets[:, 1:].scatter_add_(1, pos.index, (1.0 - lam) * pos.weight)
    return targets


@dataclass
class Candidates:
    """The K entries a query is contrasted with: keys K x D, dataset index K and label K (-1 unknown)."""

    keys: torch.Tensor
    index: torch.Tensor
    labels: torch.Tensor
    full: bool = True  # every entry is a real key (the mining warm-up waits for this)


class MCLModule(L.LightningModule):
    """All arguments are plain dicts from the Hydra config (saved in checkpoints as is).

    backbone: kwargs with `_target_` (conf/backbone/); mining: {"positive": ..., "negative": ...}
    with `_target_` each; model: heads, bank, temperature, EMA; optim: SGD + warm-up/cosine;
    monitor: kNN and linear-probe settings; num_classes: for the monitors only.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        model: dict[str, Any],
        mining: dict[str, Any],
        optim: dict[str, Any],
        monitor: dict[str, Any],
        num_classes: int,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.cfg_model, self.cfg_optim, self.cfg_monitor = model, optim, monitor
        self.backbone = hydra.utils.instantiate(backbone)
        dim = self.backbone.out_dim
        self.projector = mlp(dim, model["proj_hidden"], model["proj_out"], model["proj_layers"])
        self.predictor = (
            mlp(model["proj_out"], model["pred_hidden"], model["proj_out"], 2, last_bn=False) if model["predictor"] else nn.Identity()
        )
        candidates = model.get("candidates", "bank")  # checkpoints written before the option hold a bank
        if candidates not in ("bank", "batch"):
            raise ValueError(f"model.candidates must be 'bank' (MoCo) or 'batch' (SimCLR), got {candidates!r}")
        self.in_batch = candidates == "batch"
        self.key_backbone = None if self.in_batch else copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projector = None if self.in_batch else copy.deepcopy(self.projector).requires_grad_(False)
        self.bank = None if self.in_batch else MemoryBank(model["queue_size"], model["proj_out"])
        self.positive = hydra.utils.instantiate(mining["positive"])
        self.negative = hydra.utils.instantiate(mining["negative"])
        if not self.in_batch:  # bad knobs fail here, before training; in-batch: at setup, when the batch is known
            self.validate_mining(model["queue_size"], f"model.queue_size={model['queue_size']}")
        self.num_classes = num_classes
        self.linear_probe = nn.Linear(dim, num_classes)
        self.val_linear_top1 = MulticlassAccuracy(num_classes, top_k=1, ignore_index=-1)
        self._eval_feats: list[list[torch.Tensor]] = [[], []]
        self._eval_labels: list[list[torch.Tensor]] = [[], []]
        self._pending: tuple[torch.Tensor, ...] | None = None  # keys to enqueue after backward
        self.mining_meter = MiningMeter()  # mining/* diagnostics, summed on the device between logging steps
        if model["channels_last"]:
            self.to(memory_format=torch.channels_last)
        if model["compile"]:  # in place: parameter names, checkpoints and the EMA update stay as they are
            for backbone in (self.backbone, self.key_backbone):
                if backbone is not None:
                    backbone.compile()

    def validate_mining(self, num_candidates: int, source: str) -> None:
        """Raise ValueError, naming `source`, if a strategy's knobs cannot run on `num_candidates` entries per query."""
        for strategy in (s for s in (self.positive, self.negative) if hasattr(s, "validate")):
            try:
                strategy.validate(num_candidates)
            except ValueError as err:
                raise ValueError(f"{source}: {err}") from None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.in_batch:
            n = 2 * self.trainer.datamodule.batch_size * self.trainer.world_size
            self.validate_mining(n, f"model.candidates=batch: {n} candidates (2 views x data.batch_size x devices)")

    # --- encoders -----------------------------------------------------------------------
    def _images(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg_model["channels_last"] else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (B x out_dim), what evaluation and export use."""
        return self.backbone(self._images(x))

    @torch.no_grad()
    def _update_key_encoder(self, m: float) -> None:
        if self.in_batch:
            return
        for online, key in ((self.backbone, self.key_backbone), (self.projector, self.key_projector)):
            torch._foreach_lerp_(list(key.parameters()), list(online.parameters()), 1.0 - m)
            torch._foreach_copy_(list(key.buffers()), list(online.buffers()))  # batch-norm statistics

    @property
    def progress(self) -> float:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        return min(1.0, self.global_step / total) if total and math.isfinite(total) else 0.0

    # --- loss ---------------------------------------------------------------------------
    def bank_candidates(self) -> Candidates:
        """The memory bank as it is now (before this step's enqueue), without gradient."""
        bank = self.bank
        return Candidates(bank.keys.detach(), bank.indices, bank.labels, bank.is_full)

    def batch_candidates(self, keys: torch.Tensor, index: torch.Tensor, labels: torch.Tensor) -> Candidates:
        """model.candidates=batch: this step's keys (2B x D, with gradient) of every rank, in rank order."""
        if self._trainer is not None and self.trainer.world_size > 1:
            keys = self.all_gather(keys, sync_grads=True).flatten(0, 1)  # gradient flows back to each rank's own keys
            index, labels = (t.flatten(0, 1) for t in self.all_gather((index, labels)))
        return Candidates(keys, index, labels)

    def mining_context(self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, candidates: Candidates | None = None) -> MiningContext:
        """What the mining strategies see: q, k B x D normalised, index B dataset indices; candidates: the
        bank when None (the panel calls this too)."""
        c = self.bank_candidates() if candidates is None else candidates
        return MiningContext(
            query=q,
            key=k,
            bank_keys=c.keys,
            bank_sim=q @ c.keys.T,  # B x K
            bank_index=c.index,
            batch_index=index,
            temperature=self.cfg_model["temperature"],
            bank_full=c.full,
            progress=self.progress,
        )

    def contrast(
        self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, candidates: Candidates | None = None
    ) -> tuple[torch.Tensor, MiningContext, PositiveSelection, NegativeSelection]:
        """One direction of the loss. q, k: B x D normalised; index: B dataset indices; candidates: the bank when None."""
        tau = self.cfg_model["temperature"]
        ctx = self.mining_context(q, k, index, candidates)
        bank_keys, bank_sim = ctx.bank_keys, ctx.bank_sim  # K x D, B x K
        pos, neg = select(ctx, self.positive, self.negative)
        logits = torch.cat([(q * k).sum(1, keepdim=True), bank_sim], dim=1) / tau  # B x (1+K)
        targets = build_targets(pos, bank_keys.shape[0], logits)
        log_weight = None
        if neg.weight is not None:
            weight = neg.weight if ctx.positive is None else neg.weight.masked_fill(ctx.positive, 1.0)  # mined positives stay in Z
            log_weight = F.pad(weight.log(), (1, 0))  # B x (1+K), 0 for the augmented positive
        loss = weighted_infonce(logits, targets, log_weight, neg.log_mass)
        return loss, ctx, pos, neg

    def symmetric_loss(
        self, q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, index: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, Candidates, list, list]:
        """0.5 * (contrast(q1, k2) + contrast(q2, k1)) against the bank, or against both views of the batch."""
        if self.in_batch:
            candidates = self.batch_candidates(torch.cat([k1, k2]), torch.cat([index, index]), torch.cat([labels, labels]))
        else:
            candidates = self.bank_candidates()
        loss12, *mined12 = self.contrast(q1, k2, index, candidates)
        loss21, *mined21 = self.contrast(q2, k1, index, candidates)
        return 0.5 * (loss12 + loss21), candidates, mined12, mined21

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x1, x2, index, labels = batch
        b = x1.shape[0]
        self._update_key_encoder(momentum_at(self.cfg_model["momentum"], self.progress, self.cfg_model["momentum_schedule"]))
        features = self.backbone(self._images(torch.cat([x1, x2])))  # 2B x out_dim
        z = self.projector(features)
        q1, q2 = F.normalize(self.predictor(z), dim=1).split(b)  # B x D each
        if self.in_batch:  # one encoder: the keys are the online projections, with gradient
            k1, k2 = F.normalize(z, dim=1).split(b)
        else:
            with torch.no_grad():
                k1, k2 = F.normalize(self.key_projector(self.key_backbone(self._images(torch.cat([x1, x2])))), dim=1).split(b)
        loss, candidates, mined12, mined21 = self.symmetric_loss(q1, q2, k1, k2, index, labels)
        self._log_mining(labels, candidates.labels, mined12, mined21)
        probe_loss = F.cross_entropy(self.linear_probe(features[:b].detach()), labels, ignore_index=-1)
        if not self.in_batch:
            self._pending = (torch.cat([k1, k2]), torch.cat([index, index]), torch.cat([labels, labels]))
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.log("train/linear_loss", probe_loss, sync_dist=True)
        return loss + probe_loss

    def _log_mining(self, labels: torch.Tensor, candidate_labels: torch.Tensor, *directions: list) -> None:
        """`mining/*` diagnostics (mcl.mining.diagnostics), averaged over the two directions.

        They accumulate on the device (no host read in a step that does not log) and are read at
        Lightning's logging steps (trainer.log_every_n_steps): `mining/<name>_step` is the mean over
        the steps since the last logging step, `mining/<name>_epoch` (on_train_epoch_end) the mean
        over the epoch; a diagnostic undefined in a step (e.g. purity before mining starts) does
        not count there. Labels are read here only. Each rank logs its own batches, without a collective.
        """
        self.mining_meter.update(*(diagnostic_sums(ctx, pos, neg, labels, candidate_labels) for ctx, pos, neg in directions))
        if self._trainer is None or self.trainer._logger_connector.should_update_logs:
            for name, value in self.mining_meter.read("interval").items():
                self.log(f"mining/{name}_step", value, on_step=True, on_epoch=False, batch_size=labels.shape[0])

    def on_train_epoch_end(self) -> None:
        for name, value in self.mining_meter.read("epoch").items():
            self.log(f"mining/{name}_epoch", value, on_step=False, on_epoch=True)

    @torch.no_grad()
    def on_after_backward(self) -> None:
        """Enqueue after backward (the loss read the bank in place, without a copy).

        Keys of every rank are gathered, in the same order everywhere, so all banks stay identical.
        Done here, not in on_train_batch_end: callbacks (ModelCheckpoint) run before the module's
        on_train_batch_end, so a checkpoint taken there would miss this step's keys.
        """
        if self._pending is None:
            return
        (keys, index, labels), self._pending = self._pending, None
        if self.trainer.world_size > 1:
            keys, index, labels = (t.flatten(0, 1) for t in self.all_gather((keys, index, labels)))
        self.bank.enqueue(keys, index, labels)

    # --- monitors -----------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        feats = self(x)
        self._eval_feats[dataloader_idx].append(feats.float())
        self._eval_labels[dataloader_idx].append(y)
        if dataloader_idx == 1:
            self.val_linear_top1.update(self.linear_probe(feats), y)

    def on_validation_epoch_end(self) -> None:
        feats = [torch.cat(f) if f else None for f in self._eval_feats]
        labels = [torch.cat(y) if y else None for y in self._eval_labels]
        self._eval_feats, self._eval_labels = [[], []], [[], []]
        self.log("val/linear_top1", self.val_linear_top1.compute(), sync_dist=False)
        self.val_linear_top1.reset()
        if feats[0] is None or feats[1] is None:
            return
        if self.trainer.world_size > 1:
            feats = [self.all_gather(f).flatten(0, 1) for f in feats]
            labels = [self.all_gather(y).flatten(0, 1) for y in labels]
        memory = labels[0] >= 0  # unlabelled images (STL-10) cannot vote
        scores = knn_predict(
            feats[1], feats[0][memory], labels[0][memory], self.num_classes, self.cfg_monitor["knn_k"], self.cfg_monitor["knn_t"]
        )
        self.log("val/knn_top1", topk_accuracy(scores, labels[1]), sync_dist=False)
        self.log("val/knn_top5", topk_accuracy(scores, labels[1], 5), sync_dist=False)

    # --- optimisation -------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg_optim
        global_batch = self.trainer.world_size * self.trainer.accumulate_grad_batches * self.trainer.datamodule.batch_size
        lr = o["lr"] * global_batch / 256
        encoder = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("linear_probe")]
        optimizer = torch.optim.SGD(
            [
                {"params": encoder, "lr": lr, "weight_decay": o["weight_decay"]},
                {"params": self.linear_probe.parameters(), "lr": self.cfg_monitor["linear_lr"], "weight_decay": 0.0},
            ],
            lr=lr,
            momentum=o["momentum"],
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(total * o["warmup_epochs"] / max(1, self.trainer.max_epochs)) if self.trainer.max_epochs > 0 else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
