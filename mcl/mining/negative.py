"""Negative mining: which bank entries enter the InfoNCE normaliser (`mining.negative=...`).

For InfoNCE, d loss / d s_ij = p_ij / tau with p_ij the softmax probability of negative j:
easy negatives (p ~ 0) carry no signal, the hardest carry most of it and, without labels,
are the most likely to be false negatives (same class as the query).

    gradient        the paper's band: rank by similarity to the positive k_i (or to the query),
                    drop the hardest head and the easy tail, keep the ranks [start, end)
    ring            Wu et al. 2021: keep the ring [inner * outer, outer) of percentiles of
                    similarity to the query, the outer edge optionally annealed from the full bank
    fn_elimination  drop negatives whose similarity to k_i (or to the query) exceeds a threshold
    hard            HCL, Robinson et al. 2021: importance weights exp(beta * s / tau) / mean and
                    the debiasing prior tau_plus, with their clamp
    debiased        DCL, Chuang et al. 2020: HCL with beta = 0

Selection strategies return 0/1 weights computed without gradient; `hard`/`debiased` return
`log_mass`, their estimate of the negatives' mass, which carries gradient like their published
losses. Every strategy keeps all entries (except the query's own image) until the bank is full
when `warmup` is on.
"""

from __future__ import annotations

import math

import torch

from mcl.mining.base import MiningContext, NegativeSelection

RANK_BY = ("key", "query")


def keep_all(ctx: MiningContext, exclude_self: bool) -> NegativeSelection:
    """Every entry except, with exclude_self, those of the query's own image (what `all` does)."""
    return NegativeSelection(weight=None if not exclude_self else (~ctx.self_mask).to(ctx.bank_sim.dtype))


def rank_band(sim: torch.Tensor, start: int, end: int, exclude: torch.Tensor | None) -> torch.Tensor:
    """B x K float mask: 1 for the entries whose descending rank lies in [start, end), 0 elsewhere.

    sim: B x K (no gradient); exclude: B x K bool, always 0 and ranked after every other entry.
    Two unsorted top-k selections, not a sort of all K: the top `end`, then its top `start` (the
    head) dropped again; exactly end - start entries a row, ties or not.
    """
    if exclude is not None:
        sim = sim.masked_fill(exclude, float("-inf"))
    top_sim, top = sim.topk(end, dim=1, sorted=False)  # B x end
    keep = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, top, True)
    if start > 0:
        head = top.gather(1, top_sim.topk(start, dim=1, sorted=False).indices)  # B x start
        keep.scatter_(1, head, False)
    if exclude is not None:
        keep &= ~exclude
    return keep.to(sim.dtype)


def reference_sim(ctx: MiningContext, rank_by: str) -> torch.Tensor:
    """B x K similarity (no gradient) to the positive k_i (`key`) or to the query (`query`)."""
    return (ctx.key_bank_sim if rank_by == "key" else ctx.bank_sim).detach()


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"mining.negative.{name} must be one of {choices}, got {value!r}")


class RankBand:
    """Shared by `gradient` and `ring`: keep the descending ranks [start, end) of `ranking(ctx)`,
    with the edges of `edges(K, progress)`; subclasses set exclude_self and warmup."""

    exclude_self: bool
    warmup: bool

    def edges(self, bank_size: int, progress: float) -> tuple[int, int]:
        raise NotImplementedError

    def ranking(self, ctx: MiningContext) -> torch.Tensor:
        raise NotImplementedError

    def check_keeps_some(self, kind: str, bank_size: int, knobs: str) -> None:
        """Raise ValueError if the band is empty at the start or the end of training."""
        for progress in (0.0, 1.0):
            lo, hi = self.edges(bank_size, progress)
            if hi - lo < 1:
                raise ValueError(f"{knobs}: the {kind} [{lo}, {hi}) keeps zero negatives of the {bank_size} candidates")

    def __call__(self, ctx: MiningContext) -> NegativeSelection:
        if self.warmup and not ctx.bank_full:
            return keep_all(ctx, self.exclude_self)
        start, end = self.edges(ctx.bank_sim.shape[1], ctx.progress)
        exclude = ctx.self_mask if self.exclude_self else None
        return NegativeSelection(weight=rank_band(self.ranking(ctx), start, end, exclude))


class GradientBandNegatives(RankBand):
    """`mining.negative=gradient` (the paper's): keep the negatives neither too hard nor too easy.

    Rank the K bank entries of query i by similarity to its positive k_i (rank_by=key; or to
    the query, rank_by=query), most similar first, and keep ranks [start, end): the head
    [0, start) holds the probable false negatives, the tail [end, K) the easy negatives whose
    softmax probability, hence gradient, is ~0.

    start, end:   band edges, fractions of K (unit=fraction, rounded to ranks) or ranks (unit=rank).
                  Defaults 0.02 / 0.5: the head is a few times the share of one CIFAR-100 class in
                  the bank (1 %); the easy half carries a small share of the gradient mass. As
                  fractions they fit any queue size, so no other override is needed. The
                  `mining/neg_*` diagnostics show what a choice does; the ablations decide.
    final_start, final_end: edges at the end of training, linearly annealed from start/end with
                  the training progress; null keeps the edge fixed.
    rank_by:      `key` (the positive, as in the paper) or `query`.
    exclude_self: the query's own image is never a negative (and ranks last).
    warmup:       keep every negative until the bank holds real keys.

    Call: ctx -> NegativeSelection(weight B x K in {0, 1}).
    """

    def __init__(
        self,
        start: float,
        end: float,
        unit: str = "fraction",
        final_start: float | None = None,
        final_end: float | None = None,
        rank_by: str = "key",
        exclude_self: bool = True,
        warmup: bool = True,
    ):
        self.start, self.end, self.unit = start, end, unit
        self.final_start = start if final_start is None else final_start
        self.final_end = end if final_end is None else final_end
        self.rank_by, self.exclude_self, self.warmup = rank_by, exclude_self, warmup

    def edges(self, bank_size: int, progress: float) -> tuple[int, int]:
        """The band [start, end) as ranks at training progress in [0, 1]."""
        start = self.start + progress * (self.final_start - self.start)
        end = self.end + progress * (self.final_end - self.end)
        if self.unit == "fraction":
            return round(start * bank_size), round(end * bank_size)
        return round(start), round(end)

    def validate(self, bank_size: int) -> None:
        """Raise ValueError if a band edge is out of order or outside the bank, or keeps nothing."""
        check_choice("unit", self.unit, ("fraction", "rank"))
        check_choice("rank_by", self.rank_by, RANK_BY)
        limit = 1.0 if self.unit == "fraction" else bank_size
        for when, (lo, hi) in (("start", ("start", "end")), ("end", ("final_start", "final_end"))):
            a, b = getattr(self, lo), getattr(self, hi)
            if not 0 <= a < b <= limit:
                raise ValueError(
                    f"mining.negative.{lo}={a}, mining.negative.{hi}={b}: the band kept at the {when} of training needs "
                    f"0 <= {lo} < {hi} <= {limit} (mining.negative.unit={self.unit}"
                    + (f", ranks of the {bank_size} candidates)" if self.unit == "rank" else ": fractions of the candidates)")
                )
        knobs = ", ".join(f"mining.negative.{k}={getattr(self, k)}" for k in ("start", "end", "final_start", "final_end"))
        self.check_keeps_some("band", bank_size, knobs)

    def ranking(self, ctx: MiningContext) -> torch.Tensor:
        return reference_sim(ctx, self.rank_by)


class RingNegatives(RankBand):
    """`mining.negative=ring` (Wu et al. 2021, MoCo-Ring): a percentile ring around the query.

    Sort the bank by similarity to the query, most similar first; the outer ball is the top
    floor(outer * K) entries; the ring drops its closest floor(inner * outer_size) entries
    (as their `dynamic_inner` rule). The outer fraction can shrink during training, from
    `initial_outer` (e.g. 1.0: all negatives) linearly to `outer`; null keeps it fixed.

    outer in (0, 1], inner in [0, 1): defaults 0.1 and 0.1, those of the published code.
    Call: ctx -> NegativeSelection(weight B x K in {0, 1}).
    """

    def __init__(self, outer: float, inner: float, initial_outer: float | None = None, exclude_self: bool = True, warmup: bool = True):
        self.outer, self.inner = outer, inner
        self.initial_outer = outer if initial_outer is None else initial_outer
        self.exclude_self, self.warmup = exclude_self, warmup

    def edges(self, bank_size: int, progress: float) -> tuple[int, int]:
        outer_size = int((self.initial_outer + progress * (self.outer - self.initial_outer)) * bank_size)
        return int(self.inner * outer_size), outer_size

    def validate(self, bank_size: int) -> None:
        for name, value in (("outer", self.outer), ("initial_outer", self.initial_outer)):
            if not 0 < value <= 1:
                raise ValueError(f"mining.negative.{name} must lie in (0, 1], got {value}")
        if not 0 <= self.inner < 1:
            raise ValueError(f"mining.negative.inner must lie in [0, 1), got {self.inner}")
        knobs = ", ".join(f"mining.negative.{k}={getattr(self, k)}" for k in ("outer", "inner", "initial_outer"))
        self.check_keeps_some("ring", bank_size, knobs)

    def ranking(self, ctx: MiningContext) -> torch.Tensor:
        return ctx.bank_sim.detach()  # similarity to the query


class FalseNegativeElimination:
    """`mining.negative=fn_elimination` (Huynh et al. 2022, elimination variant): drop the bank
    entries whose cosine similarity to the positive k_i (compare_to=key, their support view; or
    to the query) exceeds `threshold`; keep all others.

    threshold: in (-1, 1]; 1 drops nothing. Rows may lose every negative if the embedding
    collapses: `mining/neg_kept` shows it.
    Call: ctx -> NegativeSelection(weight B x K in {0, 1}).
    """

    def __init__(self, threshold: float, compare_to: str = "key", exclude_self: bool = True, warmup: bool = True):
        self.threshold, self.compare_to, self.exclude_self, self.warmup = threshold, compare_to, exclude_self, warmup

    def validate(self, bank_size: int) -> None:
        check_choice("compare_to", self.compare_to, RANK_BY)
        if not -1.0 < self.threshold <= 1.0:
            raise ValueError(f"mining.negative.threshold must lie in (-1, 1] (at -1 or below no negative is kept), got {self.threshold}")

    def __call__(self, ctx: MiningContext) -> NegativeSelection:
        if self.warmup and not ctx.bank_full:
            return keep_all(ctx, self.exclude_self)
        keep = reference_sim(ctx, self.compare_to) <= self.threshold  # B x K
        if self.exclude_self:
            keep &= ~ctx.self_mask
        return NegativeSelection(weight=keep.to(ctx.bank_sim.dtype))


class DebiasedNegatives:
    """`mining.negative=hard` (HCL) and `mining.negative=debiased` (DCL, beta = 0).

    With s_ij = q_i . bank_j / t over the N_i kept entries (all but the query's own image and the
    entries mined as positives, `ctx.positive`), pos_i = exp(q_i . k_i / t) (in rows where a mined
    positive replaced k_i, `nn` with lam = 0: exp(q_i . n_i / t), the target-weighted mean logit of
    the mined positives, since k_i is no longer in the loss):
        imp_ij = exp(beta * s_ij)                                    importance weights
        R_i    = sum_j imp_ij exp(s_ij) / mean_j imp_ij              reweighted negative mass
        Ng_i   = max((R_i - tau_plus * N_i * pos_i) / (1 - tau_plus), N_i * exp(-1 / t))
    and the loss is -log(pos_i / (pos_i + Ng_i)) (Robinson et al. 2021, eq. and code; DCL is
    beta = 0). Returned as log_mass = log Ng (B), computed in log space in float32; it carries
    gradient, through the importance weights too, as in the published code. Dropped entries are
    masked after scaling (beta * -inf is nan at beta = 0); a row that keeps no entry gets Ng = 0.

    beta:     hardness concentration (HCL: 1.0 on CIFAR; 0 gives DCL).
    tau_plus: class prior, the probability that a negative shares the query's class (0.1).
    Call: ctx -> NegativeSelection(weight B x K in {0, 1}: the entries in the estimate, log_mass B).
    """

    def __init__(self, beta: float, tau_plus: float, exclude_self: bool = True, warmup: bool = True):
        self.beta, self.tau_plus, self.exclude_self, self.warmup = beta, tau_plus, exclude_self, warmup

    def validate(self, bank_size: int) -> None:
        if not 0.0 <= self.tau_plus < 1.0:
            raise ValueError(f"mining.negative.tau_plus must lie in [0, 1), got {self.tau_plus}")
        if self.beta < 0:
            raise ValueError(f"mining.negative.beta must be >= 0, got {self.beta}")
        if self.exclude_self and bank_size < 2:
            raise ValueError(f"mining.negative={type(self).__name__} needs at least 2 candidates, got {bank_size}")

    def __call__(self, ctx: MiningContext) -> NegativeSelection:
        selection = keep_all(ctx, self.exclude_self)
        if self.warmup and not ctx.bank_full:
            return selection
        t = ctx.temperature
        s = ctx.bank_sim.float() / t  # B x K, carries gradient
        keep = torch.ones_like(s, dtype=torch.bool) if selection.weight is None else selection.weight > 0  # B x K
        if ctx.positive is not None:  # mined positives are in Z as positives, not in the negatives' estimate
            keep &= ~ctx.positive
        n = keep.sum(dim=1).to(s.dtype)  # B: N_i
        # a row that keeps nothing is computed over all K (finite values, finite gradient), then given mass 0
        rows = keep | (n == 0)[:, None]  # B x K
        n_rows = rows.sum(dim=1).to(s.dtype)  # B
        # mask after scaling: beta * (-inf) is nan at beta = 0 (DCL)
        log_imp = (self.beta * s).masked_fill(~rows, float("-inf"))  # B x K, log importance weights
        s = s.masked_fill(~rows, float("-inf"))  # B x K
        log_mean_imp = torch.logsumexp(log_imp, dim=1) - n_rows.log()  # B
        log_reweighted = torch.logsumexp(log_imp + s, dim=1) - log_mean_imp  # B: log R_i
        log_pos = (ctx.query.float() * ctx.key.float()).sum(dim=1) / t  # B
        if ctx.replaced is not None:  # lam = 0 (nn): k_i left these rows; their positive is the mined one (weighted mean logit)
            mined_logit = (ctx.replacement_weight * ctx.bank_sim.float()).sum(dim=1) / t  # B
            log_pos = torch.where(ctx.replaced, mined_logit, log_pos)
        log_prior = math.log(self.tau_plus) if self.tau_plus > 0 else float("-inf")
        gap = (log_prior + n_rows.log() + log_pos - log_reweighted).clamp(max=-1e-6)  # B: log(tau_plus N pos / R)
        log_diff = torch.where(gap < -1e-6, log_reweighted + torch.log1p(-gap.exp()), float("-inf"))  # log(R - tau_plus N pos)
        log_floor = n_rows.log() - 1.0 / t  # B: log(N exp(-1/t))
        log_mass = torch.maximum(log_diff - math.log1p(-self.tau_plus), log_floor)  # B
        log_mass = log_mass.masked_fill(n == 0, float("-inf"))  # no negative kept: no negative mass
        return NegativeSelection(weight=keep.to(ctx.bank_sim.dtype), log_mass=log_mass)
