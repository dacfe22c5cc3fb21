"""The LightningModule: query encoder, EMA key encoder, memory bank and the mining strategies.

Symmetric MoCo v2 with pluggable mining. Per direction (query view a, key view b):
    logits = [q_a . k_b | q_a . candidates] / tau               B x (1+K)
    targets from the positive strategy, weights from the negative strategy,
    loss = weighted_infonce(logits, targets, log(weights))       (mcl.loss)
The candidates (where mined positives and negatives come from) are, with `model.candidates`:
    bank   the memory bank of EMA keys (MoCo). As the lab's MoCo, only the keys of one direction
           (view 2's, the keys of q1 -> k2) of all ranks are gathered and enqueued, after the
           backward pass: each image has one key in the bank, and the bank read in a step never
           contains that step's keys.
    batch  both views' projections of the global batch, with gradient, one encoder, no bank
           (SimCLR's NT-Xent: the query's own two views are excluded as its own image).
    neighbours  the batch's keys and their top-k bank neighbours, with NNCLR's or SNCLR's loss
           (mcl.neighbours, knobs under model.neighbours); the mining strategies stay none/all.
Batch norm (mcl.batchnorm): the views go through the encoders as separate batches, every backbone
BN normalises `model.bn_splits` groups apart, and the key batch is shuffled across the global
batch before the key encoder (`model.shuffle_bn`): a query and its key never share BN statistics.
The loss (similarities, logits, mining) runs in float32 under mixed precision.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import hydra
import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

from mcl.bank import MemoryBank
from mcl.batchnorm import encode_views, shuffled, split_batchnorm
from mcl.loss import weighted_infonce
from mcl.mining.base import MiningContext, NegativeSelection, PositiveSelection, select
from mcl.mining.diagnostics import MiningMeter, diagnostic_sums
from mcl.models import mlp
from mcl.monitors import knn_predict, topk_accuracy, unpad_distributed
from mcl.neighbours import NeighbourContrast


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
    with `_target_` each; model: heads, bank, temperature, EMA, batch norm (conf/train.yaml
    lists every knob and its default); optim: SGD + warm-up/cosine; monitor: kNN and
    linear-probe settings; num_classes: for the monitors only. Checkpoints written before
    model.bn_splits / shuffle_bn / proj_bn load with the behaviour they were trained with
    (one BN batch of both views, a BN head).
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
        self.bn_splits = model.get("bn_splits", 1)
        self.separate_views = self.bn_splits > 1 or model.get("shuffle_bn", False)  # False: the old one-batch shortcut
        self.backbone = split_batchnorm(hydra.utils.instantiate(backbone), self.bn_splits)
        dim = self.backbone.out_dim
        # checkpoints written before an option existed get the value that rebuilds their architecture
        self.projector = mlp(
            dim,
            model["proj_hidden"],
            model["proj_out"],
            model["proj_layers"],
            model.get("proj_last_bn", "plain"),
            model.get("proj_bn", True),
        )
        self.predictor = (
            mlp(model["proj_out"], model["pred_hidden"], model["proj_out"], 2, model.get("pred_last_bn", "none"))
            if model["predictor"]
            else nn.Identity()
        )
        candidates = model.get("candidates", "bank")
        if candidates not in ("bank", "batch", "neighbours"):
            raise ValueError(f"model.candidates must be 'bank' (MoCo), 'batch' (SimCLR) or 'neighbours' (NNCLR, SNCLR), got {candidates!r}")
        if model.get("key_encoder", "ema") not in ("ema", "online"):
            raise ValueError(f"model.key_encoder must be 'ema' or 'online', got {model['key_encoder']!r}")
        self.in_batch = candidates == "batch"
        self.neighbours = NeighbourContrast(**model["neighbours"]) if candidates == "neighbours" else None
        online_keys = self.in_batch or model.get("key_encoder", "ema") == "online"
        self.shuffle_bn = model.get("shuffle_bn", False) and not online_keys  # online keys: no key encoder to shuffle for
        self.key_backbone = None if online_keys else copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projector = None if online_keys else copy.deepcopy(self.projector).requires_grad_(False)
        self.bank = None if self.in_batch else MemoryBank(model["queue_size"], model["proj_out"])
        self.positive = hydra.utils.instantiate(mining["positive"])
        self.negative = hydra.utils.instantiate(mining["negative"])
        if not self.in_batch:  # bad knobs fail here, before training; in-batch: at setup, when the batch is known
            self.validate_mining(model["queue_size"], f"model.queue_size={model['queue_size']}")
        if self.neighbours is not None:
            self.neighbours.validate(model["queue_size"])
        self.num_classes = num_classes
        self.linear_probe = nn.Linear(dim, num_classes)
        self._eval_feats: list[list[torch.Tensor]] = [[], []]
        self._eval_labels: list[list[torch.Tensor]] = [[], []]
        self._linear_pred: list[torch.Tensor] = []  # the linear probe's class per test image
        self._pending: tuple[torch.Tensor, ...] | None = None  # keys to enqueue after backward
        self._ema_step = -1  # the optimizer step the key encoder was last moved at
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

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def gather(self, t: torch.Tensor, sync_grads: bool = False) -> torch.Tensor:
        """B x ... of every rank, concatenated in rank order: (world_size*B) x ... (t itself on one device)."""
        return t if self.world_size == 1 else self.all_gather(t, sync_grads=sync_grads).flatten(0, 1)

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

    def encode(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Backbone features of view 1 (B x out_dim), projections [z1, z2], queries [q1, q2] and keys [k1, k2]
        (B x D each; queries and keys normalised).

        Each view is its own batch for each encoder (unless bn_splits=1 and shuffle_bn=false); the
        key encoder sees a shuffled slice of the global batch when shuffle_bn is on.
        """
        views = [self._images(x1), self._images(x2)]
        features = encode_views(self.backbone, views, self.separate_views)  # [B x out_dim] x 2
        z = encode_views(self.projector, features, self.separate_views)  # [B x D] x 2
        queries = [F.normalize(t, dim=1) for t in encode_views(self.predictor, z, self.separate_views)]
        if self.key_backbone is None:  # one encoder: the keys are the online projections, with gradient
            return features[0], z, queries, [F.normalize(t, dim=1) for t in z]
        with torch.no_grad():
            key_encoder = lambda x: self.key_projector(self.key_backbone(x))  # noqa: E731
            if self.shuffle_bn:
                broadcast = (lambda t: self.all_gather(t)[0]) if self.world_size > 1 else (lambda t: t)  # rank 0's, on every device
                key_encoder = functools.partial(shuffled, key_encoder, gather=self.gather, broadcast=broadcast, rank=self.global_rank)
            keys = [F.normalize(t, dim=1) for t in encode_views(key_encoder, views, self.separate_views)]
        return features[0], z, queries, keys

    @torch.no_grad()
    def _update_key_encoder(self) -> None:
        """EMA of the key encoder's parameters, once per optimizer step (at its first micro-batch, before the
        keys are encoded, as the lab's MoCo). Its batch-norm statistics are its own, from its own forwards."""
        if self.key_backbone is None or self._ema_step == self.global_step:
            return
        self._ema_step = self.global_step
        m = momentum_at(self.cfg_model["momentum"], self.progress, self.cfg_model["momentum_schedule"])
        for online, key in ((self.backbone, self.key_backbone), (self.projector, self.key_projector)):
            torch._foreach_lerp_(list(key.parameters()), list(online.parameters()), 1.0 - m)

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
        keys = self.gather(keys, sync_grads=True)  # gradient flows back to each rank's own keys
        return Candidates(keys, self.gather(index), self.gather(labels))

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
        """One direction of the loss. q, k: B x D normalised; index: B dataset indices; candidates: the bank when None.

        Runs in float32 under mixed precision: B x K similarities in bf16 would round the logits
        (and the mining ranks) to 2-3 significant digits.
        """
        tau = self.cfg_model["temperature"]
        with torch.autocast(q.device.type, enabled=False):
            q, k = q.float(), k.float()
            c = self.bank_candidates() if candidates is None else candidates
            ctx = self.mining_context(q, k, index, replace(c, keys=c.keys.float()))
            bank_keys, bank_sim = ctx.bank_keys, ctx.bank_sim  # K x D, B x K
            pos, neg = select(ctx, self.positive, self.negative)
            logits = torch.cat([(q * k).sum(1, keepdim=True), bank_sim], dim=1) / tau  # B x (1+K)
            targets = build_targets(pos, bank_keys.shape[0], logits)
            log_weight = None
            if neg.weight is not None:
                weight = neg.weight if ctx.positive is None else neg.weight.masked_fill(ctx.positive, 1.0)  # mined positives stay in Z
                log_weight = F.pad(weight.log(), (1, 0))  # B x (1+K), 0 for the augmented positive
            if pos.lam == 0 and targets is not None:  # NNCLR: where a neighbour replaced k_i, k_i is no candidate at all
                augmented = F.pad((targets[:, :1] > 0).to(logits.dtype).log(), (0, bank_keys.shape[0]))  # B x (1+K): -inf on k_i if mined
                log_weight = augmented if log_weight is None else log_weight + augmented
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
        self._update_key_encoder()
        features1, (z1, z2), (q1, q2), (k1, k2) = self.encode(x1, x2)  # B x out_dim; B x D each
        if self.neighbours is not None:  # NNCLR / SNCLR: in-batch keys and their bank neighbours
            loss, sums = self.neighbours(((q1, z1, k2), (q2, z2, k1)), self.bank, index, labels, self.cfg_model["temperature"])
        else:
            loss, candidates, *directions = self.symmetric_loss(q1, q2, k1, k2, index, labels)
            with torch.autocast(x1.device.type, enabled=False):
                sums = [diagnostic_sums(ctx, pos, neg, labels, candidates.labels) for ctx, pos, neg in directions]
        self._log_mining(sums, x1.shape[0])
        probe_loss = F.cross_entropy(self.linear_probe(features1.detach()), labels, ignore_index=-1)
        if not self.in_batch:
            self._pending = (k2.detach(), index, labels)  # one key an image: view 2's, as the lab enqueues the keys of q1 -> k2
        self.log("train/loss", loss, sync_dist=True)
        self.log("train/linear_loss", probe_loss, sync_dist=True)
        return loss + probe_loss

    def _log_mining(self, sums: list[torch.Tensor], batch_size: int) -> None:
        """`mining/*` diagnostics (mcl.mining.diagnostics; the two directions' sums), averaged over the directions.

        They accumulate on the device (no host read in a step that does not log) and are read at
        Lightning's logging steps (trainer.log_every_n_steps): `mining/<name>_step` is the mean over
        the steps since the last logging step, `mining/<name>_epoch` (on_train_epoch_end) the mean
        over the epoch; a diagnostic undefined in a step (e.g. purity before mining starts) does
        not count there. Each rank logs its own batches, without a collective.
        """
        self.mining_meter.update(*sums)
        if self._trainer is None or self.trainer._logger_connector.should_update_logs:
            for name, value in self.mining_meter.read("interval").items():
                self.log(f"mining/{name}_step", value, on_step=True, on_epoch=False, batch_size=batch_size)

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
        self.bank.enqueue(self.gather(keys), self.gather(index), self.gather(labels))  # (world_size*B) x D

    # --- monitors -----------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        feats = self(x)
        self._eval_feats[dataloader_idx].append(feats.float())
        self._eval_labels[dataloader_idx].append(y)
        if dataloader_idx == 1:
            self._linear_pred.append(self.linear_probe(feats).argmax(1))  # B

    def _whole_split(self, tensors: list[torch.Tensor], dataloader_idx: int) -> list[torch.Tensor]:
        """This rank's per-batch tensors -> the split's rows as every rank evaluated them, each image once.

        Under DDP the DistributedSampler pads each split to a multiple of the world size with
        repeated images; they are dropped here (`unpad_distributed`), so no image votes or is
        scored twice.
        """
        tensors = [torch.cat(t) for t in tensors]
        sampler = getattr(self.trainer.val_dataloaders[dataloader_idx], "sampler", None)
        if self.trainer.world_size == 1 or not isinstance(sampler, DistributedSampler):
            return tensors  # every rank evaluated the whole split itself
        return [unpad_distributed(t, sampler) for t in self.all_gather(tensors)]  # W x n x ... -> N' x ...

    def on_validation_epoch_end(self) -> None:
        """Logs val/knn_top1, val/knn_top5 and val/linear_top1 on the test split, with
        val/knn_memory_size (training images that voted) and val/knn_queries (test images scored):
        fewer than the splits hold when trainer.limit_val_batches < 1."""
        feats, labels, linear = self._eval_feats, self._eval_labels, self._linear_pred  # [train split, test split] each
        self._eval_feats, self._eval_labels, self._linear_pred = [[], []], [[], []], []
        if not (feats[0] and feats[1]):  # a split without batches (e.g. limit_val_batches=0)
            return
        memory, memory_labels = self._whole_split([feats[0], labels[0]], 0)  # N x D, N
        query, query_labels, linear = self._whole_split([feats[1], labels[1], linear], 1)  # Q x D, Q, Q
        voters = memory_labels >= 0  # unlabelled images (STL-10) cannot vote
        k, t = self.cfg_monitor["knn_k"], self.cfg_monitor["knn_t"]
        scores = knn_predict(query, memory[voters], memory_labels[voters], self.num_classes, k, t)  # Q x C
        scored = query_labels >= 0
        self.log("val/knn_top1", topk_accuracy(scores[scored], query_labels[scored]), sync_dist=False)
        self.log("val/knn_top5", topk_accuracy(scores[scored], query_labels[scored], 5), sync_dist=False)
        self.log("val/linear_top1", (linear[scored] == query_labels[scored]).float().mean(), sync_dist=False)
        self.log("val/knn_memory_size", float(voters.sum()), sync_dist=False)
        self.log("val/knn_queries", float(scored.sum()), sync_dist=False)

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
            fused=True,  # the whole update in one kernel (the same values as the for-each update)
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(total * o["warmup_epochs"] / max(1, self.trainer.max_epochs)) if self.trainer.max_epochs > 0 else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
