"""Relational positives: soft targets over the whole bank from the key's similarities (SCE, ReSSL).

For query i with key k_i, bank entries b_1..b_K (those the negative strategy keeps, `ctx.keep`) and
teacher temperature tau_t:

    ressl (positive_logit=false)  w_ij = softmax_j(k_i . b_j / tau_t)                      target on the bank only
    sce   (positive_logit=true)   p_i = softmax([0 | k_i . b / tau_t])                     B x (1+K): SCE's 0 logit for k_i
                                  t_i = lam * onehot(k_i) + (1 - lam) * p_i                (the lab's coeff, lam = 0.5)

The module's target row is t_i = lam_i * onehot(k_i) + (1 - lam_i) * w_i over [k_i | bank]: for SCE
lam_i = lam + (1 - lam) p_i0 (a B x 1 tensor) and w_i = p_i,1: / (1 - p_i0); for ReSSL lam = 0, so k_i
has no target and leaves the normaliser (the lab's ReSSL has no positive column). The student side
is the objective's own: InfoNCE at model.temperature (0.1 in both).
Unlike neighbour positives, these entries are not protected from the negative strategy: it runs
first (`after_negatives`) and the targets spread over the entries it keeps, so a band of negatives
(`mining.negative=gradient`) is a band of relational targets too.
"""

from __future__ import annotations

import torch

from mcl.mining.base import MiningContext, PositiveSelection, no_positive
from mcl.mining.positive import normalise_rows


class RelationalPositives:
    """`mining.positive=sce` / `ressl`: every kept bank entry is a soft positive, weighted by the key.

    temperature:    teacher temperature tau_t (SCE 0.05, ReSSL 0.04).
    lam:            target weight of the augmented positive before SCE's 0 logit adds its share (SCE 0.5, ReSSL 0).
    positive_logit: SCE: the teacher softmax has a 0 logit for k_i; ReSSL: the bank only.
    warmup:         plain targets (nothing mined) until every bank slot holds a real key.

    Call: ctx (B queries, K bank entries) -> PositiveSelection(index B x K (every entry), weight B x K, lam).
    """

    after_negatives = True

    def __init__(self, temperature: float, lam: float, positive_logit: bool, warmup: bool = True):
        self.temperature, self.lam, self.positive_logit, self.warmup = temperature, float(lam), bool(positive_logit), warmup

    def validate(self, bank_size: int) -> None:
        if self.temperature <= 0:
            raise ValueError(f"mining.positive.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"mining.positive.lam must lie in [0, 1], got {self.lam}")

    def __call__(self, ctx: MiningContext) -> PositiveSelection:
        if self.warmup and not ctx.bank_full:
            index = no_positive(ctx)  # B x 0: the objective's plain targets until the bank holds real keys
            return PositiveSelection(index=index, weight=ctx.query.new_zeros(index.shape), lam=1.0)
        logits = ctx.key_bank_sim.detach() / self.temperature  # B x K
        if ctx.keep is not None:
            logits = logits.masked_fill(~ctx.keep, float("-inf"))  # dropped entries get no target mass
        b, k = logits.shape
        index = torch.arange(k, device=logits.device).expand(b, k)  # B x K: every entry
        if not self.positive_logit:
            weight = torch.softmax(logits, dim=1).nan_to_num(0.0)  # B x K; a row with nothing kept is all nan
            return PositiveSelection(index=index, weight=weight, lam=self.lam, protect=False)
        p = torch.softmax(torch.nn.functional.pad(logits, (1, 0)), dim=1)  # B x (1+K), logit 0 for k_i
        lam = self.lam + (1.0 - self.lam) * p[:, :1]  # B x 1: lam plus SCE's own share on k_i
        return PositiveSelection(index=index, weight=normalise_rows(p[:, 1:]), lam=lam, protect=False)
