"""What the mining did, measured with labels (logged as `mining/*`, never used for training).

A bank entry and a query are a *false pair* when they share a class; entries or queries
without a label (-1: unwritten bank slots, unlabelled images) count in no share.
"""

from __future__ import annotations

import torch

from mcl.mining.base import MiningContext, NegativeSelection, PositiveSelection, mined_mask


@torch.no_grad()
def mining_diagnostics(
    ctx: MiningContext, pos: PositiveSelection, neg: NegativeSelection, query_labels: torch.Tensor, bank_labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Scalars describing one direction of one step (B queries, K bank entries).

    query_labels: B; bank_labels: K (-1 = unknown). Keys, present when defined:
      pos_kept            mined positives with non-zero target weight, per query
      pos_purity          share of those with the query's label
      neg_kept            negatives in the normaliser, per query (mined positives excluded)
      neg_fn_kept         share of kept negatives with the query's label (false negatives)
      neg_fn_dropped      share of dropped negatives with the query's label (own image excluded)
      neg_grad_share_kept share of the full bank's InfoNCE gradient mass (softmax of s/tau over
                          every entry but the query's own image) carried by the kept negatives
      neg_sim_kept, neg_sim_dropped  mean cosine similarity of kept / dropped negatives to the query
    """
    sim = ctx.bank_sim.detach().float()  # B x K
    same = query_labels[:, None] == bank_labels[None, :]  # B x K
    labelled = (query_labels[:, None] >= 0) & (bank_labels[None, :] >= 0)  # B x K
    out: dict[str, torch.Tensor] = {}
    ratios: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (sum, count): defined where count > 0

    mined_kept = pos.weight > 0  # B x m
    if mined_kept.shape[1] > 0:
        mined_labels = bank_labels[pos.index]  # B x m
        out["pos_kept"] = mined_kept.sum(dim=1).float().mean()
        among = mined_kept & (mined_labels >= 0) & (query_labels[:, None] >= 0)
        ratios["pos_purity"] = ((mined_labels == query_labels[:, None]) & among).sum(), among.sum()

    positive = mined_mask(pos, same.shape[1])  # B x K: mined entries with target mass are positives, not negatives
    positive = torch.zeros_like(same) if positive is None else positive
    own = ctx.self_mask
    kept = (torch.ones_like(same) if neg.weight is None else neg.weight > 0) & ~positive  # B x K
    dropped = ~kept & ~positive & ~own
    out["neg_kept"] = kept.sum(dim=1).float().mean()
    for name, among in (("neg_fn_kept", kept & labelled), ("neg_fn_dropped", dropped & labelled)):
        ratios[name] = (same & among).sum(), among.sum()
    prob = torch.softmax((sim / ctx.temperature).masked_fill(own, float("-inf")), dim=1)  # B x K, rows sum to 1
    out["neg_grad_share_kept"] = (prob * kept).sum(dim=1).mean()
    ratios["neg_sim_kept"] = (sim * kept).sum(), kept.sum()  # masked sums: no boolean indexing
    ratios["neg_sim_dropped"] = (sim * dropped).sum(), dropped.sum()
    counts = torch.stack([count for _, count in ratios.values()]).tolist()  # one host read for every ratio
    for (name, (total, count)), n in zip(ratios.items(), counts):
        if n > 0:
            out[name] = total / count
    return out
