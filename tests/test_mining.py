"""Mining strategies on tensors, their published formulas, their wiring into the loss, and the diagnostics."""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import hydra
import pytest
import torch
from conftest import TINY, make_cfg
from omegaconf import DictConfig
from torch.nn import functional as F

from mcl.eval.common import EvalError
from mcl.export import backbone_state_dict
from mcl.loss import weighted_infonce
from mcl.mining.base import MiningContext, NegativeSelection, PositiveSelection, select
from mcl.mining.diagnostics import mining_diagnostics
from mcl.mining.negative import DebiasedNegatives, GradientBandNegatives, RingNegatives, rank_band
from mcl.module import MCLModule, build_targets
from mcl.train import build, build_module, train

POSITIVES = ["none", "nn", "soft", "hard", "soft_hard"]
NEGATIVES = ["all", "gradient", "ring", "fn_elimination", "hard", "debiased"]


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def context(q, k, bank, bank_index=None, batch_index=None, tau=0.2, bank_full=True, progress=0.0) -> MiningContext:
    bank_index = torch.arange(1000, 1000 + bank.shape[0]) if bank_index is None else bank_index
    batch_index = torch.arange(q.shape[0]) if batch_index is None else batch_index
    return MiningContext(q, k, bank, q @ bank.T, bank_index, batch_index, tau, bank_full, progress)


@functools.cache
def mining_cfg(positive: str, negative: str, extra: tuple[str, ...]) -> DictConfig:
    return make_cfg([*TINY, f"mining.positive={positive}", f"mining.negative={negative}", *extra], Path("unused")).mining


def strategies(positive: str = "none", negative: str = "all", extra: tuple[str, ...] = ()):
    """The two strategies exactly as the config files build them."""
    cfg = mining_cfg(positive, negative, extra)
    return hydra.utils.instantiate(cfg.positive), hydra.utils.instantiate(cfg.negative)


def make_module(tmp_path, overrides: list[str]) -> MCLModule:
    return build_module(make_cfg([*TINY, *overrides], tmp_path), num_classes=10)


def fill_bank(module: MCLModule, seed: int = 1) -> None:
    """A full bank of random keys from images 1000, 1001, ... (none of the batch's)."""
    size = module.bank.size
    module.bank.enqueue(unit(size, module.bank.keys.shape[1], seed=seed), torch.arange(1000, 1000 + size), torch.arange(size) % 10)


def moco_v2_reference(q, k, bank, tau) -> torch.Tensor:
    """The foundation's MoCo v2 loss, written directly."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T], dim=1) / tau  # B x (1+K)
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


# --- the loss without mining ---------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        ["mining.positive=none", "mining.negative=all"],
        ["mining.positive=soft_hard", "mining.positive.lam=1.0", "mining.negative=all"],  # lam = 1: only the augmented positive
        ["mining.positive=none", "mining.negative=gradient", "mining.negative.start=0", "mining.negative.end=1"],  # the full band
    ],
)
def test_no_mining_equals_moco_v2_to_the_bit(tmp_path, overrides):
    module = make_module(tmp_path, overrides)
    fill_bank(module)
    q, k = unit(8, 128, seed=2), unit(8, 128, seed=3)
    loss, _, pos, _ = module.contrast(q, k, torch.arange(8))
    reference = moco_v2_reference(q, k, module.bank.keys, module.cfg_model["temperature"])
    assert torch.equal(loss, reference), (loss.item(), reference.item())
    if "mining.positive.lam=1.0" in overrides:
        assert (pos.weight > 0).any()  # something was mined, and lam = 1 ignored it


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """SimCLR's NT-Xent, written directly: 2N anchors, positive = the other view, negatives = the other 2N - 2."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # 2N x D
    n = z1.shape[0]
    logits = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    return F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


def test_in_batch_candidates_are_simclrs_nt_xent_with_its_gradient(tmp_path):
    """model.candidates=batch with no mining: loss and gradient (through queries, positives and
    negatives alike) equal NT-Xent's; the query's own two views are neither negatives nor counted twice."""
    module = make_module(tmp_path, ["experiment=simclr", "callbacks=none"])
    assert module.bank is None and module.key_backbone is None
    z1, z2 = (torch.randn(8, 128, generator=torch.Generator().manual_seed(s)).requires_grad_(True) for s in (1, 2))
    q1, q2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    index, labels = torch.arange(8) + 100, torch.arange(8) % 3
    loss, candidates, *_ = module.symmetric_loss(q1, q2, q1, q2, index, labels)
    reference = nt_xent_reference(z1, z2, module.cfg_model["temperature"])
    assert candidates.keys.shape == (16, 128) and candidates.labels.tolist() == labels.tolist() * 2
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    ours = torch.autograd.grad(loss, (z1, z2))
    theirs = torch.autograd.grad(reference, (z1, z2))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_in_batch_module_has_one_encoder_and_bank_checkpoints_still_load(tmp_path):
    simclr = make_module(tmp_path, ["experiment=simclr", "callbacks=none"])
    assert backbone_state_dict(simclr).keys() == simclr.backbone.state_dict().keys()
    with pytest.raises(EvalError, match="no key encoder .* use encoder=query"):
        backbone_state_dict(simclr, "key")
    older = dict(simclr.hparams)  # hyper-parameters written before model.candidates existed
    older["model"] = {k: v for k, v in older["model"].items() if k != "candidates"}
    assert MCLModule(**older).bank is not None


def test_in_batch_mining_mines_among_the_other_images_of_the_batch(tmp_path):
    module = make_module(tmp_path, ["experiment=simclr", "callbacks=none", "mining.positive=nn", "mining.negative=gradient"])
    q1, q2 = unit(8, 128, seed=1), unit(8, 128, seed=2)
    index = torch.arange(8) + 100
    _, candidates, (ctx, pos, neg), _ = module.symmetric_loss(q1, q2, q1, q2, index, torch.zeros(8, dtype=torch.long))
    assert (candidates.index[pos.index[:, 0]] != index).all()  # the neighbour is another image of the batch
    kept = neg.weight > 0  # 8 x 16
    assert not (kept & ctx.self_mask).any() and ctx.self_mask.sum(1).tolist() == [2] * 8
    start, end = module.negative.edges(16, 0.0)
    assert kept.sum(1).tolist() == [end - start] * 8


# --- positives -----------------------------------------------------------------------------
def test_soft_weights_are_a_distribution_ordered_like_the_query_similarities():
    """soft: the key's top-k neighbours, weighted softmax(cos(q, n) / 1) (the lab's SNCLR); weights_from=key:
    softmax(cos(k, n) / weight_temperature), mcl's earlier rule."""
    q, k, bank = unit(6, 16, seed=1), unit(6, 16, seed=2), unit(64, 16, seed=3)
    for weights_from, tau_w in (("query", None), ("key", "0.1")):
        extra = (f"mining.positive.weights_from={weights_from}",) + ((f"mining.positive.weight_temperature={tau_w}",) if tau_w else ())
        soft, _ = strategies("soft", extra=extra)
        ctx = context(q, k, bank)
        pos = soft(ctx)
        assert pos.index.shape == (6, soft.topk) and pos.lam == soft.lam
        assert torch.equal(pos.index, (k @ bank.T).topk(soft.topk, dim=1).indices)  # searched by the key either way
        torch.testing.assert_close(pos.weight.sum(1), torch.ones(6))
        sim = (q if weights_from == "query" else k)[:, None, :].mul(bank[pos.index]).sum(-1)  # B x k
        assert torch.equal(sim.argsort(1, descending=True), pos.weight.argsort(1, descending=True))
        torch.testing.assert_close(pos.weight, torch.softmax(sim / (1.0 if tau_w is None else 0.1), dim=1))


@pytest.mark.parametrize("rule", ["above_mean", "threshold"])
@pytest.mark.parametrize("name", ["hard", "soft_hard"])
def test_hard_rule_zeroes_exactly_the_neighbours_that_fail_it(name, rule):
    strategy, _ = strategies(name, extra=(f"mining.positive.hard_rule={rule}", "mining.positive.threshold=0.3"))
    q, k, bank = unit(32, 8, seed=4), unit(32, 8, seed=5), unit(128, 8, seed=6)
    ctx = context(q, k, bank)
    pos = strategy(ctx)
    sim = ctx.bank_sim.gather(1, pos.index)  # B x k: to the query
    soft = torch.softmax(sim, dim=1)  # tau_w = 1
    passes = soft > 1 / strategy.topk if rule == "above_mean" else sim >= 0.3
    assert passes.any() and not passes.all()  # the example exercises both outcomes
    assert torch.equal(pos.weight > 0, passes)
    if name == "soft_hard":  # as the lab: the kept soft weights, not renormalised
        torch.testing.assert_close(pos.weight, soft * passes)
    else:  # equal weights 1 / #passing
        expected = passes.float()
        torch.testing.assert_close(pos.weight, expected / expected.sum(1, keepdim=True).clamp_min(1e-12))


def lab_snclr_weights(z_q: torch.Tensor, nearest: torch.Tensor, topk: int) -> torch.Tensor:
    """The lab's SNCLR target weights (network/SNCLR.py, `generation_mask_with_pos` with threshold=True), on B
    queries z_q (B x D) and each query's topk neighbours (B x topk x D), written as the lab writes them: the
    cosine of every query to every neighbour of the batch (B x B*topk), -999 on the other queries' neighbours,
    a softmax over the row, weights not above 1/topk zeroed. Returns each query's own block, B x topk."""
    b = z_q.shape[0]
    querys = F.normalize(z_q, dim=1)
    nearest = F.normalize(nearest.reshape(b * topk, -1), dim=1)
    cross_attn = querys @ nearest.T  # B x B*topk
    mask = ((torch.eye(b) - 1) * 999).repeat(topk, 1).reshape(topk, b, -1).permute(2, 1, 0).reshape(b, topk * b)
    cross_attn = F.softmax(cross_attn + mask, dim=1)
    cross_attn = cross_attn * (cross_attn > (1.0 / topk)).long()
    return cross_attn.reshape(b, b, topk)[torch.arange(b), torch.arange(b)]  # B x topk


def tie_bank(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A bank (64 x D) where the key of query 0 has 5 identical nearest entries (equal similarities: the lab keeps
    none) and the key of query 1 two identical ones among its 5 nearest (a tie inside the row)."""
    bank = unit(64, q.shape[1], seed=13)
    bank[:5] = F.normalize(k[0] + 0.1 * unit(q.shape[1], seed=14), dim=0)  # 5 copies of one vector
    bank[5] = bank[6] = F.normalize(k[1] + 0.05 * unit(q.shape[1], seed=15), dim=0)
    return bank


def test_soft_hard_weights_and_their_gradient_are_the_labs_snclr_rule():
    """soft_hard's weights equal `lab_snclr_weights` on the same queries and neighbours (the key's top-5),
    equal similarities (row 0: none kept) and a tie (row 1) included, and so does their gradient in the query."""
    soft_hard, _ = strategies("soft_hard")
    assert (soft_hard.weights_from, soft_hard.weight_temperature, soft_hard.renormalise) == ("query", 1.0, False)
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(12)).requires_grad_(True)
    q, k = F.normalize(z, dim=1), unit(8, 16, seed=11)  # the module's query: the projection, normalised (no predictor)
    bank = tie_bank(q.detach(), k)
    with torch.enable_grad():
        pos, _ = select(context(q, k, bank), soft_hard, lambda ctx: NegativeSelection())
    assert sorted(pos.index[0].tolist()) == [0, 1, 2, 3, 4] and {5, 6} <= set(pos.index[1].tolist())
    lab = lab_snclr_weights(z, bank[pos.index], soft_hard.topk)  # B x k
    torch.testing.assert_close(pos.weight, lab)
    assert (pos.weight[0] == 0).all() and (pos.weight[1:].sum(1) > 0).all()  # equal similarities: nothing kept
    tied = (pos.index[1] == 5) | (pos.index[1] == 6)
    assert pos.weight[1, tied][0] == pos.weight[1, tied][1]
    assert (pos.weight.sum(1) < 1).all()  # not renormalised
    coefficients = torch.randn(8, soft_hard.topk, generator=torch.Generator().manual_seed(16))
    (ours,) = torch.autograd.grad((pos.weight * coefficients).sum(), z)
    (theirs,) = torch.autograd.grad((lab * coefficients).sum(), z)
    torch.testing.assert_close(ours, theirs)
    assert ours[1:].abs().sum() > 0  # the weights do carry the query's gradient
    key_rule, _ = strategies("soft_hard", extra=("mining.positive.weights_from=key",))
    assert (
        not key_rule.differentiable and not select(context(q, k, bank), key_rule, lambda ctx: NegativeSelection())[0].weight.requires_grad
    )


def test_soft_hard_loss_and_gradient_through_the_module_follow_the_labs_weights(tmp_path):
    """MCLModule.contrast with soft_hard: targets t_i = lam onehot(k_i) + (1 - lam) w_i with the lab's weights
    (which carry gradient through scatter_add_), Z over [k_i | bank] with the own image's entries left out:
    loss and d loss / d z equal the formula's written here."""
    module = make_module(tmp_path, ["mining.positive=soft_hard", "mining.negative=all", "model.queue_size=64", "model.proj_out=16"])
    z = torch.randn(8, 16, generator=torch.Generator().manual_seed(12)).requires_grad_(True)
    k = unit(8, 16, seed=11)
    bank = tie_bank(z.detach(), k)
    module.bank.enqueue(bank, torch.arange(1000, 1064), torch.arange(64) % 10)
    tau, lam, topk = module.cfg_model["temperature"], module.positive.lam, module.positive.topk
    loss, _, pos, _ = module.contrast(F.normalize(z, dim=1), k, torch.arange(8))
    neighbours = (k @ bank.T).topk(topk, dim=1).indices  # B x k, by the key (no own-image entry in this bank)
    w = lab_snclr_weights(z, bank[neighbours], topk)  # B x k, with gradient
    q = F.normalize(z, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T], dim=1) / tau  # B x (1+K)
    mined = w.sum(1, keepdim=True) > 0
    targets = torch.zeros(8, 65)
    targets[:, :1] = torch.where(mined, lam, 1.0)
    targets = targets + torch.zeros(8, 65).scatter(1, neighbours + 1, torch.where(mined, 1 - lam, 0.0) * w)
    reference = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    torch.testing.assert_close(loss, reference)
    ours, theirs = (torch.autograd.grad(x, z, retain_graph=True)[0] for x in (loss, reference))
    torch.testing.assert_close(ours, theirs)
    detached = -(targets.detach() * F.log_softmax(logits, dim=1)).sum(1).mean()
    assert not torch.allclose(torch.autograd.grad(detached, z)[0], theirs)  # the weights' own gradient counts


def test_nn_replaces_the_augmented_positive_by_the_nearest_neighbour():
    nn, _ = strategies("nn")
    q, k, bank = unit(5, 16, seed=7), unit(5, 16, seed=8), unit(40, 16, seed=9)
    pos = nn(context(q, k, bank))
    assert pos.lam == 0.0 and torch.equal(pos.weight, torch.ones(5, 1))
    assert torch.equal(pos.index[:, 0], (k @ bank.T).argmax(1))
    targets = torch.zeros(5, 41).scatter_(1, pos.index + 1, 1.0)  # all target mass on the neighbour's column
    assert torch.equal(build_targets(pos, 40, torch.zeros(5, 41)), targets)


# --- negatives -----------------------------------------------------------------------------
@pytest.mark.parametrize("rank_by", ["key", "query"])
@pytest.mark.parametrize(("unit_", "start", "end"), [("rank", 3, 17), ("fraction", 0.1, 0.55)])
def test_gradient_band_keeps_exactly_the_configured_ranks(rank_by, unit_, start, end):
    band = GradientBandNegatives(start=start, end=end, unit=unit_, rank_by=rank_by)
    band.validate(40)
    q, k, bank = unit(4, 8, seed=10), unit(4, 8, seed=11), unit(40, 8, seed=12)
    bank_index = torch.arange(1000, 1040)
    bank_index[[5, 20]] = torch.tensor([0, 2])  # two entries of the batch's own images
    ctx = context(q, k, bank, bank_index=bank_index)
    weight = band(ctx).weight
    lo, hi = (start, end) if unit_ == "rank" else (round(start * 40), round(end * 40))
    reference = (k if rank_by == "key" else q) @ bank.T
    for i in range(4):
        own = (bank_index == i).nonzero().flatten().tolist()
        order = [j for j in reference[i].argsort(descending=True).tolist() if j not in own]
        assert sorted((weight[i] > 0).nonzero().flatten().tolist()) == sorted(order[lo:hi]), i
    assert set(weight.unique().tolist()) == {0.0, 1.0}


def test_band_with_tied_similarities_keeps_exactly_its_width():
    """Low-precision similarities tie often (bf16 under AMP): the band still keeps end - start entries
    a row, and they are ranks [start, end) of some order of the similarities with the ties broken."""
    start, end = 20, 90
    sim = torch.randint(0, 5, (64, 200)).float()  # five values: ties everywhere, also at both edges
    own = torch.zeros(64, 200, dtype=torch.bool)
    own[:, :3] = True
    keep = rank_band(sim, start, end, own).bool()
    assert keep.sum(1).tolist() == [end - start] * 64 and not (keep & own).any()
    for row, kept, mine in zip(sim, keep, own):
        top, bottom, dropped = row[kept].max(), row[kept].min(), row[~kept & ~mine]
        assert not ((dropped > bottom) & (dropped < top)).any()  # nothing dropped from inside the band
        assert (dropped > top).sum() <= start <= (dropped >= top).sum()  # a head of exactly `start` fits above
        assert (dropped < bottom).sum() <= len(dropped) - start <= (dropped <= bottom).sum()  # and the tail below


def test_gradient_band_edges_anneal_with_progress():
    band = GradientBandNegatives(start=0.1, end=0.5, final_start=0.0, final_end=0.3)
    band.validate(100)
    assert [band.edges(100, p) for p in (0.0, 0.5, 1.0)] == [(10, 50), (5, 40), (0, 30)]
    q, k, bank = unit(3, 8, seed=13), unit(3, 8, seed=14), unit(100, 8, seed=15)
    assert torch.equal(band(context(q, k, bank, progress=0.5)).weight.sum(1), torch.full((3,), 35.0))


def test_gradient_band_drops_the_largest_and_the_negligible_gradients():
    """Autograd on a constructed example: query = positive, similarities spread over [-0.9, 0.9]."""
    tau, size = 0.1, 100
    cos = torch.linspace(0.9, -0.9, size)
    bank = torch.stack([cos, (1 - cos**2).sqrt()], dim=1)  # K x 2, unit vectors at these cosines to e0
    q = k = torch.tensor([[1.0, 0.0]])
    ctx = context(q, k, bank, tau=tau)
    bank_sim = ctx.bank_sim.clone().requires_grad_(True)
    weighted_infonce(torch.cat([(q * k).sum(1, keepdim=True), bank_sim], dim=1) / tau).backward()
    grad = bank_sim.grad[0]  # K: d loss / d s_j = p_j / tau
    band = GradientBandNegatives(start=0.1, end=0.5)
    weight = band(ctx).weight
    head, kept, tail = grad[:10], grad[10:50], grad[50:]
    assert torch.equal(weight[0], (torch.arange(size) >= 10).float() * (torch.arange(size) < 50).float())
    assert tail.sum() / grad.sum() < 1e-3  # the easy tail carries a negligible share
    assert head.min() > kept.max() > tail.max()  # the dropped head has the largest per-negative share
    nothing = PositiveSelection(torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0))
    share = mining_diagnostics(ctx, nothing, band(ctx), torch.zeros(1, dtype=torch.long), -torch.ones(size, dtype=torch.long))
    torch.testing.assert_close(share["neg_grad_share_kept"], kept.sum() / grad.sum())
    # the mined loss: dropped entries get no gradient at all
    bank_sim.grad = None
    log_weight = F.pad(weight.log(), (1, 0))
    weighted_infonce(torch.cat([(q * k).sum(1, keepdim=True), bank_sim], dim=1) / tau, None, log_weight).backward()
    assert torch.equal(bank_sim.grad[0] != 0, weight[0] > 0)


def hcl_reference(q, k, bank, t, beta, tau_plus):
    """Robinson et al. 2021, the published loss (beta = 0 is Chuang et al. 2020's DCL), and its raw Ng."""
    neg = torch.exp(q @ bank.T / t)  # B x N
    pos = torch.exp((q * k).sum(dim=-1) / t)  # B
    n = neg.shape[1]
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    ng_raw = (-tau_plus * n * pos + reweight_neg) / (1 - tau_plus)
    ng = torch.clamp(ng_raw, min=n * math.e ** (-1 / t))
    return (-torch.log(pos / (pos + ng))).mean(), ng_raw < n * math.e ** (-1 / t)


@pytest.mark.parametrize(("beta", "tau_plus"), [(0.0, 0.1), (1.0, 0.1), (1.0, 0.0), (0.5, 0.5)])
def test_hcl_and_dcl_match_the_published_formula(beta, tau_plus):
    t = 0.5
    q = unit(64, 16, seed=16).requires_grad_(True)
    k, bank = unit(64, 16, seed=17), unit(96, 16, seed=18)
    k = torch.where(torch.arange(64)[:, None] < 32, F.normalize(q.detach() + 0.1 * k, dim=1), k)  # easy and hard positives
    expected, clamped = hcl_reference(q, k, bank, t, beta, tau_plus)
    (expected_grad,) = torch.autograd.grad(expected, q)
    selection = DebiasedNegatives(beta=beta, tau_plus=tau_plus)(context(q, k, bank, tau=t))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T], dim=1) / t
    loss = weighted_infonce(logits, None, None, selection.log_mass)
    (grad,) = torch.autograd.grad(loss, q)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    if tau_plus == 0.5:
        assert clamped.any() and not clamped.all()  # both branches of the clamp are exercised


def test_debiased_estimate_leaves_out_the_mined_positives():
    """With mined positives (lam < 1) HCL's negative mass is its formula over the other entries only:
    a mined positive sits in Z once, as a positive, not again inside the negatives' estimate."""
    t, b = 0.5, 16
    q, k, bank = unit(b, 16, seed=16), unit(b, 16, seed=17), unit(48, 16, seed=18)
    soft, hcl = strategies("soft", "hard")
    ctx = context(q, k, bank, tau=t)
    pos, neg = select(ctx, soft, hcl)
    mined = ctx.positive
    assert mined is not None and mined.sum(1).tolist() == [soft.topk] * b
    assert not (neg.weight.bool() & mined).any()
    for i in range(b):  # the published formula, row by row, over the bank without row i's mined entries
        expected, _ = hcl_reference(q[i : i + 1], k[i : i + 1], bank[~mined[i]], t, hcl.beta, hcl.tau_plus)
        reference_ng = torch.exp((q[i] * k[i]).sum() / t) * torch.expm1(expected)  # from -log(pos / (pos + ng))
        torch.testing.assert_close(neg.log_mass[i].exp(), reference_ng, rtol=1e-5, atol=1e-6)


def test_ring_matches_the_published_moco_ring_loss():
    t, outer, inner = 0.2, 0.3, 0.2
    q, k, bank = unit(16, 8, seed=19), unit(16, 8, seed=20), unit(200, 8, seed=21)
    weight = RingNegatives(outer=outer, inner=inner)(context(q, k, bank, tau=t)).weight
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T], dim=1) / t
    loss = weighted_infonce(logits, None, F.pad(weight.log(), (1, 0)))
    witness_pos = (q * k).sum(1) / t  # Wu et al.'s MoCoRing with dynamic_inner, self_negative
    sorted_dps = (q @ bank.T / t).sort(dim=1, descending=True).values
    outer_idx = int(outer * 200)
    ring = sorted_dps[:, :outer_idx][:, int(inner * outer_idx) :]
    expected = -(witness_pos - torch.logsumexp(torch.cat([witness_pos[:, None], ring], dim=1), dim=1)).mean()
    torch.testing.assert_close(loss, expected)
    assert torch.equal(weight.sum(1), torch.full((16,), float(outer_idx - int(inner * outer_idx))))


def test_fn_elimination_drops_exactly_the_entries_above_the_threshold():
    _, fn = strategies(negative="fn_elimination", extra=("mining.negative.threshold=0.2",))
    q, k, bank = unit(8, 8, seed=22), unit(8, 8, seed=23), unit(50, 8, seed=24)
    weight = fn(context(q, k, bank)).weight
    assert torch.equal(weight > 0, (k @ bank.T) <= 0.2)
    assert (weight == 0).any() and (weight > 0).any()


# --- the query's own image, warm-up, bad configuration --------------------------------------
@pytest.mark.parametrize(("positive", "negative"), [*((p, "all") for p in POSITIVES), *(("none", n) for n in NEGATIVES[1:])])
def test_no_sample_is_its_own_neighbour_or_negative(positive, negative):
    pos_strategy, neg_strategy = strategies(positive, negative)
    q, k, bank = unit(8, 16, seed=25), unit(8, 16, seed=26), unit(64, 16, seed=27)
    bank[:8] = k  # an older key of each query's own image: the most similar entry of all
    bank_index = torch.cat([torch.arange(8), torch.arange(1000, 1056)])
    ctx = context(q, k, bank, bank_index=bank_index)
    pos, neg = pos_strategy(ctx), neg_strategy(ctx)
    mined_self = ((pos.weight > 0) & (bank_index[pos.index] == torch.arange(8)[:, None])).any()
    assert not mined_self
    assert neg.weight is not None and (neg.weight[ctx.self_mask] == 0).all()
    if positive != "none":  # the same example without the guard does mine the own image
        unguarded, _ = strategies(positive, extra=("mining.positive.exclude_self=false",))
        assert (bank_index[unguarded(ctx).index[:, 0]] == torch.arange(8)).all()


@pytest.mark.parametrize(
    ("positive", "negative"), [("soft_hard", "gradient"), ("nn", "hard"), ("soft", "ring"), ("hard", "fn_elimination")]
)
def test_the_loss_ignores_keys_of_the_querys_own_image(tmp_path, positive, negative):
    """One query whose image has three older keys in the bank: moving them changes nothing."""
    module = make_module(tmp_path, [f"mining.positive={positive}", f"mining.negative={negative}"])
    fill_bank(module)
    own = torch.tensor([3, 60, 100])  # slots of the 128-key bank (debug=tiny)
    module.bank.indices[own] = 0
    q, k, index = unit(1, 128, seed=28), unit(1, 128, seed=29), torch.zeros(1, dtype=torch.long)
    module.bank.keys[own] = k  # as similar to the positive as can be
    before, *_ = module.contrast(q, k, index)
    module.bank.keys[own] = unit(3, 128, seed=30)
    after, *_ = module.contrast(q, k, index)
    assert torch.equal(before, after)
    module.bank.keys[5] = k  # while moving another image's key does change the loss
    assert not torch.equal(before, module.contrast(q, k, index)[0])


@pytest.mark.parametrize(("positive", "negative"), [*((p, "all") for p in POSITIVES[1:]), *(("none", n) for n in NEGATIVES[1:])])
def test_warmup_mines_nothing_until_the_bank_is_full(positive, negative):
    pos_strategy, neg_strategy = strategies(positive, negative)
    q, k, bank = unit(4, 8, seed=31), unit(4, 8, seed=32), unit(32, 8, seed=33)
    ctx = context(q, k, bank, bank_full=False)
    assert pos_strategy(ctx).index.shape == (4, 0)
    neg = neg_strategy(ctx)
    assert neg.log_mass is None and torch.equal(neg.weight, torch.ones(4, 32))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mining.positive=soft", "mining.positive.topk=129"], "topk=129"),
        (["mining.positive=soft_hard", "mining.positive.hard_rule=median"], "hard_rule"),
        (["mining.positive=soft_hard", "mining.positive.weights_from=bank"], r"weights_from must be one of \('query', 'key'\)"),
        (["mining.negative=gradient", "mining.negative.start=0.6", "mining.negative.end=0.5"], "start < end"),
        (["mining.negative=gradient", "mining.negative.unit=rank", "mining.negative.start=10", "mining.negative.end=300"], "end <= 128"),
        (["mining.negative=gradient", "mining.negative.final_start=0.4", "mining.negative.final_end=0.2"], "end of training"),
        (["mining.negative=gradient", "mining.negative.start=0.5", "mining.negative.end=0.501"], "zero negatives"),
        (["mining.negative=ring", "mining.negative.outer=0.003"], "zero negatives"),
        (["mining.negative=fn_elimination", "mining.negative.threshold=-1"], "no negative is kept"),
        (["mining.negative=gradient", "mining.negative.rank_by=bank"], "rank_by"),
        (["mining.negative=hard", "mining.negative.tau_plus=1"], "tau_plus"),
    ],
)
def test_bad_mining_configuration_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_module(tmp_path, overrides)


def test_build_rejects_a_bad_strategy_before_training(tmp_path):
    cfg = make_cfg([*TINY, "callbacks=none", "mining.positive=soft", "mining.positive.topk=1000"], tmp_path)
    with pytest.raises(ValueError, match="topk=1000 must lie in"):
        build(cfg)


# --- diagnostics ---------------------------------------------------------------------------
def test_diagnostics_count_what_was_kept_and_dropped():
    """Two queries (labels 0, 1), six bank entries; hand-made selections."""
    bank = torch.eye(6)
    q = F.normalize(torch.tensor([[3.0, 2, 1, 0, 0, 0], [0, 0, 0, 1, 2, 3]]), dim=1)
    ctx = context(q, q, bank, bank_index=torch.tensor([0, 10, 11, 12, 13, 14]), batch_index=torch.tensor([0, 1]))
    bank_labels = torch.tensor([0, 0, 1, 1, -1, 1])
    pos = PositiveSelection(index=torch.tensor([[1, 2], [5, 4]]), weight=torch.tensor([[0.7, 0.3], [1.0, 0.0]]), lam=0.5)
    neg = NegativeSelection(weight=torch.tensor([[0.0, 1, 1, 0, 1, 1], [1.0, 1, 0, 1, 1, 0]]))
    d = mining_diagnostics(ctx, pos, neg, torch.tensor([0, 1]), bank_labels)
    assert d["pos_kept"].item() == 1.5  # (2 + 1) / 2 queries
    assert d["pos_purity"].item() == pytest.approx(2 / 3)  # entries 1 (label 0) and 5 (label 1) match, 2 does not
    # row 0: positives {1, 2}, own image {0}: kept {4, 5}, dropped {3}; row 1: positive {5}: kept {0, 1, 3, 4}, dropped {2}
    assert d["neg_kept"].item() == 3.0
    assert d["neg_fn_kept"].item() == pytest.approx(1 / 4)  # labelled kept: (0,5) no, (1,0) no, (1,1) no, (1,3) yes
    assert d["neg_fn_dropped"].item() == pytest.approx(1 / 2)  # (0,3) no, (1,2) yes
    sim = q @ bank.T
    torch.testing.assert_close(d["neg_sim_dropped"], (sim[0, 3] + sim[1, 2]) / 2)
    prob = torch.softmax((sim / 0.2).masked_fill(ctx.self_mask, float("-inf")), dim=1)
    torch.testing.assert_close(d["neg_grad_share_kept"], (prob[0, [4, 5]].sum() + prob[1, [0, 1, 3, 4]].sum()) / 2)


@pytest.mark.slow
def test_training_logs_the_mining_diagnostics(tmp_path):
    """The paper's method trains a few steps; mining starts once the bank is full and is logged."""
    cfg = make_cfg(
        [
            "debug=tiny",
            "logger=csv",
            "callbacks=none",
            "experiment=paper_cifar10",
            "dataset=digits",
            "model.queue_size=64",  # full after two steps of 32 keys (one key an image)
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
        ],
        tmp_path,
    )
    summary = train(cfg)
    (metrics,) = list(tmp_path.rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    steps = [r for r in rows if r.get("mining/neg_kept_step")]
    assert len(steps) == 3 and "val/knn_top1" in summary
    kept = [float(r["mining/neg_kept_step"]) for r in steps]
    assert kept[0] == 64 and kept[-1] <= round(0.5 * 64) - round(0.02 * 64)  # warm-up keeps all, then the band
    purity = [float(r["mining/pos_purity_step"]) for r in steps if r.get("mining/pos_purity_step")]
    assert purity and all(0 <= p <= 1 for p in purity)
    assert any(r.get("mining/neg_grad_share_kept_epoch") for r in rows)
