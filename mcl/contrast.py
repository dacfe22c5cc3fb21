"""One direction of the loss: a query against [its own key | candidates], with the targets of the
positive strategy, the normaliser weights of the negative strategy and an objective.

For query i (q_i normalised, B x D), its key k_i (the other view) and candidates c_1..c_K (K x D):

    sim_i    = [q_i . k_i | q_i . c]                                             B x (1+K)
    targets  t_i = lam * onehot(k_i) + (1 - lam) * w_i                            positive mining (`build_targets`)
             CMSF (aux): 0.5 * (t_i + t'_i), t' mined by an auxiliary view's key in an auxiliary bank
    infonce  loss = mean_i -sum_j t_ij log softmax_j(sim_i / tau + log w^neg_i)   negative mining: w^neg (mcl.loss)
    regression loss = mean_i sum_j t_ij (2 - 2 sim_ij)                            BYOL (t = onehot), MSF (key + neighbours)

With model.candidates=neighbours the direction is NNCLR's or SNCLR's own loss (`neighbour_contrast`,
mcl.neighbours). The candidates are otherwise the memory bank (MoCo; no gradient) or both views of the global batch (SimCLR;
with gradient). Everything here runs in float32 under mixed precision: B x K similarities in bf16
would round the logits (and the mining ranks) to 2-3 significant digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from mcl.bank import MemoryBank
from mcl.loss import weighted_infonce, weighted_regression
from mcl.mining.base import MiningContext, NegativeSelection, PositiveSelection, select
from mcl.neighbours import NeighbourContrast, neighbour_diagnostics

OBJECTIVES = ("infonce", "regression")


@dataclass
class Candidates:
    """The K entries a query is contrasted with: keys K x D, dataset index K and label K (-1 unknown)."""

    keys: torch.Tensor
    index: torch.Tensor
    labels: torch.Tensor
    full: bool = True  # every entry is a real key (the mining warm-up waits for this)


@dataclass
class Direction:
    """What one direction computed: the loss, the mining's view of it, both selections and the targets (or None)."""

    loss: torch.Tensor
    ctx: MiningContext
    pos: PositiveSelection
    neg: NegativeSelection
    targets: torch.Tensor | None


def float32(t: torch.Tensor) -> torch.Tensor:
    """t in float32 at least: bf16/fp16 cast up, float32 and float64 as they are."""
    return t if t.element_size() >= 4 else t.float()


def build_targets(pos: PositiveSelection, num_bank: int, like: torch.Tensor) -> torch.Tensor | None:
    """B x (1+K) targets: lam on the augmented positive, (1-lam)*weight on the mined bank entries.

    None when nothing was mined: the loss is then MoCo's cross-entropy on column 0 (BYOL's 2 - 2 p.k).
    lam: a float, or B x 1 (relational targets); rows where nothing was mined get lam = 1.
    """
    if pos.index.shape[1] == 0:
        return None
    targets = like.new_zeros(like.shape[0], 1 + num_bank)
    mined = pos.weight.sum(dim=1, keepdim=True) > 0  # B x 1; rows where something was mined
    lam = pos.lam.to(like.dtype) if isinstance(pos.lam, torch.Tensor) else torch.full_like(mined, pos.lam, dtype=like.dtype)
    lam = torch.where(mined, lam, torch.ones_like(mined, dtype=like.dtype))
    targets[:, :1] = lam
    targets[:, 1:].scatter_add_(1, pos.index, (1.0 - lam) * pos.weight)
    return targets


def mining_context(q: torch.Tensor, k: torch.Tensor, index: torch.Tensor, c: Candidates, tau: float, progress: float) -> MiningContext:
    """What the mining strategies see: q, k B x D normalised, index B dataset indices, the candidates c."""
    return MiningContext(
        query=q,
        key=k,
        bank_keys=c.keys,
        bank_sim=q @ c.keys.T,  # B x K
        bank_index=c.index,
        batch_index=index,
        temperature=tau,
        bank_full=c.full,
        progress=progress,
    )


def contrast(
    q: torch.Tensor,
    k: torch.Tensor,
    index: torch.Tensor,
    candidates: Candidates,
    positive,
    negative,
    objective: str,
    tau: float,
    progress: float = 0.0,
    aux: tuple[torch.Tensor, Candidates] | None = None,
) -> Direction:
    """One direction. q, k: B x D normalised; index: B dataset indices; candidates: K entries.

    aux (CMSF): an auxiliary view's keys (B x D) and the auxiliary bank (K entries, slot j the same
    image as the candidates' slot j): its mined targets are averaged with the key's.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k = float32(q), float32(k)
        c = Candidates(float32(candidates.keys), candidates.index, candidates.labels, candidates.full)
        ctx = mining_context(q, k, index, c, tau, progress)
        pos, neg = select(ctx, positive, negative)
        sim = torch.cat([(q * k).sum(1, keepdim=True), ctx.bank_sim], dim=1)  # B x (1+K)
        targets = build_targets(pos, c.keys.shape[0], sim)
        if aux is not None:
            aux_keys, aux_bank = float32(aux[0]), aux[1]
            aux_ctx = mining_context(
                q, aux_keys, index, Candidates(float32(aux_bank.keys), c.index, c.labels, aux_bank.full), tau, progress
            )
            aux_ctx.bank_sim, aux_ctx.keep = ctx.bank_sim, ctx.keep  # only the neighbour search reads the auxiliary bank
            with torch.no_grad():
                aux_targets = build_targets(positive(aux_ctx), c.keys.shape[0], sim)
            if targets is not None and aux_targets is not None:  # both warm up together: the banks fill together
                targets = 0.5 * (targets + aux_targets)
        if objective == "regression":
            return Direction(weighted_regression(sim, targets), ctx, pos, neg, targets)
        log_weight = None
        if neg.weight is not None:
            weight = neg.weight if ctx.positive is None else neg.weight.masked_fill(ctx.positive, 1.0)  # mined positives stay in Z
            log_weight = F.pad(weight.log(), (1, 0))  # B x (1+K), 0 for the augmented positive
        if not isinstance(pos.lam, torch.Tensor) and pos.lam == 0 and targets is not None:
            # NNCLR, ReSSL: where something was mined, k_i has no target and is no candidate at all
            augmented = F.pad((targets[:, :1] > 0).to(sim.dtype).log(), (0, c.keys.shape[0]))  # B x (1+K): -inf on k_i if mined
            log_weight = augmented if log_weight is None else log_weight + augmented
        loss = weighted_infonce(sim / tau, targets, log_weight, neg.log_mass)
    return Direction(loss, ctx, pos, neg, targets)


def neighbour_contrast(
    rule: NeighbourContrast,
    p: torch.Tensor,
    z: torch.Tensor,
    k: torch.Tensor,
    bank: MemoryBank,
    index: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of NNCLR / SNCLR (p, z: the query view's prediction and projection, k: the other view's
    key, B x D each), in float32 under mixed precision. Returns the loss and `neighbour_diagnostics` (2 x N)."""
    with torch.autocast(index.device.type, enabled=False):
        p, z, k = float32(p), float32(z), float32(k)
        loss, weight, nn = rule.direction(p, z, k, bank, index, tau)
    return loss, neighbour_diagnostics(weight.detach(), nn.labels, labels)
