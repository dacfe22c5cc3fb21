"""The lab's MoCo v2 protocol: one training step against the lab's formula, SplitBatchNorm and
ShuffleBN, float32 similarities under bf16, the EMA and the key encoder's own BN statistics."""

from __future__ import annotations

import copy
import functools
import itertools
import warnings
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
import torchvision
import yaml
from conftest import make_cfg
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from mcl.batchnorm import SplitBatchNorm, shuffled
from mcl.export import torchvision_recipe
from mcl.module import MCLModule
from mcl.train import CONF_DIR, ConfigError, build, build_module, check_batchnorm, check_config

B = 16
STEP = ["experiment=moco_v2", "logger=none", "callbacks=none", "dataset=digits", "dataset.image_size=16", "backbone.width=8"]
STEP += [f"data.batch_size={B}", "data.num_workers=0", "model.queue_size=64", "model.proj_hidden=32", "trainer.accelerator=cpu"]


def moco_module(tmp_path, *overrides: str) -> MCLModule:
    torch.manual_seed(0)
    return build_module(make_cfg([*STEP, *overrides], tmp_path), num_classes=10)


def images(seed: int) -> torch.Tensor:
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# --- the lab's MoCo v2, written out -------------------------------------------------------
class LabSplitBN(nn.Module):
    """The lab's SplitBatchNorm in training (network/base_model.py), as a loop over the groups:
    group g holds images g, g + s, g + 2s, ...; each is normalised with its own batch statistics."""

    def __init__(self, bn: nn.BatchNorm2d, splits: int):
        super().__init__()
        self.bn, self.splits = bn, splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        w, b = self.bn.weight[None, :, None, None], self.bn.bias[None, :, None, None]
        for g in range(self.splits):
            xg = x[g :: self.splits]
            mean, var = xg.mean((0, 2, 3), keepdim=True), xg.var((0, 2, 3), unbiased=False, keepdim=True)
            out[g :: self.splits] = (xg - mean) / torch.sqrt(var + self.bn.eps) * w + b
        return out


def lab_copy(net: nn.Module, splits: int) -> nn.Module:
    """A copy of `net` whose batch norms are LabSplitBN: the same weights, the lab's normalisation."""
    net = copy.deepcopy(net)
    for name, child in list(net.named_modules()):
        if isinstance(child, nn.BatchNorm2d):
            parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            setattr(parent, name.rsplit(".", 1)[-1], LabSplitBN(child, splits))
    return net


def lab_moco_step(nets, im1, im2, perms, bank, own, tau):
    """network/MoCo.py, --symmetric: 0.5 * (loss(q=im2, k=im1) + loss(q=im1, k=im2)); the key batch is
    shuffled by perm before the key encoder and restored after; query and key views are separate forwards.
    One difference, on purpose: mcl drops the bank entries of the query's own image from the negatives
    (mining.negative.exclude_self=true); the lab keeps them. `own` (B x K) marks them and they get -inf.
    Returns the loss and the keys of the im1 -> im2 direction (view 2's), the ones the lab enqueues."""
    net, head, key_net, key_head = nets

    def direction(im_q, im_k, perm):
        z_q = head(net(im_q))  # B x D
        with torch.no_grad():
            z_k = key_head(key_net(im_k[perm]))[torch.argsort(perm)]  # B x D, back in the batch order
        z_q, z_k, keys = F.normalize(z_q, dim=1), F.normalize(z_k, dim=1), F.normalize(bank, dim=1)
        l_pos = torch.einsum("nc,nc->n", z_q, z_k)[:, None]  # B x 1
        l_neg = torch.einsum("nc,kc->nk", z_q, keys).masked_fill(own, float("-inf"))  # B x K
        logits = torch.cat([l_pos, l_neg], dim=1) / tau  # B x (1+K)
        return F.cross_entropy(logits, torch.zeros(len(im_q), dtype=torch.long)), z_k

    loss21, _ = direction(im2, im1, perms[0])
    loss12, keys12 = direction(im1, im2, perms[1])
    return 0.5 * (loss12 + loss21), keys12


def test_moco_v2_step_equals_the_labs_moco(tmp_path, monkeypatch):
    module = moco_module(tmp_path)
    assert module.bn_splits == 8 and module.shuffle_bn and module.separate_views
    assert not any(isinstance(m, nn.BatchNorm1d) for m in module.projector.modules())  # MoCo v2's head: no BN
    bank = module.bank
    bank.keys.copy_(F.normalize(torch.randn(64, 128, generator=torch.Generator().manual_seed(3)), dim=1))
    bank.indices.copy_(torch.arange(64) + 1000)
    index = torch.arange(B) + 10
    bank.indices[[5, 40]] = index[3]  # two older keys of image 3 in the bank
    own = bank.indices[None, :] == index[:, None]  # B x K
    nets = [lab_copy(m, 8) for m in (module.backbone, module.projector, module.key_backbone, module.key_projector)]
    bank_before = bank.keys.clone()
    perms = []
    randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: perms.append(randperm(*a, **k)) or perms[-1])
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.setdefault(name, value))
    x1, x2 = images(1), images(2)

    module.training_step((x1, x2, index, index % 10), 0).backward()
    module.on_after_backward()

    assert len(perms) == 2 and all(not torch.equal(p, torch.arange(B)) for p in perms)  # keys of view 1, then view 2
    reference, keys12 = lab_moco_step(nets, x1, x2, perms, bank_before, own, module.cfg_model["temperature"])
    reference.backward()
    torch.testing.assert_close(logged["train/loss"], reference, rtol=1e-6, atol=1e-6)
    ours = {n: p.grad for n, p in module.named_parameters() if n.startswith(("backbone.", "projector."))}
    theirs = {f"{part}.{n}": p.grad for part, net in zip(("backbone", "projector"), nets) for n, p in net.named_parameters()}
    theirs = {n.replace(".bn.", "."): g for n, g in theirs.items()}  # LabSplitBN wraps the BN's parameters
    assert ours.keys() == theirs.keys() and len(ours) > 40
    for name, grad in ours.items():
        # gradients up to ~0.3; float32 sums through a ResNet backward in another order differ by ~2e-6
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=5e-6, msg=name)
    # one key an image: view 2's B keys went in, at the pointer, and nothing else moved
    assert int(bank.ptr) == B and int(bank.num_written) == B
    assert bank.indices[:B].tolist() == index.tolist()
    torch.testing.assert_close(bank.keys[:B], F.normalize(keys12, dim=1), rtol=1e-6, atol=1e-6)
    assert torch.equal(bank.keys[B:], bank_before[B:])


def test_the_reference_sees_the_own_image_mask(tmp_path):
    """The reference can fail: without the own-image mask, the lab's loss differs from ours."""
    module = moco_module(tmp_path)
    nets = [lab_copy(m, 8) for m in (module.backbone, module.projector, module.key_backbone, module.key_projector)]
    bank = F.normalize(torch.randn(64, 128), dim=1)
    perms = [torch.randperm(B), torch.randperm(B)]
    own = torch.zeros(B, 64, dtype=torch.bool)
    own[3, 5] = True
    with torch.no_grad():
        z = nets[3](nets[2](images(2)[perms[1]]))[torch.argsort(perms[1])]
    bank[5] = F.normalize(z[3], dim=0)  # an older key of image 3, as similar as it can be
    masked, _ = lab_moco_step(nets, images(1), images(2), perms, bank, own, 0.2)
    kept, _ = lab_moco_step(nets, images(1), images(2), perms, bank, torch.zeros_like(own), 0.2)
    assert kept > masked


# --- SplitBatchNorm and ShuffleBN -----------------------------------------------------------
def test_shuffled_encodes_a_permuted_batch_and_restores_its_order_exactly():
    torch.manual_seed(0)
    encoder = nn.Linear(5, 3)
    seen = []
    x = torch.randn(B, 5)
    out = shuffled(lambda t: seen.append(t) or encoder(t), x, gather=lambda t: t, broadcast=lambda t: t, rank=0)
    assert torch.equal(out, encoder(x))  # row i is image i's, bit for bit
    assert not torch.equal(seen[0], x) and sorted(seen[0][:, 0].tolist()) == sorted(x[:, 0].tolist())  # a permutation


def group_of(encode, x: torch.Tensor, j: int) -> set[int]:
    """The images whose output moves when image j changes: the batch-norm group j is normalised with."""
    torch.manual_seed(0)
    before = encode(x)
    changed = x.clone()
    changed[j] += 1.0
    torch.manual_seed(0)  # the same ShuffleBN permutation
    after = encode(changed)
    return {i for i in range(len(x)) if not torch.allclose(before[i], after[i], rtol=0, atol=1e-6)}


def test_a_query_and_its_key_are_normalised_in_different_groups(tmp_path):
    module = moco_module(tmp_path, "model.bn_splits=4")  # groups of 4 images
    x1, x2 = images(1), images(2)
    for j in range(4):
        query = group_of(lambda v: module.encode(v, x2)[2][0], x1, j)  # q1: view 1 through the online encoder
        key = group_of(lambda v: module.encode(x1, v)[3][1], x2, j)  # k2, its positive: view 2 through the key encoder
        assert query == {i for i in range(B) if i % 4 == j % 4}  # 4 images, one group of the query batch
        assert len(key) == 4 and key != query  # a group of the shuffled key batch: other images
        assert group_of(lambda v: module.encode(v, x2)[2][1], x1, j) == set()  # q2 never sees view 1: separate batches


def test_bn_splits_1_without_shuffle_is_the_former_one_batch_encoder(tmp_path):
    module = moco_module(
        tmp_path, "model.bn_splits=1", "model.shuffle_bn=false", "model.proj_layers=3", "model.proj_bn=true", "model.proj_last_bn=plain"
    )
    assert not any(isinstance(m, SplitBatchNorm) for m in module.modules()) and not module.separate_views
    x1, x2 = images(1), images(2)
    _, _, (q1, q2), (k1, k2) = module.encode(x1, x2)
    z = F.normalize(module.projector(module.backbone(torch.cat([x1, x2]))), dim=1)  # both views in one BN batch
    torch.testing.assert_close(torch.cat([q1, q2]), z)
    assert group_of(lambda v: module.encode(v, x2)[2][0], x1, 0) == set(range(B))


def test_split_batchnorm_is_batchnorm_in_eval_and_keeps_torchvision_names(tmp_path):
    module = moco_module(tmp_path, "model.bn_splits=4")
    splits = [m for m in module.backbone.modules() if isinstance(m, SplitBatchNorm)]
    assert len(splits) == 20 and all(m.num_splits == 4 for m in splits)
    plain = torchvision.models.resnet18(num_classes=10)
    plain.conv1, plain.maxpool, plain.fc = nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    assert module.backbone.state_dict().keys() == plain.state_dict().keys()
    x = images(1)
    bn = nn.BatchNorm2d(3)
    split = SplitBatchNorm(3, 4)
    for layer in (bn, split):
        layer.running_mean.fill_(0.5)
    split.eval(), bn.eval()
    assert torch.equal(split(x), bn(x))  # eval: running statistics, like BatchNorm2d
    split.train(), bn.train()
    split(x)
    groups = x.view(4, 4, 3, 16, 16).permute(1, 2, 0, 3, 4).reshape(4, 3, -1)  # g x C x values: group g = images g, g + 4, ...
    torch.testing.assert_close(split.running_mean, 0.9 * 0.5 + 0.1 * groups.mean(2).mean(0))
    torch.testing.assert_close(split.running_var, 0.9 * 1.0 + 0.1 * groups.var(2).mean(0))  # each group's own (unbiased) variance


@pytest.mark.parametrize("dataset,pool", [("cifar10", False), ("tinyimagenet", True), ("stl10", True)])
def test_the_stem_per_dataset_is_the_labs(tmp_path, dataset, pool):
    """3x3 stride-1 conv everywhere; the max-pool stays on TinyImageNet and STL-10 (network/base_model.py)."""
    cfg = make_cfg([f"dataset={dataset}", "backbone.width=8"], tmp_path)
    net = hydra.utils.instantiate(cfg.backbone)
    assert (net.conv1.kernel_size, net.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(net.maxpool, nn.MaxPool2d) is pool
    recipe = torchvision_recipe({**cfg.backbone, "width": 64}, "x.pt")
    assert ("model.maxpool = torch.nn.Identity()" in recipe) is not pool


def test_batch_not_a_multiple_of_bn_splits_and_sync_batchnorm_fail_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_size=12 \(per device\) must be a multiple of model.bn_splits=8"):
        build(make_cfg([*STEP, "data.batch_size=12", "model.queue_size=48"], tmp_path))
    with pytest.raises(ConfigError, match=r"trainer.sync_batchnorm=true .* undoes model.bn_splits and model.shuffle_bn"):
        check_batchnorm(make_cfg([*STEP, "+trainer.sync_batchnorm=true"], tmp_path))  # build() stops earlier on a CPU: no SyncBN there
    with pytest.raises(ConfigError, match=r"model.bn_splits must be a positive integer"):
        build(make_cfg([*STEP, "model.bn_splits=0"], tmp_path))


def test_shuffle_bn_that_cannot_change_anything_is_a_warning(tmp_path):
    cfg = make_cfg([*STEP, "model.bn_splits=1", "model.shuffle_bn=true"], tmp_path)
    with pytest.warns(UserWarning, match=r"mcl: model.shuffle_bn=true changes nothing in this run: with model.bn_splits=1 on one"):
        check_config(cfg, world_size=1)
    for overrides, world in ((["model.bn_splits=8"], 1), (["model.bn_splits=1"], 2), (["model.bn_splits=1", "model.shuffle_bn=false"], 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # it does something (split BN, several devices) or is off: no warning
            check_config(make_cfg([*STEP, *overrides, f"data.batch_size={B // world}"], tmp_path), world_size=world)


# --- precision, EMA, the key encoder's statistics -------------------------------------------
def test_similarities_stay_float32_under_bf16_autocast(tmp_path):
    module = moco_module(tmp_path, "mining.positive=soft_hard", "mining.negative=gradient")
    module.bank.enqueue(F.normalize(torch.randn(64, 128), dim=1), torch.arange(64) + 1000, torch.arange(64) % 10)
    q, k = F.normalize(torch.randn(B, 128), dim=1), F.normalize(torch.randn(B, 128), dim=1)
    exact, *_ = module.contrast(q, k, torch.arange(B))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ctx, _, _ = module.contrast(q, k, torch.arange(B))
        assert (q @ module.bank.keys.T).dtype == torch.bfloat16  # what autocast would have done
        assert ctx.bank_sim.dtype == ctx.key_bank_sim.dtype == loss.dtype == torch.float32  # the band ranked in float32
    torch.testing.assert_close(loss, exact, rtol=1e-6, atol=1e-6)


class KeyWeights(L.Callback):
    """Records the key encoder's first weight after every training batch."""

    def __init__(self):
        self.after: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.after.append(module.key_backbone.conv1.weight.detach().clone())


def test_ema_moves_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    probe = KeyWeights()
    extra = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=0", "+trainer.accumulate_grad_batches=2"]
    datamodule, module, trainer = build(make_cfg([*STEP, *extra, "model.momentum=0.5", "seed=0"], tmp_path))
    trainer.callbacks.append(probe)
    online = []
    module.on_train_batch_start = lambda *a: online.append(module.backbone.conv1.weight.detach().clone())
    trainer.fit(module, datamodule)
    assert trainer.global_step == 2
    w = probe.after
    assert torch.equal(w[0], w[1])  # before the first optimizer step the key encoder is the online one
    assert not torch.equal(w[1], w[2]) and torch.equal(w[2], w[3])  # moved at batch 2 only, not at batch 3 too
    torch.testing.assert_close(w[2], torch.lerp(w[1], online[2], 0.5))  # m = 0.5 toward the stepped online encoder


def test_key_encoder_keeps_its_own_batchnorm_statistics(tmp_path):
    module = moco_module(tmp_path)
    module.backbone.bn1.running_mean.fill_(5.0)  # the online encoder's statistics: not the key encoder's
    x1, x2 = images(1), images(2)
    with torch.no_grad():
        means = [module.key_backbone.conv1(x).mean((0, 2, 3)) for x in (x1, x2)]  # per channel, the batch's
    module.training_step((x1, x2, torch.arange(B), torch.zeros(B, dtype=torch.long)), 0)
    expected = 0.9 * (0.9 * 0.0 + 0.1 * means[0]) + 0.1 * means[1]  # its own zeros, then view 1, then view 2
    torch.testing.assert_close(module.key_backbone.bn1.running_mean, expected)


# --- one protocol: every preset and sweep job is moco_v2 plus what it names -------------------
def flat(node: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists and interpolation strings are leaves (compared unresolved)."""
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@functools.cache
def composed(overrides: tuple[str, ...]) -> dict[str, object]:
    cfg = make_cfg(list(overrides), Path("/unused"))
    return flat(OmegaConf.to_container(cfg, resolve=False))


def owner(key: str, values: set[str], groups: set[str]) -> str | None:
    """The named item a config key belongs to: a value key the yaml sets, or a group it overrides."""
    return next((n for n in (*values, *groups) if key == n or key.startswith(n + ".")), None)


def named(path: Path) -> tuple[set[str], set[str], set[str]]:
    """(value keys the yaml sets itself, all value keys including its parent presets', groups it overrides)."""
    data = yaml.safe_load(path.read_text())
    hydra_params = data.get("hydra", {}).get("sweeper", {}).get("params", {})
    own = {k for k in flat({k: v for k, v in data.items() if k not in ("defaults", "hydra")})}
    values, groups = set(own), set()
    for key in hydra_params:  # a sweep's grid: a group or a value key per entry
        (groups if (Path(CONF_DIR) / key).is_dir() else values).add(key)
    for entry in data.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":  # a parent preset of the same group
            _, parent_values, parent_groups = named(path.parent / f"{entry}.yaml")
            values |= parent_values
            groups |= parent_groups
        elif isinstance(entry, dict):
            ((group, _),) = entry.items()
            groups.add(group.removeprefix("override ").lstrip("/"))
    return own, values, groups


def sweep_jobs(path: Path) -> list[tuple[str, ...]]:
    """The sweep's grid, with the seed axis cut to two values (it only sets `seed`; a compose takes ~0.5 s)."""
    params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
    axes = {key: [f"{key}={v}" for v in str(values).split(",")] for key, values in params.items()}
    seeds = axes.pop("seed", [])
    combos = list(itertools.product(*axes.values()))
    jobs = [(*combo, *seeds[:1]) for combo in combos] + [(*combos[0], seed) for seed in seeds[1:2]]
    return [(f"+sweep={path.stem}", *job) for job in jobs]


PRESETS = sorted((Path(CONF_DIR) / "experiment").glob("*.yaml"))
SWEEPS = sorted(p for p in (Path(CONF_DIR) / "sweep").glob("*.yaml") if p.stem != "lab_table")  # lab_table sweeps presets: its own test


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_a_preset_differs_from_moco_v2_exactly_by_what_it_names(path):
    base = composed(("experiment=moco_v2",))
    config = composed((f"experiment={path.stem}",))
    own, values, groups = named(path)
    differ = {k for k in base.keys() | config.keys() if base.get(k, "<absent>") != config.get(k, "<absent>")}
    assert not {k for k in differ if owner(k, values, groups) is None}, f"{path.stem} changes keys it does not name"
    if path.stem != "moco_v2":
        assert not own - differ, f"{path.stem} sets keys to moco_v2's values: {sorted(own - differ)}"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_a_sweep_job_is_moco_v2_plus_its_grid_and_equals_the_preset_with_its_mining(path):
    base = composed(("experiment=moco_v2",))
    _, values, groups = named(path)
    owners = set()
    mining_only = []  # presets that differ from moco_v2 only by their mining
    for preset in PRESETS:
        diff = {k for k, v in composed((f"experiment={preset.stem}",)).items() if base.get(k) != v}
        if all(k.startswith("mining.") or k in ("task_name", "seed") for k in diff):
            mining_only.append(composed((f"experiment={preset.stem}",)))
    matched = 0
    for job in sweep_jobs(path):
        config = composed(job)
        differ = {k for k in base.keys() | config.keys() if base.get(k, "<absent>") != config.get(k, "<absent>")}
        owners |= {owner(k, values, groups) for k in differ}
        for preset in mining_only:
            if all(preset.get(k) == v for k, v in config.items() if k.startswith("mining.")):
                matched += 1
                swept = {k for k in values if not k.startswith("mining.")}  # e.g. model.temperature: the sweep's own axis
                mismatch = {k for k in preset.keys() | config.keys() if preset.get(k) != config.get(k)} - swept - {"task_name"}
                assert not mismatch, f"{job} and the preset with its mining differ in {sorted(mismatch)}"
    assert None not in owners, f"a {path.stem} job changes keys the sweep does not name"
    assert owners == values | groups, f"{path.stem} names items that no job changes: {sorted(values | groups - owners)}"
    if path.stem in ("ablation", "negatives", "positives", "seeds"):
        assert matched, f"no {path.stem} job matched a preset"


LAB_ROWS = {"moco_v2", "simclr", "byol", "nnclr", "nnclr_top5", "snclr", "sce", "ressl", "msf", "cmsf", "unmix", "paper_cifar10"}


def test_the_lab_table_sweep_is_every_lab_row_and_each_job_is_its_preset():
    """+sweep=lab_table: the lab's 11 rows and the paper's, 3 seeds; each job is moco_v2 plus exactly what its preset names."""
    path = Path(CONF_DIR) / "sweep" / "lab_table.yaml"
    params = yaml.safe_load(path.read_text())["hydra"]["sweeper"]["params"]
    assert set(params["experiment"].split(",")) == LAB_ROWS and params["seed"].split(",") == ["1339", "1340", "1341"]
    base = composed(("experiment=moco_v2",))
    for job in sweep_jobs(path):
        config = composed(job)
        preset = next(arg.split("=", 1)[1] for arg in job if arg.startswith("experiment="))
        _, values, groups = named(Path(CONF_DIR) / "experiment" / f"{preset}.yaml")
        differ = {k for k in base.keys() | config.keys() if base.get(k, "<absent>") != config.get(k, "<absent>")}
        assert not {k for k in differ if owner(k, values | {"seed"}, groups) is None}, f"{job} changes keys {preset} does not name"
        alone = composed((f"experiment={preset}",))
        assert {k for k in alone.keys() | config.keys() if alone.get(k) != config.get(k)} <= {"task_name", "seed"}, job
    # the chosen dataset replaces paper_cifar10's: its job is paper_<dataset>
    on_cifar100 = composed(("+sweep=lab_table", "experiment=paper_cifar10", "dataset=cifar100"))
    paper = composed(("experiment=paper_cifar100",))
    assert {k for k in paper.keys() | on_cifar100.keys() if paper.get(k) != on_cifar100.get(k)} == {"task_name"}


def test_the_lab_table_composes_with_the_slurm_launcher_and_the_tiny_debug(tmp_path):
    overrides = ["+sweep=lab_table", "hydra/launcher=slurm", "debug=tiny", "dataset=digits", "experiment=cmsf"]
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra.compose("train", overrides=[*overrides, f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.sweeper.params.experiment.startswith("moco_v2,")
    assert cfg.model.aux_view and cfg.data.extra_view == "weak" and cfg.model.queue_size == 128 and cfg.trainer.max_epochs == 2


def test_keys_are_normalised_in_float32_under_bf16_autocast(tmp_path, monkeypatch):
    """The heads' bf16 outputs are cast to float32 before the normalisation: the bank holds float32 unit keys,
    and the loss is the float32 MoCo loss of those outputs."""
    module = moco_module(tmp_path, "model.shuffle_bn=false")
    outputs: dict[str, list[torch.Tensor]] = {"q": [], "k": []}
    module.projector.register_forward_hook(lambda m, i, out: outputs["q"].append(out))
    module.key_projector.register_forward_hook(lambda m, i, out: outputs["k"].append(out))
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.setdefault(name, value))
    bank = module.bank.keys.clone()
    x1, x2 = images(1), images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module.training_step((x1, x2, torch.arange(B), torch.zeros(B, dtype=torch.long)), 0)
    module.on_after_backward()
    assert all(t.dtype == torch.bfloat16 for t in outputs["q"] + outputs["k"])  # autocast did run the heads in bf16
    norms = module.bank.keys[:B].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(B), rtol=0, atol=2e-7)  # float32 unit vectors, not bf16-rounded ones
    (q1, q2), (k1, k2) = ([F.normalize(t.float(), dim=1) for t in outputs[side]] for side in ("q", "k"))
    tau = module.cfg_model["temperature"]

    def moco(q, k):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ bank.T], dim=1) / tau
        return F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))

    torch.testing.assert_close(logged["train/loss"], 0.5 * (moco(q1, k2) + moco(q2, k1)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module.bank.keys[:B], k2, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["moco_v2", "sce", "byol", "unmix", "paper_cifar10"])
def test_tinyimagenet_brings_the_labs_bank_and_ema_to_every_preset(preset):
    """The lab's TinyImageNet protocol (bank 16384, EMA 0.996) comes with the dataset, whatever the preset;
    UnMix moves its EMA three times a step (the lab's three model calls): momentum^3 once."""
    cfg = make_cfg([f"experiment={preset}", "dataset=tinyimagenet"], Path("/unused"))
    assert (cfg.model.queue_size, cfg.model.momentum) == (16384, 0.996)
    cifar = make_cfg([f"experiment={preset}"], Path("/unused"))
    assert (cifar.model.queue_size, cifar.model.momentum) == (4096, 0.99)
    assert cfg.model.ema_calls == (3 if preset == "unmix" else 1)


def test_unmix_moves_the_ema_as_three_calls_do(tmp_path):
    """ema_calls=3: one lerp by 1 - m^3 equals three lerps by 1 - m against the same online weights."""
    from types import SimpleNamespace

    module = build_module(make_cfg(["experiment=unmix", *STEP[1:]], tmp_path), num_classes=10)
    for p in module.backbone.parameters():
        p.data.add_(torch.randn_like(p))
    online, key = next(module.backbone.parameters()).detach().clone(), next(module.key_backbone.parameters()).detach().clone()
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, global_step=0)
    module._update_key_encoder()
    expected = key
    for _ in range(3):
        expected = 0.99 * expected + 0.01 * online
    torch.testing.assert_close(next(module.key_backbone.parameters()), expected)
