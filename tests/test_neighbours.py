"""model.candidates=neighbours: NNCLR and SNCLR as the lab runs them (pc-cp/Benchmark-Methods-For-MNN,
network/NNCLR.py, network/SNCLR.py, util/NNMemoryBankModule.py), checked against the lab's formulas
written out below.

What the lab does and what mcl does, where they could differ:
- bank read: the lab's SNCLR computes both directions before its enqueue; its NNCLR enqueues the
  view-2 keys in the first direction, so the second direction searches a bank that holds this
  step's keys. mcl searches the bank as it was before this step's enqueue in both directions (the
  references below read one bank for both).
- an older key of the query's own image: the lab has no dataset indices and keeps it (as a
  neighbour, and as a candidate of other queries); exclude_self=false does the same, bit for bit;
  exclude_self=true (the default) skips it in the search and drops it from the query's normaliser.
- a bank not yet full: both search the random unit vectors of the unwritten slots too.
- ties: both take torch.topk's choice; identical neighbours get identical weights, and SNCLR's
  threshold (weight > 1/k, strict) zeroes k tied weights of exactly 1/k.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import MICRO, TINY, make_cfg, run_cli
from torch.nn import functional as F

from mcl.bank import MemoryBank
from mcl.mining.diagnostics import NAMES, MiningMeter
from mcl.neighbours import NeighbourContrast, neighbour_diagnostics
from mcl.train import ConfigError, build, build_module, check_config

B, D, K = 6, 16, 32
INDEX = torch.arange(100, 100 + B)  # dataset indices of the batch


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the lab's formulas ----------------------------------------------------------------------
def lab_search(z_k, bank, topk, exclude=None):
    """The lab's nearest-neighbour search: cosine of the key to every bank entry, top-k, neighbours
    of key 0 first (B*k x D). exclude (B x K bool): mcl's exclude_self, not the lab's."""
    sim = F.normalize(z_k, dim=1) @ F.normalize(bank, dim=1).T  # B x K
    if exclude is not None:
        sim = sim.masked_fill(exclude, float("-inf"))
    slot = sim.topk(topk, dim=1).indices  # B x k
    return bank[slot.reshape(-1)], slot


def own_block(n, width):
    """n x n*width: 1 where the column belongs to the row's own key (the lab's generation_mask)."""
    return torch.eye(n).repeat_interleave(width, dim=1)


def log_softmax_where(logits, target, dim):
    """log_softmax, 0 where the target is 0 (a dropped candidate's -inf times 0 would be nan)."""
    return torch.where(target > 0, F.log_softmax(logits, dim=dim), torch.zeros_like(logits))


def lab_nnclr(p_q, z_k, bank, topk, tem, exclude=None, drop=None):
    """One direction of the lab's NNCLR: every neighbour against the queries and every query against
    the neighbours, targets generation_mask (k ones per query, not normalised), the two averaged."""
    nn, _ = lab_search(z_k, bank, topk, exclude)
    p, nn = F.normalize(p_q, dim=1), F.normalize(nn, dim=1)
    labels = own_block(p.shape[0], topk)  # B x Bk
    logits_1, logits_2 = nn @ p.T / tem, p @ nn.T / tem  # Bk x B, B x Bk
    if drop is not None:
        logits_1, logits_2 = logits_1.masked_fill(drop.T, -math.inf), logits_2.masked_fill(drop, -math.inf)
    term_1 = (labels.T * log_softmax_where(logits_1, labels.T, 1)).sum(1).mean()
    term_2 = (labels * log_softmax_where(logits_2, labels, 1)).sum(1).mean()
    return -(term_1 + term_2) / 2


def lab_snclr(p_q, z_q, z_k, bank, topk, tem, threshold, exclude=None, drop=None):
    """One direction of the lab's SNCLR: candidates [key j, its k neighbours] for every j, targets 1 on
    the own key and softmax(z_q . neighbours + (-999 off the own block)) on the own neighbours."""
    n = p_q.shape[0]
    nn, _ = lab_search(z_k, bank, topk, exclude)  # Bk x D
    keep = torch.cat([z_k[:, None], nn.view(n, topk, -1)], dim=1).reshape(n * (1 + topk), -1)
    logits = F.normalize(p_q, dim=1) @ F.normalize(keep, dim=1).T / tem  # B x B(1+k)
    attn = F.normalize(z_q, dim=1) @ F.normalize(nn, dim=1).T  # B x Bk
    attn = F.softmax(attn + (own_block(n, topk) - 1) * 999, dim=1)
    if threshold:
        attn = attn * (attn > 1.0 / topk).long()
    scores = torch.cat([torch.eye(n).view(n, n, 1), attn.view(n, n, topk)], dim=2).view(n, -1)  # B x B(1+k)
    if drop is not None:
        logits = logits.masked_fill(drop, -math.inf)
    return -(scores * log_softmax_where(logits, scores, 1)).sum(1).mean()


def own_image_drop(bank, z_k, topk, exclude, with_keys):
    """mcl's exclude_self, written out: B x C candidates that are a key of the query's own image but
    not one of its targets (C = B*k neighbours, or B*(1+k) with the keys)."""
    _, slot = lab_search(z_k, bank.keys, topk, exclude)
    index = bank.indices[slot]  # B x k
    if with_keys:
        index = torch.cat([INDEX[:, None], index], dim=1)
    own = own_block(B, index.shape[1]).bool()
    return (index.reshape(1, -1) == INDEX[:, None]) & ~own


# --- awkward inputs ----------------------------------------------------------------------------
def awkward_batch():
    """Keys of both views (close to each other), a half-written bank and leaf tensors for the queries.

    Bank slots 0..15 written, 16..31 still random (index -1). Slot 0: an older key of image 0 next to
    key 0; slot 1: an older key of image 1 next to key 2 (a candidate of query 2 that is query 1's own
    image); slots 2..6: five identical entries next to key 3 (ties); key 4 sits next to unwritten slot 31.
    """
    bank = MemoryBank(K, D)
    bank.keys.copy_(F.normalize(torch.randn(K, D, generator=gen(0)), dim=1))
    bank.enqueue(F.normalize(torch.randn(16, D, generator=gen(1)), dim=1), torch.arange(500, 516), torch.arange(16) % 3)
    base = F.normalize(torch.randn(B, D, generator=gen(2)), dim=1)  # B x D
    base[4] = bank.keys[31]
    near = lambda v, s: F.normalize(v + 0.05 * torch.randn(D, generator=gen(s)), dim=0)  # noqa: E731
    bank.keys[0], bank.indices[0] = near(base[0], 10), INDEX[0]
    bank.keys[1], bank.indices[1] = near(base[2], 11), INDEX[1]
    bank.keys[2:7] = near(base[3], 12)
    k1, k2 = (F.normalize(base + 0.01 * torch.randn(B, D, generator=gen(s)), dim=1) for s in (3, 4))
    p1, p2, z1, z2 = (torch.randn(B, D, generator=gen(s)).requires_grad_(True) for s in (5, 6, 7, 8))
    labels = torch.tensor([0, 1, 2, 0, 1, -1])
    return bank, (k1, k2), (p1, p2, z1, z2), labels


CASES = [  # rule, topk, threshold, exclude_self
    ("nnclr", 1, False, False),
    ("nnclr", 5, False, False),
    ("snclr", 5, False, False),
    ("snclr", 5, True, False),
    ("nnclr", 5, False, True),
    ("snclr", 5, True, True),
]


@pytest.mark.parametrize("rule,topk,threshold,exclude_self", CASES)
def test_one_step_loss_and_gradients_equal_the_labs_formula(rule, topk, threshold, exclude_self):
    bank, (k1, k2), (p1, p2, z1, z2), labels = awkward_batch()
    contrast = NeighbourContrast(rule, topk, threshold, exclude_self)
    views = ((F.normalize(p1, dim=1), z1, k2), (F.normalize(p2, dim=1), z2, k1))
    loss, stats = contrast(views, bank, INDEX, labels, tau=0.2)

    exclude = bank.indices[None, :] == INDEX[:, None] if exclude_self else None  # B x K
    reference = 0
    for p, z, k in ((p1, z1, k2), (p2, z2, k1)):  # one bank for both directions: before this step's enqueue
        drop = own_image_drop(bank, k, topk, exclude, rule == "snclr") if exclude_self else None
        if rule == "nnclr":
            direction = lab_nnclr(p, k, bank.keys, topk, 0.2, exclude, drop)
        else:
            direction = lab_snclr(p, z, k, bank.keys, topk, 0.2, threshold, exclude, drop)
        reference = reference + 0.5 * direction
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    ours = torch.autograd.grad(loss, (p1, p2, z1, z2), allow_unused=True, materialize_grads=True)
    theirs = torch.autograd.grad(reference, (p1, p2, z1, z2), allow_unused=True, materialize_grads=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if rule == "snclr":  # the soft targets carry gradient into the projection, as in the lab
        assert ours[2].abs().sum() > 0

    # the awkward rows are there
    _, slot = lab_search(k2, bank.keys, topk, exclude)
    assert (bank.indices[slot] == -1).any()  # a neighbour from an unwritten slot
    assert (slot[0] == 0).any() != exclude_self  # the older key of image 0: key 0's neighbour unless excluded
    assert (slot[2] == 1).any()  # query 1's own image is a candidate of query 2
    if topk == 5:
        assert sorted(slot[3].tolist()) == [2, 3, 4, 5, 6]  # five tied neighbours
    if rule == "snclr" and threshold:
        kept = sum(direction[0, NAMES.index("pos_kept")] for direction in stats) / (2 * len(INDEX))
        assert kept < topk  # tied weights of exactly 1/k, and others, were zeroed


# --- through the module ------------------------------------------------------------------------
SMALL = [*TINY, "callbacks=none", "backbone.width=8", "model.proj_hidden=32", "model.pred_hidden=32", "model.queue_size=32"]


def small_module(tmp_path, *overrides):
    return build_module(make_cfg([*SMALL, *overrides], tmp_path), num_classes=10)


@pytest.mark.parametrize("preset", ["nnclr", "snclr"])
def test_module_step_equals_the_labs_formula_on_a_tiny_network(tmp_path, preset):
    """training_step's loss and encoder gradients equal the lab's loss on the module's own encoders
    (the forward pass is the module's: each view its own batch, SplitBatchNorm; SNCLR's keys from the
    EMA copy, here without ShuffleBN, which test_protocol checks). In float64, so that the comparison
    is tight through a whole ResNet."""
    module = small_module(tmp_path, f"experiment={preset}", "model.neighbours.exclude_self=false", "model.shuffle_bn=false").double()
    bank = F.normalize(torch.randn(32, 128, generator=gen(0), dtype=torch.float64), dim=1)  # 32 x 128, unit in float64
    module.bank.enqueue(bank, torch.arange(1000, 1032), torch.arange(32) % 10)
    x1, x2 = (torch.randn(8, 3, 16, 16, generator=gen(s), dtype=torch.float64) for s in (1, 2))
    index, labels = torch.arange(8), torch.arange(8) % 3
    module._trainer = SimpleNamespace(  # what training_step reads from its trainer
        optimizers=[SimpleNamespace(param_groups=[{"lr": 0.1}])],
        estimated_stepping_batches=10,
        global_step=0,
        world_size=1,
        _logger_connector=SimpleNamespace(should_update_logs=True),
    )
    module.log = lambda *args, **kwargs: None
    encoder = [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("linear_probe")]
    loss = module.training_step((x1, x2, index, labels), 0)
    ours = torch.autograd.grad(loss, encoder)

    features = [module.backbone(x) for x in (x1, x2)]  # 8 x out_dim each
    z1, z2 = (module.projector(f) for f in features)
    p1, p2 = (module.predictor(z) for z in (z1, z2))
    k1, k2 = (z1, z2) if preset == "nnclr" else (module.key_projector(module.key_backbone(x)).detach() for x in (x1, x2))
    topk = module.neighbours.topk
    if preset == "nnclr":
        reference = (lab_nnclr(p1, k2, module.bank.keys, topk, 0.2) + lab_nnclr(p2, k1, module.bank.keys, topk, 0.2)) / 2
    else:
        reference = (
            lab_snclr(p1, z1, k2, module.bank.keys, topk, 0.2, False) + lab_snclr(p2, z2, k1, module.bank.keys, topk, 0.2, False)
        ) / 2
    probe = F.cross_entropy(module.linear_probe(features[0].detach()), labels)
    torch.testing.assert_close(loss, reference + probe, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, torch.autograd.grad(reference, encoder, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_presets_build_the_labs_heads_and_encoders(tmp_path):
    nnclr = small_module(tmp_path, "experiment=nnclr")
    assert nnclr.key_backbone is None and nnclr.bank is not None  # no EMA encoder; the bank holds online keys
    assert isinstance(nnclr.projector[-1], torch.nn.BatchNorm1d) and nnclr.projector[-1].affine
    assert nnclr.predictor[-1].bias is not None  # NNCLR's predictor ends with a plain Linear
    assert (nnclr.neighbours.rule, nnclr.neighbours.topk) == ("nnclr", 1)
    snclr = small_module(tmp_path, "experiment=snclr")
    assert snclr.key_backbone is not None
    for head in (snclr.projector, snclr.predictor):  # SNCLR's heads end with a BN without affine
        assert isinstance(head[-1], torch.nn.BatchNorm1d) and not head[-1].affine and head[-2].bias is None
    linear = [sum(isinstance(m, torch.nn.Linear) for m in head) for head in (snclr.projector, snclr.predictor)]
    assert linear == [3, 2]
    assert (snclr.neighbours.rule, snclr.neighbours.topk, snclr.neighbours.threshold) == ("snclr", 5, False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["experiment=snclr", "mining.positive=soft"], r"model.candidates=neighbours takes its positives .* mining.positive=none"),
        (["experiment=nnclr", "mining.negative=gradient"], r"mining.negative=all \(got NoPositives, GradientBandNegatives\)"),
        (["model.candidates=neighbours"], r"callbacks.mining_panel .* ~callbacks.mining_panel"),
    ],
)
def test_mining_strategies_and_panel_are_refused_with_neighbours(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(make_cfg([*TINY, *overrides], tmp_path), world_size=1)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.neighbours.topk=33"], r"model.neighbours.topk=33 must be at most model.queue_size=32"),
        (["model.neighbours.topk=0"], r"model.neighbours.topk must be a positive integer, got 0"),
        (["model.neighbours.rule=byol"], r"model.neighbours.rule must be one of \('nnclr', 'snclr'\), got 'byol'"),
        (["model.key_encoder=frozen"], r"model.key_encoder must be 'ema' or 'online', got 'frozen'"),
        (["model.proj_last_bn=yes"], r"model.proj_last_bn / model.pred_last_bn must be one of .*, got 'yes'"),
    ],
)
def test_bad_neighbour_knobs_are_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_module(tmp_path, "experiment=snclr", *overrides)


def test_diagnostics_count_kept_neighbours_and_their_purity():
    weight = torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    neighbour_labels = torch.tensor([[1, 2, 1], [-1, 3, 3]])
    meter = MiningMeter()
    sums = neighbour_diagnostics(weight, neighbour_labels, torch.tensor([1, 3]))
    meter.update(sums, sums)
    assert meter.read("interval") == {"pos_kept": 1.5, "pos_purity": 0.5}  # (2 + 1) / 2; of the labelled kept (1, 2) one matches


# --- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides", [["experiment=snclr", "model.neighbours.threshold=true"], ["experiment=nnclr", "model.neighbours.topk=5"]]
)
def test_training_past_a_full_bank_stays_finite(tmp_path, overrides):
    """MICRO: 16 keys a step (one an image) into a 128-key bank, full after 8 steps; 10 steps run."""
    cfg = make_cfg(
        [*MICRO, *overrides, "logger=none", "callbacks=none", "trainer.max_epochs=1", "trainer.limit_train_batches=10"], tmp_path
    )
    datamodule, module, trainer = build(cfg)
    trainer.fit(module, datamodule)
    assert trainer.global_step == 10 and module.bank.is_full
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert 0.0 <= trainer.callback_metrics["mining/pos_purity_epoch"].item() <= 1.0


@pytest.mark.slow
def test_cli_runs_the_nnclr_preset(tmp_path):
    result = run_cli(["experiment=nnclr", *MICRO, "logger=none", "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/knn_top1:" in result.stdout and (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
