"""InfoNCE over [augmented positive | memory bank] with soft targets and per-negative weights.

Every mining strategy plugs into this one loss: positive mining changes the targets, negative
mining changes the per-entry weights of the normaliser (or, for the debiased estimators,
replaces the negatives' mass altogether).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def weighted_infonce(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    log_weight: torch.Tensor | None = None,
    neg_log_mass: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over rows of  -sum_j t_ij * (l_ij - log Z_i).

    logits:       B x (1+K), [s(q, k) | s(q, bank)] / tau.
    targets:      B x (1+K), rows sum to 1; None means one-hot on column 0 (plain MoCo).
    log_weight:   B x (1+K), added to the logits inside Z only: 0 keeps an entry, -inf drops
                  it, log w reweights it (HCL importance weights). Must be 0 where t_ij > 0.
    neg_log_mass: B, optional log of the negatives' mass (DCL/HCL debiased estimators);
                  then Z_i = sum_{j: t_ij > 0} exp(l_ij) + exp(neg_log_mass_i).
    With targets=None and no weights this is exactly F.cross_entropy(logits, 0).
    """
    weighted = logits if log_weight is None else logits + log_weight
    if targets is None and neg_log_mass is None:  # plain MoCo: the column-0 cross-entropy itself
        return F.cross_entropy(weighted, logits.new_zeros(logits.shape[0], dtype=torch.long))
    if targets is None:
        targets = torch.zeros_like(logits)
        targets[:, 0].fill_(1.0)  # a fill: setitem of a Python number would make a tensor of it
    if neg_log_mass is not None:
        positives = logits.masked_fill(targets <= 0, float("-inf"))  # B x (1+K)
        log_z = torch.logaddexp(torch.logsumexp(positives, dim=1), neg_log_mass)  # B
        log_prob = logits - log_z[:, None]
    else:
        log_prob = F.log_softmax(weighted, dim=1)  # B x (1+K)
    # 0 * -inf is nan: entries without target mass contribute exactly zero
    per_row = -(targets * log_prob.masked_fill(targets <= 0, 0.0)).sum(dim=1)  # B
    return per_row.mean()


def weighted_regression(sim: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of  sum_j t_ij * (2 - 2 s_ij): BYOL's normalised squared distance to each target.

    sim:     B x (1+K) cosine similarities [p_i . k_i | p_i . candidates] of the normalised prediction.
    targets: B x (1+K), rows summing to 1; None is one-hot on column 0: BYOL, 2 - 2 p_i . k_i.
             MSF: 1/(1+k) on k_i and on each of its k bank neighbours.
    """
    if targets is None:
        return (2.0 - 2.0 * sim[:, 0]).mean()
    return (targets * (2.0 - 2.0 * sim)).sum(dim=1).mean()
