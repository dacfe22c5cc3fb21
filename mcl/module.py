"""The LightningModule: query encoder, EMA key encoder, memory bank, and a method as a composition.

A method is views x candidates x positive mining x negative mining x objective, each chosen by config:
    views       mcl.views: 2 views (symmetric, or one direction: model.symmetric), a third key-only view
                (model.aux_view, CMSF) or UnMix's mixed views (model.mixing=unmix)
    candidates  model.candidates: bank (MoCo's memory bank of EMA keys), batch (both views of the global
                batch, SimCLR) or neighbours (the batch's keys and their bank neighbours: NNCLR and SNCLR's
                own loss, mcl.neighbours, knobs under model.neighbours)
    targets     mining.positive: none, nn, soft, hard, soft_hard, msf (neighbours), sce, ressl (relational)
    negatives   mining.negative: all, gradient, ring, fn_elimination, hard, debiased
    objective   model.objective: infonce (soft-target InfoNCE) or regression (BYOL's 2 - 2 p.t, weighted)
One step: loss = sum over the views' pairs (a -> b, weight) of weight * contrast(q_a, k_b) (mcl.contrast).
Only the keys of view 2 (those of q1 -> k2, as the lab's code) of all ranks are enqueued, after the
backward pass: each image has one key in the bank, and the bank read in a step never holds that
step's keys. Batch norm (mcl.batchnorm): each view its own batch for each encoder, every backbone BN
normalises `model.bn_splits` groups apart, and the key batch is shuffled across the global batch
before the key encoder (`model.shuffle_bn`). Queries and keys are normalised in float32, and the
loss runs in float32, under mixed precision.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any

import hydra
import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from mcl.bank import MemoryBank
from mcl.batchnorm import encode_views, shuffled, split_batchnorm
from mcl.contrast import OBJECTIVES, Candidates, build_targets, contrast, float32, mining_context, neighbour_contrast
from mcl.ddp import gather_rows
from mcl.mining.base import MiningContext
from mcl.mining.diagnostics import diagnostic_sums
from mcl.models import mlp
from mcl.monitors import Monitors
from mcl.neighbours import NeighbourContrast
from mcl.schedules import momentum_at, warmup_cosine
from mcl.views import draw_mix, mix, view_pairs

__all__ = ["MCLModule", "Candidates", "build_targets", "momentum_at", "warmup_cosine"]


def unit(t: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows, in float32 at least: bf16 outputs are cast up first, so the bank holds float32 unit keys."""
    return F.normalize(float32(t), dim=1)


class MCLModule(Monitors, L.LightningModule):
    """All arguments are plain dicts from the Hydra config (saved in checkpoints as is).

    backbone: kwargs with `_target_` (conf/backbone/); mining: {"positive": ..., "negative": ...}
    with `_target_` each; model: heads, bank, temperature, EMA, batch norm, objective, views
    (conf/train.yaml lists every knob and its default); optim: SGD + warm-up/cosine; monitor: kNN
    and linear-probe settings; num_classes: for the monitors only. Checkpoints written before an
    option existed load with the behaviour they were trained with (`model.get(knob, old value)`).
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
        dim, out = self.backbone.out_dim, model["proj_out"]
        bn, last_bn = model.get("proj_bn", True), model.get("proj_last_bn", "plain")
        self.projector = mlp(dim, model["proj_hidden"], out, model["proj_layers"], last_bn, bn)
        pred_last_bn = model.get("pred_last_bn", "none")
        self.predictor = mlp(out, model["pred_hidden"], out, 2, pred_last_bn) if model["predictor"] else nn.Identity()
        candidates, self.objective = model.get("candidates", "bank"), model.get("objective", "infonce")
        if candidates not in ("bank", "batch", "neighbours"):
            raise ValueError(f"model.candidates must be 'bank' (MoCo), 'batch' (SimCLR) or 'neighbours' (NNCLR, SNCLR), got {candidates!r}")
        if model.get("key_encoder", "ema") not in ("ema", "online"):
            raise ValueError(f"model.key_encoder must be 'ema' or 'online', got {model['key_encoder']!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"model.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        self.in_batch = candidates == "batch"
        self.neighbours = NeighbourContrast(**model["neighbours"]) if candidates == "neighbours" else None
        self.symmetric, self.mixing = model.get("symmetric", True), model.get("mixing", "none")
        if self.mixing not in ("none", "unmix"):
            raise ValueError(f"model.mixing must be 'none' or 'unmix', got {self.mixing!r}")
        online_keys = self.in_batch or model.get("key_encoder", "ema") == "online"
        self.shuffle_bn = model.get("shuffle_bn", False) and not online_keys  # online keys: no key encoder to shuffle for
        self.key_backbone = None if online_keys else copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projector = None if online_keys else copy.deepcopy(self.projector).requires_grad_(False)
        self.bank = None if self.in_batch else MemoryBank(model["queue_size"], out)
        self.aux_bank = MemoryBank(model["queue_size"], out) if model.get("aux_view", False) else None  # CMSF: the third view's keys
        self.positive = hydra.utils.instantiate(mining["positive"])
        self.negative = hydra.utils.instantiate(mining["negative"])
        if not self.in_batch:  # bad knobs fail here, before training; in-batch: at setup, when the batch is known
            self.validate_mining(model["queue_size"], f"model.queue_size={model['queue_size']}")
        if self.neighbours is not None:
            self.neighbours.validate(model["queue_size"])
        self.num_classes = num_classes
        self.linear_probe = nn.Linear(dim, num_classes)
        self.init_monitors()
        self._pending: tuple[torch.Tensor, ...] | None = None  # keys to enqueue after backward
        self._ema_step = -1  # the optimizer step the key encoder was last moved at
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

    def encode(self, *images: torch.Tensor, key_only: int = 0) -> tuple[torch.Tensor, list, list, list]:
        """Backbone features of view 1 (B x out_dim), projections z, queries q and keys k of the views (B x D
        each; q and k normalised); the last `key_only` views go through the key encoder only (CMSF's third).

        Each view is its own batch for each encoder (unless bn_splits=1 and shuffle_bn=false); the
        key encoder sees a shuffled slice of the global batch when shuffle_bn is on.
        """
        views = [self._images(x) for x in images]
        online = views[: len(views) - key_only]
        features = encode_views(self.backbone, online, self.separate_views)  # [B x out_dim] x views
        z = encode_views(self.projector, features, self.separate_views)  # [B x D] x views
        queries = [unit(t) for t in encode_views(self.predictor, z, self.separate_views)]
        if self.key_backbone is None:  # one encoder: the keys are the online projections, with gradient
            return features[0], z, queries, [unit(t) for t in z]
        with torch.no_grad():
            key_encoder = lambda x: self.key_projector(self.key_backbone(x))  # noqa: E731
            if self.shuffle_bn:
                broadcast = (lambda t: self.all_gather(t)[0]) if self.world_size > 1 else (lambda t: t)  # rank 0's, on every device
                key_encoder = functools.partial(shuffled, key_encoder, gather=self.gather, broadcast=broadcast, rank=self.global_rank)
            keys = [unit(t) for t in encode_views(key_encoder, views, self.separate_views)]
        return features[0], z, queries, keys

    @torch.no_grad()
    def _update_key_encoder(self) -> None:
        """EMA of the key encoder's parameters, once per optimizer step (at its first micro-batch, before the
        keys are encoded, as the lab's MoCo). Its batch-norm statistics are its own, from its own forwards."""
        if self.key_backbone is None or self._ema_step == self.global_step:
            return
        self._ema_step = self.global_step
        m = momentum_at(self.cfg_model["momentum"], self.progress, self.cfg_model["momentum_schedule"]) ** self.cfg_model.get(
            "ema_calls", 1
        )
        for online, key in ((self.backbone, self.key_backbone), (self.projector, self.key_projector)):
            torch._foreach_lerp_(list(key.parameters()), list(online.parameters()), 1.0 - m)

    @property
    def progress(self) -> float:
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        return min(1.0, self.global_step / total) if total and math.isfinite(total) else 0.0

    # --- loss ---------------------------------------------------------------------------
    def bank_candidates(self, bank: MemoryBank | None = None) -> Candidates:
        """A memory bank (the main one unless given) as it is now (before this step's enqueue), without gradient."""
        bank = self.bank if bank is None else bank
        return Candidates(bank.keys.detach(), bank.indices, bank.labels, bank.is_full)

    def candidates(self, keys: list[torch.Tensor], index: torch.Tensor, labels: torch.Tensor) -> Candidates:
        """The bank, or with model.candidates=batch the keys of views 1 and 2 (2B x D, with gradient) of every rank."""
        if not self.in_batch:
            return self.bank_candidates()
        both = torch.cat(keys[:2])  # 2B x D
        return Candidates(
            self.gather(both, sync_grads=True), self.gather(torch.cat([index, index])), self.gather(torch.cat([labels, labels]))
        )

    def mining_context(self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, candidates: Candidates | None = None) -> MiningContext:
        """What the mining strategies see (the panel calls this too); candidates: the bank when None."""
        c = self.bank_candidates() if candidates is None else candidates
        return mining_context(q, k, index, c, self.cfg_model["temperature"], self.progress)

    def contrast(self, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, candidates: Candidates | None = None, aux=None) -> tuple:
        """One direction (mcl.contrast): (loss, MiningContext, PositiveSelection, NegativeSelection); the bank when None."""
        c = self.bank_candidates() if candidates is None else candidates
        d = contrast(q, k, index, c, self.positive, self.negative, self.objective, self.cfg_model["temperature"], self.progress, aux)
        return d.loss, d.ctx, d.pos, d.neg

    def step_loss(self, queries: list, z: list, keys: list, index: torch.Tensor, labels: torch.Tensor, pairs: list) -> tuple:
        """sum over pairs (a, b, weight) of weight * loss(q_a -> k_b). Returns the loss, the candidates (None
        with neighbours), each direction's (ctx, pos, neg) (not with neighbours) and its diagnostic sums (2 x N)."""
        candidates = None if self.neighbours is not None else self.candidates(keys, index, labels)
        aux = None if self.aux_bank is None else (keys[-1], self.bank_candidates(self.aux_bank))
        total, mined, sums = 0.0, [], []
        for a, b, weight in pairs:
            if self.neighbours is not None:  # NNCLR / SNCLR's own loss
                loss, s = neighbour_contrast(
                    self.neighbours, queries[a], z[a], keys[b], self.bank, index, labels, self.cfg_model["temperature"]
                )
                sums.append(s)
            else:
                loss, *selection = self.contrast(queries[a], keys[b], index, candidates, aux)
                mined.append(selection)
                with torch.autocast(index.device.type, enabled=False):
                    sums.append(diagnostic_sums(*selection, labels, candidates.labels, self.objective == "infonce"))
            total = total + weight * loss
        return total, candidates, mined, sums

    def symmetric_loss(self, q1, q2, k1, k2, index: torch.Tensor, labels: torch.Tensor) -> tuple:
        """0.5 * (contrast(q1, k2) + contrast(q2, k1)), the candidates and both directions' (ctx, pos, neg)."""
        loss, candidates, mined, _ = self.step_loss([q1, q2], [q1, q2], [k1, k2], index, labels, view_pairs(True))
        return loss, candidates, *mined

    def step_views(self, views: list[torch.Tensor], batch_idx: int) -> tuple[list[torch.Tensor], list]:
        """The step's views and (query view, key view, weight) pairs (mcl.views); UnMix mixes view 2 here."""
        if self.mixing == "none":
            return views, view_pairs(self.symmetric)
        seed = getattr(getattr(self._trainer, "datamodule", None), "order", None)
        seed = 0 if seed is None or seed.seed is None else seed.seed  # data.seed (drawn once, checkpointed); 0 without a trainer
        lam, box = draw_mix(seed, self.global_step, batch_idx, *views[1].shape[2:])
        return [views[0], views[1], *mix(views[1], lam, box)], view_pairs(self.symmetric, lam)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        *views, index, labels = batch
        self._update_key_encoder()
        views, pairs = self.step_views(views, batch_idx)
        key_only = 1 if self.aux_bank is not None else 0
        features1, z, queries, keys = self.encode(*views, key_only=key_only)  # B x out_dim; [B x D] per view
        loss, _, _, sums = self.step_loss(queries, z, keys, index, labels, pairs)
        self._log_mining(sums, index.shape[0])
        probe_loss = F.cross_entropy(self.linear_probe(features1.detach()), labels, ignore_index=-1)
        if self.bank is not None:  # one key an image: view 2's, as the lab enqueues the keys of q1 -> k2
            self._pending = (keys[1].detach(), index, labels, keys[-1].detach() if key_only else None)
        self.log("train/loss", loss, sync_dist=True)  # no prog_bar: the bar reads it at its refreshes only (mcl.callbacks)
        self.log("train/linear_loss", probe_loss, sync_dist=True)
        return loss + probe_loss

    @torch.no_grad()
    def on_after_backward(self) -> None:
        """Enqueue after backward (the loss read the bank in place, without a copy).

        Keys of every rank are gathered, in the same order everywhere, so all banks stay identical.
        Done here, not in on_train_batch_end: callbacks (ModelCheckpoint) run before the module's
        on_train_batch_end, so a checkpoint taken there would miss this step's keys.
        """
        if self._pending is None:
            return
        (keys, index, labels, aux), self._pending = self._pending, None
        keys, index, labels, aux = gather_rows(self.gather, self.world_size, keys, index, labels, aux)  # (world_size*B) x ...
        self.bank.enqueue(keys, index, labels)
        if aux is not None:  # CMSF: the third view's keys, in the same slots
            self.aux_bank.enqueue(aux, index, labels)

    # --- optimisation -------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg_optim
        global_batch = self.trainer.world_size * self.trainer.accumulate_grad_batches * self.trainer.datamodule.batch_size
        lr = o["lr"] * global_batch / 256
        encoder = [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("linear_probe")]
        optimizer = torch.optim.SGD(
            [
                {"params": encoder, "lr": lr, "weight_decay": o["weight_decay"], "name": "lr"},  # logged as train/lr
                {"params": self.linear_probe.parameters(), "lr": self.cfg_monitor["linear_lr"], "weight_decay": 0.0, "name": "linear_lr"},
            ],
            lr=lr,
            momentum=o["momentum"],
            fused=True,  # the whole update in one kernel (the same values as the for-each update)
        )
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(total * o["warmup_epochs"] / max(1, self.trainer.max_epochs)) if self.trainer.max_epochs > 0 else 0
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "train"}}
