"""Loss, memory bank and module math on tensors."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from mcl.bank import MemoryBank
from mcl.loss import weighted_infonce
from mcl.mining.base import AllNegatives, MiningContext, NoPositives
from mcl.models import WidthResNet
from mcl.module import build_targets, momentum_at, warmup_cosine
from mcl.train import build


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_plain_infonce_is_cross_entropy_exactly():
    logits = torch.randn(8, 33)
    assert torch.equal(weighted_infonce(logits), F.cross_entropy(logits, torch.zeros(8, dtype=torch.long)))


def test_soft_targets_and_weights_follow_the_formula():
    logits = torch.randn(4, 6)
    targets = torch.tensor([[0.5, 0.25, 0.25, 0, 0, 0]]).repeat(4, 1)
    weight = torch.tensor([[1.0, 1.0, 1.0, 0.0, 2.0, 1.0]]).repeat(4, 1)
    z = (weight * logits.exp()).sum(1, keepdim=True)
    expected = -(targets * (logits - z.log())).sum(1).mean()
    assert torch.allclose(weighted_infonce(logits, targets, weight.log()), expected, atol=1e-6)


def test_negative_mass_replaces_the_negatives_term():
    logits = torch.randn(4, 6)
    log_mass = torch.randn(4)
    expected = -(logits[:, 0] - torch.logaddexp(logits[:, 0], log_mass)).mean()
    assert torch.allclose(weighted_infonce(logits, neg_log_mass=log_mass), expected, atol=1e-6)


def test_module_loss_with_no_mining_equals_reference_moco_v2(cfg_factory):
    _, module, _ = build(cfg_factory(["debug=tiny", "logger=none", "dataset=digits", "trainer.fast_dev_run=true"]))
    b, k, tau = 8, module.bank.size, module.cfg_model["temperature"]
    q, key = unit(b, 128, seed=1), unit(b, 128, seed=2)
    module.bank.keys.copy_(unit(k, 128, seed=3))
    module.bank.indices.copy_(torch.arange(k) + 1000)  # no bank entry comes from this batch
    loss, *_ = module.contrast(q, key, torch.arange(b))
    reference = F.cross_entropy(
        torch.cat([(q * key).sum(1, keepdim=True), q @ module.bank.keys.T], 1) / tau, torch.zeros(b, dtype=torch.long)
    )
    assert torch.equal(loss, reference)


def test_all_negatives_drops_the_query_own_image_from_the_bank():
    q, k, bank = unit(3, 8, seed=1), unit(3, 8, seed=2), unit(6, 8, seed=3)
    ctx = MiningContext(q, k, bank, q @ bank.T, torch.tensor([5, 0, 9, 1, 2, 0]), torch.tensor([0, 1, 2]), 0.2)
    weight = AllNegatives()(ctx).weight
    assert weight.tolist() == [[1, 0, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 0, 1]]
    assert AllNegatives(exclude_self=False)(ctx).weight is None
    assert NoPositives()(ctx).index.shape == (3, 0)


def test_targets_mix_augmented_and_mined_positives():
    from mcl.mining.base import PositiveSelection

    pos = PositiveSelection(index=torch.tensor([[2, 0], [1, 3]]), weight=torch.tensor([[0.75, 0.25], [0.0, 0.0]]), lam=0.5)
    t = build_targets(pos, 4, torch.zeros(2, 5))
    assert torch.allclose(t[0], torch.tensor([0.5, 0.125, 0.0, 0.375, 0.0]))
    assert torch.allclose(t[1], torch.tensor([1.0, 0, 0, 0, 0]))  # nothing mined: the augmented positive only


def test_bank_enqueue_wraps_around_and_moves_the_pointer():
    bank = MemoryBank(size=6, dim=4)
    assert not bank.is_full and bank.indices.eq(-1).all()
    for step in range(4):
        keys = torch.full((2, 4), float(step))
        bank.enqueue(keys, torch.tensor([2 * step, 2 * step + 1]), torch.tensor([step, step]))
    # 8 keys into 6 slots: step 3 overwrote slots 0-1, the pointer is at 2
    assert int(bank.ptr) == 2 and bank.is_full
    assert bank.indices.tolist() == [6, 7, 2, 3, 4, 5]
    assert bank.keys[:, 0].tolist() == [3, 3, 1, 1, 2, 2]
    assert bank.labels.tolist() == [3, 3, 1, 1, 2, 2]
    with pytest.raises(AssertionError, match="multiple"):
        bank.enqueue(torch.zeros(4, 4), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    bank.load_state_dict(MemoryBank(size=6, dim=4).state_dict())  # a checkpoint taken before the bank filled
    assert not bank.is_full and int(bank.ptr) == 0


def test_schedules():
    assert momentum_at(0.99, 0.0, "cosine") == pytest.approx(0.99) and momentum_at(0.99, 1.0, "cosine") == pytest.approx(1.0)
    assert momentum_at(0.99, 0.5, "const") == 0.99
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1) and warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0) and warmup_cosine(100, 10, 100) == pytest.approx(0.0)


@pytest.mark.parametrize("arch,width,dim", [("resnet18", 16, 128), ("resnet50", 8, 256)])
def test_backbone_width_and_stems(arch, width, dim):
    for stem, size in ((True, 32), (False, 64)):
        net = WidthResNet(arch, width=width, cifar_stem=stem)
        assert net(torch.randn(2, 3, size, size)).shape == (2, dim) and net.out_dim == dim


@pytest.mark.parametrize("width", [0, -16, 1.5, "16", True])
def test_width_must_be_a_positive_integer(width):
    with pytest.raises(ValueError, match="backbone.width must be a positive integer"):
        WidthResNet("resnet18", width=width)
