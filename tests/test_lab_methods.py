"""The lab's other rows as mcl presets: BYOL, MSF, CMSF, SCE, ReSSL and UnMix (pc-cp/Benchmark-Methods-For-MNN,
network/BYOL.py, MSF.py, CMSF.py, SCE.py, ReSSL.py, main_pretrain.py), each step checked against the lab's
formula written out below, on the module's own tiny network in float64.

Where mcl and the lab differ, on purpose (docs/experiments.md):
- an older key of the query's own image in the bank: mcl never takes it as a neighbour, a relational
  target or a negative (exclude_self); the lab keeps it. The references mask it the same way.
- warm-up: until the bank holds only real keys, mcl mines nothing (MSF is BYOL, SCE and ReSSL are
  MoCo's InfoNCE); the lab searches the random initial bank.
- both directions read the bank as it was before the step's enqueue (the lab's SCE and CMSF do; its
  MSF enqueues between its two directions).
- ShuffleBN is off here (tests/test_protocol.py checks it); the key encoders are the module's own.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import MICRO, make_cfg
from torch.nn import functional as F

from mcl.train import ConfigError, build, build_module, train
from mcl.views import draw_mix

B, K = 16, 32
INDEX = torch.arange(B) + 10
LABELS = torch.arange(B) % 3
SMALL = ["logger=none", "callbacks=none", "dataset=digits", "dataset.image_size=16", "backbone.width=8", f"data.batch_size={B}"]
SMALL += ["data.num_workers=0", f"model.queue_size={K}", "model.proj_hidden=32", "model.pred_hidden=32", "model.shuffle_bn=false"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def module_for(tmp_path, preset: str, *overrides: str):
    torch.manual_seed(0)
    module = build_module(make_cfg([f"experiment={preset}", *SMALL, *overrides], tmp_path), num_classes=10).double()
    module._trainer = SimpleNamespace(  # what training_step reads from its trainer
        estimated_stepping_batches=10, global_step=0, world_size=1, _logger_connector=SimpleNamespace(should_update_logs=False)
    )
    module.log = lambda *args, **kwargs: None
    return module


def fill(bank, full: bool, seed: int = 0) -> torch.Tensor:
    """Real keys into `bank` (all K slots, or B of them: not full), two of them older keys of image 2.
    Returns the B x K own-image mask (mcl's exclude_self)."""
    n = K if full else B
    keys = F.normalize(torch.randn(n, bank.keys.shape[1], generator=gen(seed), dtype=torch.float64), dim=1)
    bank.enqueue(keys, torch.arange(1000, 1000 + n), torch.arange(n) % 10)
    bank.indices[[3, 9]] = INDEX[2]
    assert bank.is_full is full
    return bank.indices[None, :] == INDEX[:, None]


def images(*seeds: int) -> list[torch.Tensor]:
    return [torch.randn(B, 3, 16, 16, generator=gen(s), dtype=torch.float64) for s in seeds]


def step(module, views: list[torch.Tensor], batch_idx: int = 0) -> tuple[torch.Tensor, list, list]:
    """training_step's loss (without the linear probe's) and its encoder gradients."""
    encoder = [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("linear_probe")]
    loss = module.training_step((*views, INDEX, LABELS), batch_idx)
    probe = F.cross_entropy(module.linear_probe(module.backbone(views[0]).detach()), LABELS)
    return loss - probe, torch.autograd.grad(loss, encoder), encoder


def check(module, loss, grads, encoder, reference) -> None:
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(grads, torch.autograd.grad(reference, encoder, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-11)


def online(module, x):
    """(prediction, projection) of a view through the online encoder."""
    z = module.projector(module.backbone(x))
    return module.predictor(z), z


def key(module, x):
    return module.key_projector(module.key_backbone(x)).detach()


# --- the lab's formulas ----------------------------------------------------------------------
def lab_byol(p, z_k):
    """network/BYOL.py, one direction: the diagonal of 2 - 2 q . k, averaged."""
    q, k = F.normalize(p, dim=1), F.normalize(z_k, dim=1)
    return torch.diag(2 - 2 * torch.einsum("bc,kc->bk", q, k)).mean()


def own_block(n, width):
    """n x n*width: 1 where the column belongs to the row's own key (the lab's generation_mask_with_pos)."""
    return torch.eye(n, dtype=torch.float64).repeat_interleave(width, dim=1)


def neighbours_of(z, bank, own, topk):
    """util/NNMemoryBankModule.py's search (cosine, top-k, most similar first), own-image entries masked (mcl)."""
    sim = (F.normalize(z, dim=1) @ F.normalize(bank, dim=1).T).masked_fill(own, float("-inf"))  # B x K
    return sim.topk(topk, dim=1).indices  # B x k


def lab_msf_given(p, z_k, bank, slots):
    """network/MSF.py's loss for the neighbours in `slots` (B x k): the in-batch B x B(1+k) distances, the own block kept."""
    topk = slots.shape[1]
    candidates = torch.cat([z_k[:, None], bank[slots]], dim=1).reshape(-1, z_k.shape[1])  # B(1+k) x D: key j, then its neighbours
    dist = 2 - 2 * torch.einsum("bc,kc->bk", F.normalize(p, dim=1), F.normalize(candidates, dim=1))  # B x B(1+k)
    return ((dist * own_block(len(p), 1 + topk)).sum(dim=1) / (1 + topk)).mean()


def lab_msf(p, z_k, bank, own, topk=5):
    return lab_msf_given(p, z_k, bank, neighbours_of(z_k, bank, own, topk))


def lab_cmsf(p, z_k, z_v, bank, aux_bank, own, topk=5):
    """network/CMSF.py: MSF's loss, averaged with the same loss whose neighbours are the bank slots nearest z_v in the auxiliary bank."""
    return (lab_msf(p, z_k, bank, own, topk) + lab_msf_given(p, z_k, bank, neighbours_of(z_v, aux_bank, own, topk))) / 2


def lab_sce(z_q, z_k, bank, own, tem=0.05, coeff=0.5):
    """network/SCE.py; own-image bank entries masked in both distributions (mcl)."""
    q, k, bank = F.normalize(z_q, dim=1), F.normalize(z_k, dim=1), F.normalize(bank, dim=1)
    onehot = F.one_hot(torch.zeros(len(q), dtype=torch.long), 1 + len(bank)).double()
    sim_k = torch.cat([torch.zeros(len(q), 1, dtype=q.dtype), (k @ bank.T).masked_fill(own, float("-inf"))], dim=1)
    w = F.normalize(coeff * onehot + (1 - coeff) * F.softmax(sim_k / tem, dim=1), p=1, dim=1)
    sim_q = torch.cat([torch.einsum("nc,nc->n", q, k)[:, None], (q @ bank.T).masked_fill(own, float("-inf"))], dim=1)
    log_p = torch.where(w > 0, F.log_softmax(sim_q / 0.1, dim=1), torch.zeros_like(w))
    return -(w * log_p).sum(dim=1).mean()


def lab_ressl(z_q, z_k, bank, own, tem=0.04):
    """network/ReSSL.py; own-image bank entries masked in both distributions (mcl)."""
    q, k, bank = F.normalize(z_q, dim=1), F.normalize(z_k, dim=1), F.normalize(bank, dim=1)
    target = F.softmax((k @ bank.T).masked_fill(own, float("-inf")) / tem, dim=1)
    log_p = torch.where(target > 0, F.log_softmax((q @ bank.T).masked_fill(own, float("-inf")) / 0.1, dim=1), torch.zeros_like(target))
    return -(target * log_p).sum(dim=1).mean()


def moco(z_q, z_k, bank, own, tau):
    """MoCo's InfoNCE (what SCE and ReSSL are during warm-up)."""
    q, k = F.normalize(z_q, dim=1), F.normalize(z_k, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), (q @ bank.T).masked_fill(own, float("-inf"))], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))


def lab_mix(x, lam, box):
    """main_pretrain.py's UnMix mixing of a view with the reversed batch: (mixed, mixed reversed, lam)."""
    reverse = torch.flip(x, (0,))
    if box is None:
        mixed = lam * x + (1 - lam) * reverse
    else:
        r1, r2, c1, c2 = box
        mixed = x.clone()
        mixed[:, :, r1:r2, c1:c2] = reverse[:, :, r1:r2, c1:c2]
        lam = 1 - ((r2 - r1) * (c2 - c1) / (x.size()[-1] * x.size()[-2]))  # the pixel ratio
    return mixed, torch.flip(mixed, (0,)), lam


# --- one step against the formulas ----------------------------------------------------------------
def test_byol_step_equals_the_labs_byol(tmp_path):
    module = module_for(tmp_path, "byol")
    assert module.objective == "regression" and module.cfg_model["momentum"] == 0.99
    assert [type(m).__name__ for m in module.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]  # 512-2048 (BN, ReLU)-128
    assert [type(m).__name__ for m in module.predictor] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    fill(module.bank, full=True)
    x1, x2 = images(1, 2)
    loss, grads, encoder = step(module, [x1, x2])
    (p1, _), (p2, _) = online(module, x1), online(module, x2)
    check(module, loss, grads, encoder, (lab_byol(p1, key(module, x2)) + lab_byol(p2, key(module, x1))) / 2)


@pytest.mark.parametrize("full", [False, True], ids=["warm-up", "full bank"])
def test_msf_step_equals_the_labs_msf(tmp_path, full):
    module = module_for(tmp_path, "msf")
    own = fill(module.bank, full)
    x1, x2 = images(1, 2)
    module.bank.keys[3] = F.normalize(key(module, x2)[2], dim=0)  # an older key of image 2, its nearest entry
    bank = module.bank.keys.clone()
    loss, grads, encoder = step(module, [x1, x2])
    (p1, _), (p2, _), k1, k2 = online(module, x1), online(module, x2), key(module, x1), key(module, x2)
    if full:
        reference = (lab_msf(p1, k2, bank, own) + lab_msf(p2, k1, bank, own)) / 2
        assert neighbours_of(k2, bank, own, 5)[2].ne(3).all() and neighbours_of(k2, bank, torch.zeros_like(own), 5)[2, 0] == 3
    else:  # warm-up: BYOL until the bank holds real keys only
        reference = (lab_byol(p1, k2) + lab_byol(p2, k1)) / 2
    check(module, loss, grads, encoder, reference)


def test_msf_takes_the_papers_weights_and_refuses_negative_mining(tmp_path):
    """experiment=msf mining.positive=soft_hard: the same regression, the neighbours weighed by the paper's rule."""
    module = module_for(tmp_path, "msf", "mining.positive=soft_hard")
    own = fill(module.bank, full=True)
    x1, x2 = images(1, 2)
    bank = module.bank.keys.clone()
    loss, grads, encoder = step(module, [x1, x2])

    def soft_hard(p, z_k):
        q = F.normalize(p, dim=1)  # the query (here MSF's prediction), with its gradient
        sim = (F.normalize(z_k, dim=1) @ bank.T).masked_fill(own, float("-inf"))
        _, slots = sim.topk(5, dim=1)  # the neighbours are searched by the key
        w = F.softmax(torch.einsum("bd,bkd->bk", q, bank[slots]), dim=1)  # the lab's SNCLR: softmax(cos(q, n)), temperature 1
        w = w * (w > 1 / 5)  # kept where > 1/k, not renormalised
        targets = torch.cat([torch.full((B, 1), 0.5, dtype=w.dtype), 0.5 * w], dim=1)  # lam = 0.5 on the key
        c = torch.cat([F.normalize(z_k, dim=1)[:, None], bank[slots]], dim=1)  # B x (1+k) x D
        return (targets * (2 - 2 * torch.einsum("bd,bkd->bk", q, c))).sum(1).mean()

    (p1, _), (p2, _) = online(module, x1), online(module, x2)
    check(module, loss, grads, encoder, (soft_hard(p1, key(module, x2)) + soft_hard(p2, key(module, x1))) / 2)
    with pytest.raises(ConfigError, match="model.objective=regression has no negatives"):
        build(make_cfg(["experiment=msf", *SMALL, "mining.negative=gradient"], tmp_path))


@pytest.mark.parametrize("full", [False, True], ids=["warm-up", "full bank"])
def test_cmsf_step_with_three_views_equals_the_labs_cmsf(tmp_path, full):
    module = module_for(tmp_path, "cmsf")
    assert module.aux_bank is not None and "aux_bank.keys" in module.state_dict()
    own = fill(module.bank, full)
    fill(module.aux_bank, full, seed=5)
    bank, aux_bank = module.bank.keys.clone(), module.aux_bank.keys.clone()
    x1, x2, x3 = images(1, 2, 3)
    loss, grads, encoder = step(module, [x1, x2, x3])
    (p1, _), (p2, _) = online(module, x1), online(module, x2)
    k1, k2, k3 = (key(module, x) for x in (x1, x2, x3))
    if full:
        reference = (lab_cmsf(p1, k2, k3, bank, aux_bank, own) + lab_cmsf(p2, k1, k3, bank, aux_bank, own)) / 2
        assert not torch.equal(neighbours_of(k2, bank, own, 5), neighbours_of(k3, aux_bank, own, 5))  # two sets of neighbours
    else:
        reference = (lab_byol(p1, k2) + lab_byol(p2, k1)) / 2
    check(module, loss, grads, encoder, reference)
    module.on_after_backward()  # the main bank takes view 2's keys, the auxiliary one view 3's, in the same slots
    slots = slice(0, B) if full else slice(B, 2 * B)
    torch.testing.assert_close(module.bank.keys[slots], F.normalize(k2, dim=1))
    torch.testing.assert_close(module.aux_bank.keys[slots], F.normalize(k3, dim=1))
    assert torch.equal(module.bank.indices[slots], module.aux_bank.indices[slots])


@pytest.mark.parametrize("full", [False, True], ids=["warm-up", "full bank"])
def test_sce_step_equals_the_labs_sce(tmp_path, full):
    module = module_for(tmp_path, "sce")
    assert module.cfg_model["proj_out"] == 256 and module.bank.keys.shape == (K, 256)
    own = fill(module.bank, full)
    bank = module.bank.keys.clone()
    x1, x2 = images(1, 2)
    loss, grads, encoder = step(module, [x1, x2])
    (_, z1), (_, z2), k1, k2 = online(module, x1), online(module, x2), key(module, x1), key(module, x2)
    lab = lab_sce if full else lambda q, k, b, o: moco(q, k, b, o, 0.1)
    check(module, loss, grads, encoder, (lab(z1, k2, bank, own) + lab(z2, k1, bank, own)) / 2)


@pytest.mark.parametrize("full", [False, True], ids=["warm-up", "full bank"])
def test_ressl_step_equals_the_labs_ressl_in_one_direction(tmp_path, full):
    module = module_for(tmp_path, "ressl")
    own = fill(module.bank, full)
    bank = module.bank.keys.clone()
    x1, x2 = images(1, 2)
    loss, grads, encoder = step(module, [x1, x2])
    (_, z1), k2 = online(module, x1), key(module, x2)
    reference = lab_ressl(z1, k2, bank, own) if full else moco(z1, k2, bank, own, 0.1)
    check(module, loss, grads, encoder, reference)


def test_sce_and_ressl_take_a_band_of_negatives(tmp_path):
    """experiment=sce mining.negative=gradient: the relational targets and the normaliser both lose the band's dropped entries."""
    module = module_for(tmp_path, "sce", "mining.negative=gradient", "mining.negative.start=0.25", "mining.negative.end=0.75")
    own = fill(module.bank, full=True)
    bank = module.bank.keys.clone()
    x1, x2 = images(1, 2)
    loss, grads, encoder = step(module, [x1, x2])
    (_, z1), (_, z2), k1, k2 = online(module, x1), online(module, x2), key(module, x1), key(module, x2)

    def dropped(k):
        sim = (F.normalize(k, dim=1) @ bank.T).masked_fill(own, float("-inf"))
        order = sim.argsort(dim=1, descending=True)
        keep = torch.zeros_like(own).scatter_(1, order[:, 8:24], True)
        return ~keep | own

    reference = (lab_sce(z1, k2, bank, dropped(k2)) + lab_sce(z2, k1, bank, dropped(k1))) / 2
    check(module, loss, grads, encoder, reference)
    with pytest.raises(ConfigError, match=r"relational positives .*\(mining.negative=hard / debiased\)"):
        build(make_cfg(["experiment=ressl", *SMALL, "mining.negative=hard"], tmp_path))


@pytest.mark.parametrize("batch_idx,kind", [(1, "mixup"), (0, "cutmix")])
def test_unmix_step_equals_the_labs_mixing_and_loss(tmp_path, batch_idx, kind):
    module = module_for(tmp_path, "unmix")
    lam, box = draw_mix(0, 0, batch_idx, 16, 16)  # the module's draw: data seed 0 without a data module, step 0
    assert (box is None) == (kind == "mixup")
    fill(module.bank, full=True)
    x1, x2 = images(1, 2)
    loss, grads, encoder = step(module, [x1, x2], batch_idx)
    mixed, flipped, lab_lam = lab_mix(x2, lam, box)  # cutmix: lam recomputed from the box, as the lab does
    assert lab_lam == pytest.approx(lam, abs=1e-15)

    def pair(a, b):  # the lab's symmetric BYOL of one model call
        return (lab_byol(online(module, a)[0], key(module, b)) + lab_byol(online(module, b)[0], key(module, a))) / 2

    reference = pair(x1, x2) + lam * pair(x1, mixed) + (1 - lam) * pair(x1, flipped)
    check(module, loss, grads, encoder, reference)


def test_unmix_draws_are_seeded_uniform_and_half_cutmix():
    draws = [draw_mix(7, step, 0, 32, 32) for step in range(2000)]
    assert draws == [draw_mix(7, step, 0, 32, 32) for step in range(2000)]  # resume draws the same
    assert draws != [draw_mix(8, step, 0, 32, 32) for step in range(2000)]
    mixup = [lam for lam, box in draws if box is None]
    assert 0.45 < len(mixup) / len(draws) < 0.55
    assert 0.47 < sum(mixup) / len(mixup) < 0.53 and min(mixup) < 0.02 and max(mixup) > 0.98  # Beta(1, 1)
    for lam, (r1, r2, c1, c2) in (d for d in draws if d[1] is not None):
        assert 0 <= r1 <= r2 <= 32 and 0 <= c1 <= c2 <= 32 and lam == 1 - (r2 - r1) * (c2 - c1) / 1024


# --- training -------------------------------------------------------------------------------------
class FiniteGradients(L.Callback):
    def __init__(self):
        self.checked = 0

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        self.checked += 1


@pytest.mark.parametrize("preset", ["byol", "msf", "cmsf", "sce", "ressl", "unmix"])
def test_each_preset_trains_past_a_full_bank_with_finite_gradients(tmp_path, preset):
    """MICRO: 16 keys a step into a 128-key bank, full after 8 steps; 10 steps run."""
    cfg = make_cfg(
        [*MICRO, f"experiment={preset}", "logger=none", "callbacks=none", "trainer.max_epochs=1", "trainer.limit_train_batches=10"],
        tmp_path,
    )
    cfg.model.proj_hidden = cfg.model.pred_hidden = 64
    datamodule, module, trainer = build(cfg)
    probe = FiniteGradients()
    trainer.callbacks.append(probe)
    trainer.fit(module, datamodule)
    assert trainer.global_step == 10 and module.bank.is_full and probe.checked == 10
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    metrics = {
        k.removeprefix("mining/").removesuffix("_epoch"): v.item() for k, v in trainer.callback_metrics.items() if k.startswith("mining/")
    }
    if preset in ("msf", "cmsf"):  # neighbour-based: kept neighbours and their purity
        assert metrics["pos_kept"] == 5 and 0 <= metrics["pos_purity"] <= 1
    if preset in ("sce", "ressl"):  # relational: the purity of the target mass and its entropy
        assert 0 <= metrics["target_purity"] <= 1 and 0 < metrics["target_entropy"] <= math.log(129)
    if preset in ("byol", "unmix"):  # no negatives, nothing mined
        assert not any(name.startswith(("neg_", "pos_", "target_")) for name in metrics)


@pytest.mark.parametrize("batched", [False, True], ids=["per-image", "batched"])
def test_cmsf_gets_a_third_weak_view_from_either_data_path(tmp_path, batched):
    """data.extra_view=weak: (strong, weak, weak) views of each image, then index and label, on both data paths."""
    cfg = make_cfg([*MICRO, "experiment=cmsf", "logger=none", "callbacks=none", f"data.batched_augment={str(batched).lower()}"], tmp_path)
    cfg.trainer.max_epochs, cfg.trainer.limit_train_batches, cfg.trainer.limit_val_batches = 1, 2, 0
    datamodule, module, trainer = build(cfg)
    seen = []
    module.training_step = lambda batch, i, step=module.training_step: seen.append(batch) or step(batch, i)
    trainer.fit(module, datamodule)
    x1, x2, x3, index, labels = seen[0]
    assert x1.shape == x2.shape == x3.shape == (16, 3, 16, 16) and index.shape == labels.shape == (16,)
    assert not torch.equal(x2, x3) and not torch.equal(x1, x3)  # three draws
    assert torch.equal(labels, torch.from_numpy(datamodule.train_images.labels)[index])
    assert module.aux_bank.num_written.item() == module.bank.num_written.item() == 32


def test_aux_view_and_extra_view_go_together(tmp_path):
    with pytest.raises(ConfigError, match=r"model.aux_view=True and data.extra_view=None go together"):
        build(make_cfg(["experiment=cmsf", *SMALL, "data.extra_view=null"], tmp_path))
    with pytest.raises(ConfigError, match=r"needs model.candidates=bank .* and a neighbour rule for mining.positive"):
        build(make_cfg(["experiment=cmsf", *SMALL, "mining.positive=none"], tmp_path))
    with pytest.raises(ConfigError, match=r"model.objective=regression regresses .* model.candidates=batch"):
        build(make_cfg(["experiment=byol", *SMALL, "model.candidates=batch"], tmp_path))


DEMO = ["dataset=digits", "dataset.image_size=16", "backbone.width=16", "data.batch_size=32", "data.num_workers=0"]
DEMO += ["data.augment.crop_scale=[0.6,1.0]", "data.augment.jitter=[0.4,0.4,0.0,0.0]", "data.augment.gray_prob=0.0"]
DEMO += [
    "data.augment.flip_prob=0.0",
    "data.augment.weak_flip_prob=0.0",
    "model.queue_size=256",
    "model.proj_hidden=512",
    "model.pred_hidden=512",
    "optim.warmup_epochs=1",
]
DEMO += [
    "trainer=cpu",
    "trainer.max_epochs=3",
    "trainer.check_val_every_n_epoch=3",
    "monitor.at_start=true",
    "logger=none",
    "callbacks=none",
]


@pytest.mark.slow
@pytest.mark.parametrize("preset,lr", [("byol", 0.3), ("sce", 1.0), ("ressl", 1.0)])
def test_byol_sce_and_ressl_learn_the_digits(tmp_path, preset, lr):
    """Three CPU epochs on the digits (the demo's recipe, no flips in either view): kNN top-1 far above chance
    (0.1; a collapsed encoder scores near it). Not yet above the random network's 0.786 at this budget
    (measured: BYOL 0.757, SCE 0.771, ReSSL 0.755), so that is not asserted; MoCo v2's gain is (test_learning)."""
    summary = train(make_cfg([f"experiment={preset}", *DEMO, f"optim.lr={lr}", "seed=0"], tmp_path / "run"))
    after = summary["val/knn_top1"]
    assert after > 0.6, f"{preset}: kNN top-1 {after:.3f} after 3 epochs"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["unmix", "cmsf"])
def test_unmix_and_cmsf_resume_exactly(tmp_path, preset):
    """UnMix's draws come from (data seed, step, batch) and CMSF's auxiliary bank is checkpointed: a run resumed
    mid-epoch ends bit for bit where the uninterrupted one does."""
    from test_resume import KEEP_ALL, assert_same_training_state, load, run

    run(tmp_path / "whole", f"experiment={preset}", "model.pred_hidden=64", *KEEP_ALL)
    run(tmp_path / "resumed", f"experiment={preset}", "model.pred_hidden=64", f"ckpt_path={tmp_path / 'whole' / 'kept' / 'step4.ckpt'}")
    got, ref = (load(tmp_path / run_dir / "checkpoints" / "last.ckpt") for run_dir in ("resumed", "whole"))
    assert_same_training_state(got, ref)
    assert preset != "cmsf" or "aux_bank.keys" in ref["state_dict"]
