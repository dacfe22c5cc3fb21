"""NNCLR and SNCLR as the lab runs them (`model.candidates=neighbours`): in-batch candidates made of
the batch's keys and their top-k neighbours in the memory bank.

One direction (query view a, key view b), B images, k = topk, n_j1..n_jk the top-k neighbours of
key k_j in the bank as it was before this step's enqueue (cosine similarity, most similar first):

    nnclr  candidates [n_11..n_1k, ..., n_B1..n_Bk]                         logits p_a . c / tau: B x Bk
           loss = 0.5 * ( mean_i -sum_j log softmax_row(logits_i)_(i,j)     the query's own k neighbours,
                                                                            summed, not averaged (the lab's)
                        + mean_(j,m) -log softmax_column(logits_(., (j,m)))_j ) each neighbour finds its query
    snclr  candidates [k_1, n_11..n_1k, ..., k_B, n_B1..n_Bk]               logits p_a . c / tau: B x B(1+k)
           target of query i: 1 on k_i, w_ij = softmax_j(z_a,i . n_ij) on its own neighbours (z_a the
           normalised projection, temperature 1, with gradient as in the lab); threshold: w_ij <= 1/k -> 0
           loss = mean_i -sum_c t_ic log softmax(logits_i)_c

p_a is the normalised prediction of the query view (predictor(z_a)). Both directions read the same
bank; `MCLModule` averages them and enqueues the keys after the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from mcl.bank import MemoryBank
from mcl.mining.diagnostics import NAMES
from mcl.mining.positive import bank_neighbours

RULES = ("nnclr", "snclr")


@dataclass
class Neighbours:
    """The top-k bank neighbours of B keys: keys B x k x D, bank slot B x k, dataset index B x k, label B x k."""

    keys: torch.Tensor
    slot: torch.Tensor
    index: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def search(keys: torch.Tensor, bank: MemoryBank, batch_index: torch.Tensor, topk: int, exclude_self: bool) -> Neighbours:
    """Top-k bank entries by cosine similarity to each key (B x D, normalised), most similar first.

    Ties go to the lower bank slot (torch.topk). Unwritten slots (random unit vectors, index -1) are
    searched too, as in the lab. exclude_self: never an older key of the key's own image.
    """
    exclude = bank.indices[None, :] == batch_index[:, None] if exclude_self else None  # B x K
    _, slot, _ = bank_neighbours(keys @ bank.keys.T, topk, exclude)  # B x k
    return Neighbours(bank.keys[slot], slot, bank.indices[slot], bank.labels[slot])  # B x k x D, B x k, ...


def own_image_candidates(candidate_index: torch.Tensor, batch_index: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """B x C bool: candidates that are a key of query i's own image but not one of its targets.

    candidate_index: C dataset indices; batch_index: B; target: B x C bool.
    """
    return (candidate_index[None, :] == batch_index[:, None]) & ~target


def nnclr_loss(
    p: torch.Tensor, neighbours: torch.Tensor, tau: float, index: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """NNCLR, one direction, the lab's two-sided form.

    p: B x D normalised predictions; neighbours: B x k x D normalised, those of key j in row j.
    index: (batch index B, neighbours' dataset index B x k) to drop a query's own image from its
    normaliser (exclude_self), or None (the lab).
    """
    b, k, _ = neighbours.shape
    logits = p @ neighbours.flatten(0, 1).T / tau  # B x Bk
    owner = torch.arange(b, device=p.device).repeat_interleave(k)  # Bk: the key each neighbour belongs to
    target = owner[None, :] == torch.arange(b, device=p.device)[:, None]  # B x Bk
    if index is not None:
        logits = logits.masked_fill(own_image_candidates(index[1].flatten(), index[0], target), float("-inf"))
    own = torch.diagonal(F.log_softmax(logits, dim=1).view(b, b, k), dim1=0, dim2=1)  # k x B: query i's log p of its own k neighbours
    rows = -own.sum(dim=0).mean()  # each query: its k neighbours (a diagonal view, not a boolean mask: no nonzero)
    columns = F.cross_entropy(logits.T, owner)  # each neighbour: its own query among the B
    return 0.5 * (rows + columns)


def snclr_weights(z: torch.Tensor, neighbours: torch.Tensor, threshold: bool) -> torch.Tensor:
    """B x k soft targets of the query's own neighbours: softmax of cos(z_i, n_ij) (temperature 1).

    z: B x D projections of the queries (normalised here; gradient flows through, as in the lab).
    threshold: zero the weights <= 1/k (kept weights are not renormalised, as in the lab).
    """
    weight = torch.softmax(torch.einsum("bd,bkd->bk", F.normalize(z, dim=1), neighbours), dim=1)  # B x k
    if threshold:
        weight = weight * (weight > 1.0 / neighbours.shape[1])
    return weight


def snclr_loss(
    p: torch.Tensor,
    z: torch.Tensor,
    keys: torch.Tensor,
    neighbours: torch.Tensor,
    tau: float,
    threshold: bool,
    index: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SNCLR, one direction. Returns the loss and the neighbours' weights (B x k).

    p: B x D normalised predictions; z: B x D projections of the same views; keys: B x D normalised
    keys of the other view; neighbours: B x k x D normalised, those of key j in row j; index:
    (batch index B, neighbours' dataset index B x k) to drop a query's own image from its
    normaliser (exclude_self), or None (the lab).
    """
    b, k, _ = neighbours.shape
    candidates = torch.cat([keys[:, None], neighbours], dim=1)  # B x (1+k) x D: key j, then its neighbours
    logits = p @ candidates.flatten(0, 1).T / tau  # B x B(1+k)
    weight = snclr_weights(z, neighbours, threshold)  # B x k
    blocks = torch.cat([torch.ones_like(weight[:, :1]), weight], dim=1)  # B x (1+k): [1 | w_i]
    target = torch.diag_embed(blocks.T, dim1=0, dim2=1).flatten(1)  # B x B(1+k): [i, j, :] = [1 | w_i] if i == j else 0
    if index is not None:
        eye = torch.eye(b, dtype=torch.bool, device=p.device)  # B x B
        own_block = eye[:, :, None].expand(b, b, 1 + k).flatten(1)  # B x B(1+k): query i's own key and neighbours
        candidate_index = torch.cat([index[0][:, None], index[1]], dim=1).flatten()  # B(1+k)
        logits = logits.masked_fill(own_image_candidates(candidate_index, index[0], own_block), float("-inf"))
    log_prob = F.log_softmax(logits, dim=1).masked_fill(target == 0, 0.0)  # 0 * -inf would be nan
    return -(target * log_prob).sum(dim=1).mean(), weight


@torch.no_grad()
def neighbour_diagnostics(weight: torch.Tensor, neighbour_labels: torch.Tensor, query_labels: torch.Tensor) -> torch.Tensor:
    """2 x len(NAMES) sums and counts on the device, as `diagnostic_sums` (for `MiningMeter`), without a host read:
    pos_kept: neighbours with target weight > 0, per query; pos_purity: share of those with the
    query's label (unknown labels -1 not counted); the negative diagnostics are undefined (count 0).
    weight, neighbour_labels: B x k; query_labels: B."""
    kept = weight > 0  # B x k
    among = kept & (neighbour_labels >= 0) & (query_labels[:, None] >= 0)
    out = weight.new_zeros(2, len(NAMES))
    out[:, NAMES.index("pos_kept")] = torch.stack([kept.sum().float(), weight.new_full((), weight.shape[0])])  # a fill, not a copy
    out[:, NAMES.index("pos_purity")] = torch.stack([((neighbour_labels == query_labels[:, None]) & among).sum(), among.sum()]).float()
    return out


class NeighbourContrast:
    """`model.candidates=neighbours`: the symmetric NNCLR or SNCLR loss (knobs under `model.neighbours`).

    rule:         nnclr | snclr (see the module docstring).
    topk:         neighbours per key (k). NNCLR: 1 (top-5 variant: 5); SNCLR: 5.
    threshold:    snclr: zero the soft weights <= 1/k (the "soft + hard" rule); false in the lab's runs.
    exclude_self: an older key of the query's own image is never its neighbour, nor in its normaliser.
                  The lab does not exclude them (false reproduces it to the last bit).
    """

    def __init__(self, rule: str, topk: int, threshold: bool, exclude_self: bool):
        if rule not in RULES:
            raise ValueError(f"model.neighbours.rule must be one of {RULES}, got {rule!r}")
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"model.neighbours.topk must be a positive integer, got {topk!r}")
        self.rule, self.topk, self.threshold, self.exclude_self = rule, topk, bool(threshold), bool(exclude_self)

    def validate(self, bank_size: int) -> None:
        if self.topk > bank_size:
            raise ValueError(f"model.neighbours.topk={self.topk} must be at most model.queue_size={bank_size}")

    def direction(
        self, p: torch.Tensor, z: torch.Tensor, key: torch.Tensor, bank: MemoryBank, index: torch.Tensor, tau: float
    ) -> tuple[torch.Tensor, torch.Tensor, Neighbours]:
        """One direction: query predictions p, projections z (B x D), keys of the other view (B x D, normalised)."""
        nn = search(key.detach(), bank, index, self.topk, self.exclude_self)  # B x k
        own = (index, nn.index) if self.exclude_self else None
        if self.rule == "nnclr":
            return nnclr_loss(p, nn.keys, tau, own), torch.ones_like(nn.slot, dtype=p.dtype), nn
        loss, weight = snclr_loss(p, z, key, nn.keys, tau, self.threshold, own)
        return loss, weight, nn

    def __call__(
        self, views: tuple[tuple[torch.Tensor, ...], ...], bank: MemoryBank, index: torch.Tensor, labels: torch.Tensor, tau: float
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """views: ((p1, z1, k2), (p2, z2, k1)), each B x D. Returns the mean loss of both directions and
        each direction's `neighbour_diagnostics` (labels B, read for the diagnostics only).

        Runs in float32 under mixed precision (bf16/fp16 inputs are cast up), as `MCLModule.contrast`.
        """
        losses, stats = [], []
        for view in views:
            with torch.autocast(index.device.type, enabled=False):
                p, z, key = (t.float() if t.element_size() < 4 else t for t in view)
                loss, weight, nn = self.direction(p, z, key, bank, index, tau)
            losses.append(loss)
            stats.append(neighbour_diagnostics(weight.detach(), nn.labels, labels))
        return 0.5 * (losses[0] + losses[1]), stats
