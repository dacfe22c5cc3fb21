"""What a mining strategy sees and returns.

A strategy is a small callable chosen by Hydra `_target_` from `conf/mining.positive/` or
`conf/mining.negative/`. It reads a `MiningContext` (tensors only) and returns a selection;
`MCLModule` turns selections into the targets and weights of `mcl.loss.weighted_infonce`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class MiningContext:
    """One direction of one training step. B queries, K bank entries, D feature dims.

    query:       B x D, L2-normalised query embeddings (carry gradient).
    key:         B x D, L2-normalised keys of the other view (no gradient): the augmented positive.
    bank_keys:   K x D, the bank as it was *before* this step's enqueue.
    bank_sim:    B x K, query @ bank_keys.T (carries gradient; the negatives' logits * tau).
    key_bank_sim: B x K, key @ bank_keys.T (no gradient), computed on first use: `none`, `all`,
                 `ring` and `hard`/`debiased` never read it.
    bank_index:  K, dataset index of each bank key (-1: not written yet).
    batch_index: B, dataset index of each query.
    temperature: InfoNCE temperature tau.
    bank_full:   every bank slot holds a real key (warm-up is over).
    progress:    training progress in [0, 1], for scheduled knobs.
    positive:    B x K bool, the entries mined as positives with target mass (set by `select`
                 between the two strategies; None when nothing was mined): never negatives.
    replaced:    B bool, the rows where the mined positives replaced k_i (lam = 0: k_i left the
                 loss), with replacement_weight B x K their target weights, rows summing to 1
                 (no gradient); None when no row lost k_i. Set by `select`.
    keep:        B x K bool, the entries the negative strategy keeps, for a positive strategy that
                 runs after it (`after_negatives`: relational targets live on the kept entries).
    """

    query: torch.Tensor
    key: torch.Tensor
    bank_keys: torch.Tensor
    bank_sim: torch.Tensor
    bank_index: torch.Tensor
    batch_index: torch.Tensor
    temperature: float
    bank_full: bool = True
    progress: float = 0.0
    positive: torch.Tensor | None = None
    replaced: torch.Tensor | None = None
    replacement_weight: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    @functools.cached_property
    def key_bank_sim(self) -> torch.Tensor:
        return (self.key @ self.bank_keys.T).detach()

    @property
    def self_mask(self) -> torch.Tensor:
        """B x K bool: bank entry j came from the same image as query i."""
        return self.bank_index[None, :] == self.batch_index[:, None]


@dataclass
class PositiveSelection:
    """Mined positives: bank entries `index` (B x m) with target weights `weight` (B x m).

    Rows of `weight` sum to at most 1, and to 0 where nothing was mined for that query; they may
    carry gradient (soft weights from the query, as the lab's SNCLR). `lam` is the
    target weight of the augmented positive: t_i = lam * onehot(k_i) + (1 - lam) * weight_i,
    and rows with no mined weight fall back to lam = 1. lam = 0 (NNCLR): in the rows with mined
    weight, k_i is no candidate either: it leaves the normaliser. `lam` may be a B x 1 tensor (SCE:
    its own share per row). protect: the mined entries are positives, never negatives; False for
    relational targets, which spread over the entries the negative strategy keeps.
    """

    index: torch.Tensor
    weight: torch.Tensor
    lam: float | torch.Tensor = 1.0
    protect: bool = True


@dataclass
class NegativeSelection:
    """Which bank entries enter the normaliser, and how.

    weight:   B x K, >= 0 (0 drops a negative, 1 keeps it, other values reweight it), or None
              to keep every entry.
    log_mass: B, optional replacement for log(sum_j weight_ij * exp(s_ij / tau)) (debiased
              estimators whose negative term is not a weighted sum).
    """

    weight: torch.Tensor | None = None
    log_mass: torch.Tensor | None = None


def no_positive(ctx: MiningContext) -> torch.Tensor:
    """An empty B x 0 index, shared by strategies that mine nothing."""
    return ctx.batch_index.new_zeros((ctx.query.shape[0], 0))


class NoPositives:
    """`mining.positive=none`: only the augmented view k_i is a positive (MoCo v2)."""

    def __call__(self, ctx: MiningContext) -> PositiveSelection:
        index = no_positive(ctx)  # B x 0
        return PositiveSelection(index=index, weight=ctx.query.new_zeros(index.shape), lam=1.0)


class AllNegatives:
    """`mining.negative=all`: every bank entry is a negative (MoCo).

    exclude_self: drop bank entries that came from the query's own image (an older key of the
    same image is a positive, not a negative).
    """

    def __init__(self, exclude_self: bool = True):
        self.exclude_self = exclude_self

    def __call__(self, ctx: MiningContext) -> NegativeSelection:
        if not self.exclude_self:
            return NegativeSelection()
        return NegativeSelection(weight=(~ctx.self_mask).to(ctx.bank_sim.dtype))


def mined_mask(pos: PositiveSelection, num_entries: int) -> torch.Tensor | None:
    """B x K bool: entries with target mass (1 - lam) * w > 0; None when nothing is mined, lam = 1 or the
    selection does not protect its entries (relational targets)."""
    if pos.index.shape[1] == 0 or not pos.protect or (not isinstance(pos.lam, torch.Tensor) and pos.lam >= 1):
        return None
    mask = torch.zeros(pos.index.shape[0], num_entries, dtype=torch.bool, device=pos.index.device)
    return mask.scatter_(1, pos.index, pos.weight > 0)


def select(ctx: MiningContext, positive, negative) -> tuple[PositiveSelection, NegativeSelection]:
    """Run both strategies on one direction: positives first, then negatives, which see the mined
    positives as `ctx.positive` (a debiased estimate must not count them as negatives) and, where they
    replaced k_i (lam = 0), `ctx.replaced` and `ctx.replacement_weight`. A positive strategy with
    `after_negatives` (relational targets) runs second instead, on the entries the negatives keep
    (`ctx.keep`), without gradient.

    Positives run without gradient unless the strategy's `differentiable` says its weights carry the
    query's (the module turns them into targets with scatter_add_, which passes it on).
    """
    if getattr(positive, "after_negatives", False):
        neg = negative(ctx)
        ctx.keep = None if neg.weight is None else neg.weight > 0  # B x K
        with torch.no_grad():
            return positive(ctx), neg
    with torch.set_grad_enabled(torch.is_grad_enabled() and getattr(positive, "differentiable", False)):
        pos = positive(ctx)
    num_entries = ctx.bank_sim.shape[1]
    ctx.positive = mined_mask(pos, num_entries)
    if pos.lam == 0 and pos.index.shape[1] > 0:
        weight = pos.weight.detach()
        total = weight.sum(dim=1, keepdim=True)  # B x 1
        spread = torch.zeros(weight.shape[0], num_entries, dtype=weight.dtype, device=weight.device).scatter_add_(1, pos.index, weight)
        ctx.replaced, ctx.replacement_weight = total[:, 0] > 0, spread / total.clamp_min(torch.finfo(weight.dtype).tiny)  # B, B x K
    return pos, negative(ctx)  # with gradient: a debiased log_mass is part of the loss
