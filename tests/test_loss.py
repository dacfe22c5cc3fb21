"""One loss direction of every published preset against its formula, written out here row by row,
on a bank with the awkward rows (own-image keys, mined positives, dropped entries); HCL/DCL stay
finite whatever they drop; NNCLR's rule never repels the query from its own other view; every
pair of strategies trains past a full bank with finite gradients."""

from __future__ import annotations

import functools
import math

import lightning as L
import numpy as np
import pytest
import torch
from conftest import MICRO, TINY, learnable_images, make_cfg
from test_mining import hcl_reference, unit
from torch.nn import functional as F

from mcl.module import Candidates
from mcl.train import build, build_module

POSITIVES = ["none", "nn", "soft", "hard", "soft_hard"]
NEGATIVES = ["all", "gradient", "ring", "fn_elimination", "hard", "debiased"]
B, K, D = 8, 64, 16


def awkward_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Candidates]:
    """q, k (B x D) and a full bank of K keys where queries 0-3 each have older keys of their own image,
    each closer to their key than any other entry: a neighbour and the hardest negative if not excluded."""
    q, k, keys = unit(B, D, seed=seed), unit(B, D, seed=seed + 1), unit(K, D, seed=seed + 2)
    index = torch.arange(1000, 1000 + K)
    for i in range(4):
        own = [i, 8 + i] if i < 2 else [i]  # queries 0 and 1: two older keys each
        keys[own] = F.normalize(k[i] + 0.05 * unit(len(own), D, seed=seed + 10 + i), dim=1)
        index[own] = i
    return q, k, Candidates(keys, index, torch.arange(K) % 10, full=True)


def module_for(overrides: list[str]):
    return build_module(make_cfg([*TINY, *overrides], "unused"), num_classes=10)


def published_loss(q, k, c, tau, positives, negatives, neg_mass=None) -> torch.Tensor:
    """Mean over rows of -sum_p w_p log(exp(q.p/tau) / Z), Z = sum_p exp(q.p/tau) + negatives' mass.

    positives(i) -> [(vector, weight)], the row's target; negatives(i) -> bank columns of its negatives;
    neg_mass(i, q_i, negative keys) -> the debiased mass replacing sum_n exp(q.n/tau) (HCL/DCL).
    """
    rows = []
    for i in range(q.shape[0]):
        pos = positives(i)
        pos_logits = torch.stack([q[i] @ p for p, _ in pos]) / tau
        neg_keys = c.keys[negatives(i)]
        mass = torch.exp(q[i] @ neg_keys.T / tau).sum() if neg_mass is None else neg_mass(i, neg_keys)
        log_z = torch.log(pos_logits.exp().sum() + mass)
        rows.append(-sum(w * (logit - log_z) for (_, w), logit in zip(pos, pos_logits)))
    return torch.stack(rows).mean()


def own(c: Candidates, i: int) -> torch.Tensor:
    return c.index == i  # K bool


def neighbours(k_i, c, i, topk):
    """Top-k bank columns by cosine to the key, own image excluded (most similar first), and their similarities."""
    sim = (c.keys @ k_i).masked_fill(own(c, i), -2.0)
    top = sim.argsort(descending=True)[:topk]
    return top, sim[top]


def soft_hard_weights(q_i: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """The lab's SNCLR soft + hard rule for one query (D) and its k neighbours (k x D): softmax of their cosines
    to the query at temperature 1, weights not above 1/k zeroed, not renormalised; with the query's gradient."""
    soft = torch.softmax(neighbours @ q_i, dim=0)  # k
    return soft * (soft > 1.0 / len(soft))


def debiased_mass(q, k, tau, beta, tau_plus):
    """Robinson et al. 2021 (beta = 0: Chuang et al. 2020) over the given negatives, through hcl_reference:
    its loss -log(pos / (pos + Ng)) gives Ng = pos * (exp(loss) - 1)."""

    def mass(i, neg_keys):
        loss, _ = hcl_reference(q[i : i + 1], k[i : i + 1], neg_keys, tau, beta, tau_plus)
        return torch.exp(q[i] @ k[i] / tau) * torch.expm1(loss)

    return mass


def compare(module, q, k, c, expected_fn) -> None:
    """The module's loss and d loss / d q equal the reference's on the same inputs."""
    q = q.clone().requires_grad_(True)
    loss, *_ = module.contrast(q, k, torch.arange(B), c)
    (grad,) = torch.autograd.grad(loss, q)
    q_ref = q.detach().clone().requires_grad_(True)
    expected = expected_fn(q_ref)
    (expected_grad,) = torch.autograd.grad(expected, q_ref)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["hcl", "dcl"])
def test_hcl_and_dcl_presets_equal_the_published_loss_with_own_image_keys_dropped(preset):
    module = module_for([f"experiment={preset}"])
    neg = module.negative
    assert (neg.beta, neg.tau_plus) == ((1.0, 0.1) if preset == "hcl" else (0.0, 0.1))
    q, k, c = awkward_batch()
    tau = module.cfg_model["temperature"]

    def expected(q):
        mass = debiased_mass(q, k, tau, neg.beta, neg.tau_plus)  # HCL's importance weights carry gradient
        return published_loss(q, k, c, tau, lambda i: [(k[i], 1.0)], lambda i: ~own(c, i), mass)

    compare(module, q, k, c, expected)


@pytest.mark.parametrize("negative", ["hard", "debiased"])
def test_debiased_negatives_with_mined_positives_equal_the_published_loss(negative):
    """soft_hard + DCL/HCL: the mined neighbours are positives in Z, the estimate runs over the other non-own entries."""
    module = module_for(["mining.positive=soft_hard", f"mining.negative={negative}"])
    pos, neg = module.positive, module.negative
    q, k, c = awkward_batch(seed=3)
    tau = module.cfg_model["temperature"]
    mined = [neighbours(k[i], c, i, pos.topk) for i in range(B)]
    weights = [soft_hard_weights(q[i], c.keys[mined[i][0]]) for i in range(B)]  # which are kept: no gradient needed

    def positives(q, i):
        cols, w = mined[i][0], soft_hard_weights(q[i], c.keys[mined[i][0]])  # with the query's gradient
        return [(k[i], pos.lam)] + [(c.keys[j], (1 - pos.lam) * wj) for j, wj in zip(cols, w) if wj > 0]

    def negatives(i):
        drop = own(c, i).clone()
        drop[mined[i][0][weights[i] > 0]] = True
        return ~drop

    def expected(q):
        return published_loss(q, k, c, tau, functools.partial(positives, q), negatives, debiased_mass(q, k, tau, neg.beta, neg.tau_plus))

    compare(module, q, k, c, expected)


@pytest.mark.parametrize("negative", ["hard", "debiased"])
def test_debiased_negatives_with_nn_take_the_neighbour_as_the_positive(negative):
    """nn (lam = 0) + HCL/DCL: the neighbour n_i replaced k_i, so the estimator's positive term is
    exp(q . n_i / t), not exp(q . k_i / t): the published loss with n_i as the positive, over the negatives
    that are neither the query's own image nor n_i."""
    module = module_for(["mining.positive=nn", f"mining.negative={negative}"])
    neg = module.negative
    q, k, c = awkward_batch(seed=7)
    tau = module.cfg_model["temperature"]
    nearest = [int(neighbours(k[i], c, i, 1)[0][0]) for i in range(B)]

    def negatives(i):
        drop = own(c, i).clone()
        drop[nearest[i]] = True
        return ~drop

    def mass(q):
        def of_row(i, neg_keys):
            n_i = c.keys[nearest[i]][None]
            loss, _ = hcl_reference(q[i : i + 1], n_i, neg_keys, tau, neg.beta, neg.tau_plus)
            return torch.exp(q[i] @ n_i[0] / tau) * torch.expm1(loss)

        return of_row

    def expected(q):
        return published_loss(q, k, c, tau, lambda i: [(c.keys[nearest[i]], 1.0)], negatives, mass(q))

    compare(module, q, k, c, expected)
    with_k = published_loss(
        q, k, c, tau, lambda i: [(c.keys[nearest[i]], 1.0)], negatives, debiased_mass(q, k, tau, neg.beta, neg.tau_plus)
    )
    assert not torch.allclose(with_k, expected(q))  # q . k_i in the estimate would be another loss


def test_the_papers_pair_equals_soft_hard_targets_over_the_gradient_band():
    """t_i = lam onehot(k_i) + (1 - lam) w_i (the lab's SNCLR soft + hard weights: softmax of the cosines of the
    key's top-k neighbours to the query, those not above 1/k zeroed, not renormalised, with the query's gradient);
    Z = k_i + mined + negatives ranked by similarity to the key
    (own image excluded) in the band [start K, end K)."""
    module = module_for(["experiment=paper_cifar10"])
    pos, neg = module.positive, module.negative
    assert (neg.start, neg.end, neg.rank_by, pos.hard_rule) == (0.02, 0.5, "key", "above_mean")
    q, k, c = awkward_batch(seed=5)
    tau = module.cfg_model["temperature"]
    mined = [neighbours(k[i], c, i, pos.topk) for i in range(B)]
    weights = [soft_hard_weights(q[i], c.keys[mined[i][0]]) for i in range(B)]
    assert any((w == 0).any() for w in weights) and all(w.sum() > 0 for w in weights)  # the hard rule bites

    def positives(q, i):
        cols, w = mined[i][0], soft_hard_weights(q[i], c.keys[mined[i][0]])  # with the query's gradient
        return [(k[i], pos.lam)] + [(c.keys[j], (1 - pos.lam) * wj) for j, wj in zip(cols, w) if wj > 0]

    def negatives(i):
        ranked = (c.keys @ k[i]).masked_fill(own(c, i), -2.0).argsort(descending=True)  # own image ranks last
        band = torch.zeros(K, dtype=torch.bool)
        band[ranked[round(neg.start * K) : round(neg.end * K)]] = True
        band[mined[i][0][weights[i] > 0]] = False  # a mined positive sits in Z once, as a positive
        return band

    compare(module, q, k, c, lambda q: published_loss(q, k, c, tau, functools.partial(positives, q), negatives))


def test_nn_rule_equals_nnclr_inside_moco():
    """NNCLR's rule: the nearest bank neighbour n_i of k_i (own image excluded) is the only positive and
    the candidates are the bank (own image excluded): k_i is no candidate. (experiment=nnclr is NNCLR
    itself, in-batch: test_neighbours.)"""
    module = module_for(["mining.positive=nn"])
    q, k, c = awkward_batch(seed=7)
    tau = module.cfg_model["temperature"]
    nn = [neighbours(k[i], c, i, 1)[0][0] for i in range(B)]
    compare(
        module,
        q,
        k,
        c,
        lambda q: published_loss(q, k, c, tau, lambda i: [(c.keys[nn[i]], 1.0)], lambda i: ~own(c, i) & (torch.arange(K) != nn[i])),
    )


def test_nn_never_repels_the_query_from_its_own_other_view():
    """With lam = 0, no gradient reaches s(q_i, k_i) once a neighbour replaced k_i; during warm-up (nothing
    mined) k_i is the target, as in MoCo, and does get gradient."""
    module = module_for(["mining.positive=nn"])
    q, k, c = awkward_batch(seed=9)
    q, k = q.requires_grad_(True), k.clone().requires_grad_(True)  # k enters the loss only through s(q_i, k_i)
    loss, *_ = module.contrast(q, k, torch.arange(B), c)
    (k_grad,) = torch.autograd.grad(loss, k)
    assert torch.equal(k_grad, torch.zeros_like(k_grad))
    warm = Candidates(c.keys, c.index, c.labels, full=False)
    loss, *_ = module.contrast(q, k, torch.arange(B), warm)
    (k_grad,) = torch.autograd.grad(loss, k)
    assert (k_grad.norm(dim=1) > 0).all()
    bank_logits = (q @ c.keys.T).masked_fill(c.index == torch.arange(B)[:, None], -math.inf)  # B x K, own image out
    logits = torch.cat([(q * k).sum(1, keepdim=True), bank_logits], dim=1) / module.cfg_model["temperature"]
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(B, dtype=torch.long)))


@pytest.mark.parametrize("negative", ["hard", "debiased"])
@pytest.mark.parametrize("positive", POSITIVES)
def test_debiased_loss_and_gradient_stay_finite_whatever_a_row_drops(positive, negative):
    """Own-image keys and mined positives dropped; query 0's image owning all entries but one (with a mined
    positive, that row keeps no negative at all) or every entry; each with the bank full and in warm-up."""
    module = module_for([f"mining.positive={positive}", f"mining.negative={negative}"])
    neg, tau = module.negative, module.cfg_model["temperature"]
    q, k, c = awkward_batch(seed=11)
    one_left = torch.where(torch.arange(K) == 0, 1000, 0)  # K: only entry 0 is another image's
    for index in (c.index, one_left, torch.zeros(K, dtype=torch.long)):
        for full in (True, False):
            qg = q.clone().requires_grad_(True)
            loss, *_ = module.contrast(qg, k, torch.arange(B), Candidates(c.keys, index, c.labels, full))
            (grad,) = torch.autograd.grad(loss, qg)
            assert torch.isfinite(loss) and torch.isfinite(grad).all(), f"{index.tolist()}, bank full={full}"
    if positive == "none":  # the published formula where query 0 keeps one negative (N = 1), and none (Ng = 0: loss 0)
        mass = debiased_mass(q, k, tau, neg.beta, neg.tau_plus)
        row0 = published_loss(q[:1], k[:1], c, tau, lambda i: [(k[0], 1.0)], lambda i: one_left > 0, mass)
        single = Candidates(c.keys, one_left, c.labels)
        torch.testing.assert_close(module.contrast(q[:1], k[:1], torch.tensor([0]), single)[0], row0)
        alone = Candidates(c.keys, torch.zeros(K, dtype=torch.long), c.labels)
        assert module.contrast(q[:1], k[:1], torch.tensor([0]), alone)[0] == 0


class FullBankSteps(L.Callback):
    """Counts the steps that start with a full bank; every step's gradients are finite."""

    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps += int(pl_module.bank.is_full)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        assert all(torch.isfinite(p.grad).all() for p in pl_module.parameters() if p.grad is not None)


@pytest.mark.slow
def test_every_pair_of_strategies_trains_past_a_full_bank_with_finite_gradients(tmp_path):
    """5 x 6 pairs, 4 steps each on 16 images (one step an epoch, a bank of 16 = one step's keys, one an
    image): from step 2 on the mining warm-up is over and every query has an older key of its own image
    in the bank."""
    x, y = learnable_images(24, size=16)
    np.savez(tmp_path / "tiny.npz", x_train=x[:16], y_train=y[:16], x_test=x[16:], y_test=y[16:])
    small = [o for o in MICRO if not o.startswith("dataset=")] + ["dataset=npz", f"dataset.path={tmp_path / 'tiny.npz'}"]
    small += ["logger=none", "callbacks=none", "+callbacks.guard._target_=mcl.reliability.NonFiniteGuard", "seed=0"]
    small += ["model.queue_size=16", "trainer.max_epochs=4", "trainer.limit_val_batches=0", "+trainer.enable_progress_bar=false"]
    small += ["+trainer.enable_model_summary=false"]
    for positive in POSITIVES:
        for negative in NEGATIVES:
            datamodule, model, trainer = build(
                make_cfg([*small, f"mining.positive={positive}", f"mining.negative={negative}"], tmp_path / "run")
            )
            counter = FullBankSteps()
            trainer.callbacks.append(counter)
            trainer.fit(model, datamodule)
            assert trainer.global_step == 4 and counter.steps == 3, f"{positive}+{negative}: {trainer.global_step}, {counter.steps}"
