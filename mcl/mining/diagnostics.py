"""What the mining did, measured with labels (logged as `mining/*`, never used for training).

A bank entry and a query are a *false pair* when they share a class; entries or queries
without a label (-1: unwritten bank slots, unlabelled images) count in no share.
"""

from __future__ import annotations

import torch
from torch import nn

from mcl.mining.base import MiningContext, NegativeSelection, PositiveSelection, mined_mask

NAMES = (
    "pos_kept",
    "pos_purity",
    "neg_kept",
    "neg_fn_kept",
    "neg_fn_dropped",
    "neg_grad_share_kept",
    "neg_sim_kept",
    "neg_sim_dropped",
    "target_purity",
    "target_entropy",
)


@torch.no_grad()
def diagnostic_sums(
    ctx: MiningContext,
    pos: PositiveSelection,
    neg: NegativeSelection,
    query_labels: torch.Tensor,
    bank_labels: torch.Tensor,
    negatives: bool = True,
) -> torch.Tensor:
    """2 x len(NAMES) on the device, without a host read: row 0 the sums, row 1 the counts; each
    diagnostic is sum / count, defined where count > 0 (see `mining_diagnostics` for the names).

    query_labels: B; bank_labels: K (-1 = unknown). negatives=False (an objective without negatives,
    BYOL's regression): the neg_* diagnostics stay undefined.
    """
    sim = ctx.bank_sim.detach().float()  # B x K
    same = query_labels[:, None] == bank_labels[None, :]  # B x K
    labelled = (query_labels[:, None] >= 0) & (bank_labels[None, :] >= 0)  # B x K
    zero = sim.new_zeros(())
    queries = sim.new_full((), sim.shape[0])  # a fill on the device, not a copy of a Python number
    ratios = dict.fromkeys(NAMES, (zero, zero))  # name -> (sum, count)

    mined_kept = pos.weight > 0  # B x m
    if mined_kept.shape[1] > 0:  # a shape, known on the host
        mined_labels = bank_labels[pos.index]  # B x m
        ratios["pos_kept"] = mined_kept.sum(), queries
        among = mined_kept & (mined_labels >= 0) & (query_labels[:, None] >= 0)
        ratios["pos_purity"] = ((mined_labels == query_labels[:, None]) & among).sum(), among.sum()
        lam = pos.lam if isinstance(pos.lam, torch.Tensor) else sim.new_full((sim.shape[0], 1), float(pos.lam))  # B x 1
        mined_rows = pos.weight.sum(dim=1, keepdim=True) > 0  # B x 1; rows without mined weight: all on k_i
        lam = torch.where(mined_rows, lam.float(), 1.0)
        mass = (1.0 - lam) * pos.weight.float()  # B x m: each mined entry's share of the target row
        pure = (mined_labels == query_labels[:, None]) & among  # B x m
        ratios["target_purity"] = (mass * pure).sum(), (mass * among).sum()
        ratios["target_entropy"] = -(torch.special.xlogy(mass, mass).sum() + torch.special.xlogy(lam, lam).sum()), queries

    if not negatives:
        return torch.stack([torch.stack([total.float(), count.float()]) for total, count in ratios.values()], dim=1)  # 2 x N
    positive = mined_mask(pos, same.shape[1])  # B x K: mined entries with target mass are positives, not negatives
    positive = torch.zeros_like(same) if positive is None else positive
    own = ctx.self_mask
    kept = (torch.ones_like(same) if neg.weight is None else neg.weight > 0) & ~positive  # B x K
    dropped = ~kept & ~positive & ~own
    ratios["neg_kept"] = kept.sum(), queries
    for name, among in (("neg_fn_kept", kept & labelled), ("neg_fn_dropped", dropped & labelled)):
        ratios[name] = (same & among).sum(), among.sum()
    prob = torch.softmax((sim / ctx.temperature).masked_fill(own, float("-inf")), dim=1)  # B x K, rows sum to 1
    ratios["neg_grad_share_kept"] = (prob * kept).sum(), queries
    ratios["neg_sim_kept"] = (sim * kept).sum(), kept.sum()  # masked sums: no boolean indexing
    ratios["neg_sim_dropped"] = (sim * dropped).sum(), dropped.sum()
    return torch.stack([torch.stack([total.float(), count.float()]) for total, count in ratios.values()], dim=1)  # 2 x N


@torch.no_grad()
def mining_diagnostics(
    ctx: MiningContext, pos: PositiveSelection, neg: NegativeSelection, query_labels: torch.Tensor, bank_labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Scalars describing one direction of one step (B queries, K bank entries); one host read.

    query_labels: B; bank_labels: K (-1 = unknown). Keys, present when defined:
      pos_kept            mined positives with non-zero target weight, per query
      pos_purity          share of those with the query's label
      neg_kept            negatives in the normaliser, per query (mined positives excluded)
      neg_fn_kept         share of kept negatives with the query's label (false negatives)
      neg_fn_dropped      share of dropped negatives with the query's label (own image excluded)
      neg_grad_share_kept share of the full bank's InfoNCE gradient mass (softmax of s/tau over
                          every entry but the query's own image) carried by the kept negatives
      neg_sim_kept, neg_sim_dropped  mean cosine similarity of kept / dropped negatives to the query
      target_purity       share of the mined target mass (1 - lam) w on entries with the query's label,
                          among labelled ones (SCE, ReSSL: the relational targets' purity)
      target_entropy      entropy (nats) of the target row [lam | (1 - lam) w], per query
    """
    sums, counts = diagnostic_sums(ctx, pos, neg, query_labels, bank_labels)  # N each
    defined = (counts > 0).tolist()  # the one host read
    return {name: sums[i] / counts[i] for i, name in enumerate(NAMES) if defined[i]}


class MiningMeter(nn.Module):
    """The training step's `mining/*` diagnostics, accumulated on the device and read only when logged.

    `update` takes the two directions' `diagnostic_sums` of a step: a diagnostic's step value is the
    mean of its two directions' ratios, defined when both are. `read` returns, for the steps since
    the last read of the same accumulator ("interval": the logging interval, "epoch": the epoch),
    the mean step value of each diagnostic defined in any of them, and starts that accumulator
    again: one host read per call. Buffers are not saved in checkpoints.
    """

    def __init__(self):
        super().__init__()
        for name in ("interval", "epoch"):
            self.register_buffer(name, torch.zeros(2, len(NAMES)), persistent=False)  # sum of step values, steps defined

    @torch.no_grad()
    def update(self, *directions: torch.Tensor) -> None:
        sums, counts = torch.stack(directions, dim=1)  # D x N each
        defined = (counts > 0).all(dim=0)  # N
        value = torch.where(defined, (sums / counts.clamp(min=1)).mean(dim=0), 0.0)  # N
        step = torch.stack([value, defined.float()])  # 2 x N
        self.interval.add_(step)
        self.epoch.add_(step)

    @torch.no_grad()
    def read(self, which: str) -> dict[str, float]:
        acc = getattr(self, which)
        total, steps = torch.stack([acc[0] / acc[1].clamp(min=1), acc[1]]).tolist()  # one host read
        acc.zero_()
        return {name: value for name, value, n in zip(NAMES, total, steps) if n > 0}
