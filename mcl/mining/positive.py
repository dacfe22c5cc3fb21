"""Positive mining: extra positives taken from the memory bank (`mining.positive=...`).

All strategies here share one rule for *which* bank entries are candidates: the top-k
neighbours of the key k_i (the other view, key encoder) among the bank as it was before this
step's enqueue, never an entry of the same image (`exclude_self`). They differ in the weights,
computed from the similarity s_ij of the neighbours to the query (weights_from=query, the
default: the lab's SNCLR) or to the key (weights_from=key):

    nn         top-1 neighbour replaces k_i (NNCLR; lam = 0)
    soft       w_ij = softmax_j(s_ij / weight_temperature)                   (SNCLR's soft weights)
    hard       w_ij = 1 / #passing for the neighbours that pass the hard rule, else 0
    soft_hard  the soft weights, the hard rule (w_ij > 1/k) zeroes the weak ones, not
               renormalised: the lab's SNCLR "soft + hard" rule (network/SNCLR.py, threshold=True)

With weights_from=query the soft weights carry the query's gradient, as in the lab's SNCLR.
The module turns a `PositiveSelection` into the target row
    t_i = lam * onehot(k_i) + (1 - lam) * w_i        over [k_i | bank]
so lam = 1 (or nothing mined, e.g. during warm-up) is plain MoCo v2.
"""

from __future__ import annotations

import torch

from mcl.mining.base import MiningContext, PositiveSelection, no_positive

HARD_RULES = ("above_mean", "threshold")
WEIGHTS_FROM = ("query", "key")


def bank_neighbours(key_bank_sim: torch.Tensor, topk: int, exclude: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Top-k bank entries by similarity to the key, most similar first.

    key_bank_sim: B x K; exclude: B x K bool (entries that may not be neighbours) or None.
    Returns sim (B x k), index (B x k bank columns), valid (B x k bool: False where only
    excluded entries were left to fill the k slots).
    """
    if exclude is not None:
        key_bank_sim = key_bank_sim.masked_fill(exclude, float("-inf"))
    sim, index = key_bank_sim.topk(topk, dim=1)  # B x k each
    return sim, index, torch.isfinite(sim)


def normalise_rows(weight: torch.Tensor) -> torch.Tensor:
    """Rows scaled to sum to 1; all-zero rows stay zero (nothing mined for that query)."""
    total = weight.sum(dim=1, keepdim=True)  # B x 1
    return torch.where(total > 0, weight / total.clamp_min(torch.finfo(weight.dtype).tiny), weight)


def soft_weights(sim: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """B x k softmax of sim / temperature over the valid neighbours (0 elsewhere; a row without one is all 0).

    Differentiable in sim: a row with no valid neighbour is computed on finite logits and zeroed, so
    its gradient is 0, not nan.
    """
    logits = (sim / temperature).masked_fill(~valid, float("-inf"))  # B x k
    logits = torch.where(valid.any(dim=1, keepdim=True), logits, 0.0)
    return torch.softmax(logits, dim=1) * valid


def hard_rule(sim: torch.Tensor, soft: torch.Tensor, valid: torch.Tensor, rule: str, threshold: float) -> torch.Tensor:
    """B x k bool: the neighbours that pass the hard rule.

    above_mean: soft weight > 1 / (number of valid neighbours, k), more than a uniform share: the lab's
                SNCLR threshold (`cross_attn > 1 / topk`); equal similarities keep none.
    threshold:  cosine similarity (sim: to the query or the key, as the weights) >= threshold.
    """
    if rule == "above_mean":
        count = valid.sum(dim=1, keepdim=True).clamp_min(1)  # B x 1
        return valid & (soft > 1.0 / count)
    if rule == "threshold":
        return valid & (sim >= threshold)
    raise ValueError(f"mining.positive.hard_rule must be one of {HARD_RULES} or null, got {rule!r}")


class NeighbourPositives:
    """Top-k neighbours of the key in the bank as extra positives, with soft and/or hard weights.

    topk:               neighbours per query (k), searched by the key. 5 in the lab protocol.
    lam:                target weight of the augmented positive k_i; 1 - lam goes to the mined ones.
                        At lam = 0.5 the soft_hard row is half the lab's SNCLR target [1 | w_i].
    soft:               weight neighbours by softmax(s_ij / weight_temperature) (else equally).
    hard_rule:          null, `above_mean` (w_ij > 1/k) or `threshold`: neighbours failing it get weight 0.
    threshold:          cosine similarity for hard_rule=threshold.
    weight_temperature: temperature of the soft weights (tau_w): 1 in the lab's SNCLR.
    weights_from:       `query`: s_ij = cos(q_i, n_ij), with the query's gradient (the lab's SNCLR: its
                        z_q is the query's projection; on the MoCo base without a predictor ctx.query is
                        that projection, normalised; with model.predictor=true it is the prediction);
                        `key`: s_ij = cos(k_i, n_ij), no gradient (the rule mcl used before).
    renormalise:        scale each row's kept weights to sum to 1 (the lab does not: its soft + hard
                        weights sum to at most 1); `hard` sets it, so its equal weights are 1 / #passing.
    exclude_self:       never mine an entry that came from the query's own image.
    warmup:             mine nothing until every bank slot holds a real key (the bank starts as
                        random vectors: neighbours in it are noise).

    Call: ctx (B queries, K bank entries) -> PositiveSelection(index B x k, weight B x k, lam),
    weight rows summing to at most 1 (exactly 1 with renormalise), 0 where no neighbour survived.
    """

    def __init__(
        self,
        topk: int,
        lam: float,
        soft: bool,
        hard_rule: str | None = None,
        threshold: float = 0.5,
        weight_temperature: float = 1.0,
        weights_from: str = "query",
        renormalise: bool = False,
        exclude_self: bool = True,
        warmup: bool = True,
    ):
        self.topk, self.lam, self.soft, self.hard_rule = topk, lam, soft, hard_rule
        self.threshold, self.weight_temperature = threshold, weight_temperature
        self.weights_from, self.renormalise = weights_from, renormalise
        self.exclude_self, self.warmup = exclude_self, warmup

    @property
    def differentiable(self) -> bool:
        """The weights carry the query's gradient (soft weights from the query): `select` runs this with gradient."""
        return self.soft and self.weights_from == "query"

    def validate(self, bank_size: int) -> None:
        """Raise ValueError if this strategy cannot run on `bank_size` candidates (bank entries or batch keys)."""
        if not 1 <= self.topk <= bank_size:
            raise ValueError(f"mining.positive.topk={self.topk} must lie in [1, {bank_size}], the number of candidates")
        if self.hard_rule is not None and self.hard_rule not in HARD_RULES:
            raise ValueError(f"mining.positive.hard_rule must be one of {HARD_RULES} or null, got {self.hard_rule!r}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"mining.positive.lam must lie in [0, 1], got {self.lam}")
        if self.weight_temperature <= 0:
            raise ValueError(f"mining.positive.weight_temperature must be > 0, got {self.weight_temperature}")
        if self.weights_from not in WEIGHTS_FROM:
            raise ValueError(f"mining.positive.weights_from must be one of {WEIGHTS_FROM}, got {self.weights_from!r}")

    def __call__(self, ctx: MiningContext) -> PositiveSelection:
        if self.warmup and not ctx.bank_full:
            index = no_positive(ctx)  # B x 0: plain MoCo until the bank holds real keys
            return PositiveSelection(index=index, weight=ctx.query.new_zeros(index.shape), lam=1.0)
        key_bank_sim = ctx.key_bank_sim.detach()
        sim, index, valid = bank_neighbours(key_bank_sim, self.topk, ctx.self_mask if self.exclude_self else None)  # B x k, by the key
        if self.weights_from == "query":
            sim = ctx.bank_sim.gather(1, index)  # B x k: cos(q_i, n_ij), with the query's gradient
        soft = soft_weights(sim, valid, self.weight_temperature)  # B x k
        weight = soft if self.soft else valid.to(soft.dtype)
        if self.hard_rule is not None:
            weight = weight * hard_rule(sim.detach(), soft.detach(), valid, self.hard_rule, self.threshold)
        return PositiveSelection(index=index, weight=normalise_rows(weight) if self.renormalise else weight, lam=self.lam)


class NearestNeighbourPositive(NeighbourPositives):
    """`mining.positive=nn` (NNCLR): the top-1 neighbour n_i of k_i replaces k_i as the positive.

    lam: 0 in NNCLR: the neighbour is the only target and, as in NNCLR, k_i is no candidate: it
         leaves the normaliser of every row where a neighbour was mined (rows where nothing was
         mined, e.g. during warm-up, keep k_i as their target). With 0 < lam the two are mixed.
    """

    def __init__(self, lam: float = 0.0, exclude_self: bool = True, warmup: bool = True):
        super().__init__(topk=1, lam=lam, soft=False, renormalise=True, exclude_self=exclude_self, warmup=warmup)
