"""Evaluation CLIs (mcl.eval.knn, mcl.eval.linear) and the backbone export (mcl.export) on a tiny checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import make_cfg
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from mcl.eval.common import EvalError, load_checkpoint, write_result
from mcl.eval.linear import CONF_DIR as EVAL_CONF_DIR
from mcl.eval.linear import ProbeDivergedWarning, fit_classifier, lab_classifier, linear_eval, lr_order, probe_diverged, search_lr
from mcl.export import backbone_state_dict, export, torchvision_recipe
from mcl.models import WidthResNet
from mcl.train import train

CHANCE = 0.25  # 4 classes


def colour_classes(n: int, size: int = 32, num_classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x size x size x 3 images whose class is their colour (plus pixel noise): features of
    any network, even a barely trained one, separate them, so an evaluation that does not beat
    chance on them is broken (labels misaligned, splits mixed up, classifier not trained)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    palette = rng.integers(30, 225, (num_classes, 3))
    x = palette[y][:, None, None, :] + rng.normal(0, 20, (n, size, size, 3))
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a width-64 ResNet-18 (torchvision's width) pre-trained 2 steps on 4 colour classes."""
    root = tmp_path_factory.mktemp("eval")
    x, y = colour_classes(320)
    np.savez(root / "tiny.npz", x_train=x[:256], y_train=y[:256], x_test=x[256:], y_test=y[256:])
    overrides = [
        "debug=tiny",
        "logger=none",
        "dataset=npz",
        f"dataset.path={root / 'tiny.npz'}",
        "dataset.image_size=16",
        "backbone.width=64",
        "data.batch_size=16",
        "model.queue_size=128",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "seed=0",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train(make_cfg(overrides, root / "run"))
    finally:
        torch.set_num_threads(threads)
    return Path(summary["last_checkpoint"])


def eval_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=EVAL_CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


def cli(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_knn_cli_beats_chance_and_writes_json_beside_the_checkpoint(checkpoint, tmp_path):
    result = cli("mcl.eval.knn", [f"ckpt_path={checkpoint}", "num_workers=0", "k=[5,20]", "t=[0.05,0.1]"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(checkpoint.with_name("last.knn.json").read_text())
    assert [(r["k"], r["t"]) for r in written["grid"]] == [(5, 0.05), (5, 0.1), (20, 0.05), (20, 0.1)]
    assert (written["train_images"], written["test_images"]) == (256, 64)
    assert written["best"]["top1"] == max(r["top1"] for r in written["grid"]) > CHANCE + 0.5
    assert all(r["top5"] >= r["top1"] for r in written["grid"])
    assert f"top1={written['best']['top1']:.4f}" in result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written where the user ran it


@pytest.mark.parametrize(
    ("protocol", "extra"),
    [("fast", []), ("lab", ["protocol.epochs=3", "protocol.milestones=[2]", "protocol.lr=0.5"])],  # lab: augmented images, few epochs
)
def test_linear_evaluation_beats_chance_and_keeps_the_best_and_the_final_epoch(checkpoint, protocol, extra, capsys):
    result = linear_eval(eval_cfg("linear", [f"ckpt_path={checkpoint}", f"protocol={protocol}", "num_workers=0", *extra]))
    assert result["protocol"] == protocol and result["train_images"] == 256 and result["test_images"] == 64
    written = json.loads(Path(result["json"]).read_text())
    epochs = written["per_epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, result["epochs"] + 1))  # tested after every epoch, counted from 1
    assert written["final"] == epochs[-1] and written["top1"] == epochs[-1]["top1"]  # `top1`: the final epoch's
    best = max(epochs, key=lambda e: e["top1"])
    assert (written["best"]["epoch"], written["best"]["top1"]) == (best["epoch"], best["top1"]) and "Acc-1-Best" in written["best"]["note"]
    assert written["best"]["top1"] >= written["final"]["top1"] > CHANCE + 0.5


def test_the_classifier_starts_as_the_labs(capsys):
    """N(0, 0.01) weights and a zero bias (the lab's LinearHead), also inside fit_classifier (lr 0 leaves the init)."""
    torch.manual_seed(0)
    head = lab_classifier(2048, 100)
    assert abs(head.weight.std().item() - 0.01) < 2e-4 and abs(head.weight.mean().item()) < 2e-4 and not head.bias.any()
    protocol = eval_cfg("linear", ["ckpt_path=x", "protocol=fast", "protocol.epochs=1", "protocol.milestones=[]"]).protocol
    loader = DataLoader(TensorDataset(torch.randn(16, 8), torch.arange(16) % 4), batch_size=8)
    torch.manual_seed(1)
    fitted, _ = fit_classifier(loader, None, 8, 4, protocol, torch.device("cpu"), lr=0.0, warn=False)
    torch.manual_seed(1)
    expected = lab_classifier(8, 4)
    assert torch.equal(fitted.weight, expected.weight) and torch.equal(fitted.bias, torch.zeros(4))
    default = torch.nn.Linear(8, 4)  # what the probe used before: uniform(-1/sqrt(8), 1/sqrt(8)), std ~0.2
    assert default.weight.std() > 5 * fitted.weight.std()


def test_the_lr_search_uses_a_held_out_slice_of_the_training_split_and_lands_on_a_working_lr(checkpoint, monkeypatch):
    """protocol.epochs=3 at lr 30 diverged on a small network; with protocol.lr_search=true one run lands on a working lr."""
    import mcl.eval.linear as linear

    seen = {}
    real = linear.search_lr

    def spy(feats, labels, *args, **kwargs):
        seen["n"], seen["labels"] = len(labels), labels.clone()
        return real(feats, labels, *args, **kwargs)

    monkeypatch.setattr(linear, "search_lr", spy)
    overrides = [f"ckpt_path={checkpoint}", "protocol=fast", "num_workers=0", "protocol.epochs=3", "protocol.lr_search=true"]
    result = linear_eval(eval_cfg("linear", overrides))
    train_labels = torch.from_numpy(np.load(checkpoint.parents[2] / "tiny.npz")["y_train"])
    assert seen["n"] == 256 and torch.equal(seen["labels"], train_labels)  # the training split only, never the 64 test images
    assert set(result["lr_search"]) == {"30", "10", "3", "1", "0.3", "0.1", "0.03", "0.01"} and result["lr"] in (
        30,
        10,
        3,
        1,
        0.3,
        0.1,
        0.03,
        0.01,
    )
    assert not result["diverged"] and result["final"]["top1"] > CHANCE + 0.5 and result["lrs_tried"][-1] == result["lr"]
    # features a large lr cannot fit: the search picks a small one
    torch.manual_seed(0)
    y = torch.arange(400) % 4
    feats = 200 * (torch.randn(400, 16) + 2 * torch.nn.functional.one_hot(y, 16).float())  # separable, huge scale
    p = eval_cfg("linear", ["ckpt_path=x", "protocol=fast", "protocol.lr_candidates=[30,0.0001]", "protocol.lr_search_epochs=5"]).protocol
    lr, scores = search_lr(feats, y, 4, p, torch.device("cpu"), seed=0)
    assert lr == 0.0001 and scores["0.0001"]["loss"] < scores["30"]["loss"]
    scores = {f"{lr:g}": {"loss": loss} for lr, loss in ((30, 0.1), (10, 0.5), (3, 0.05), (1, 0.2), (0.1, 0.3))}
    assert lr_order([30, 10, 3, 1, 0.1], scores) == [3, 1, 0.1]  # a diverging full run goes on at smaller lrs only, best first
    with pytest.raises(EvalError, match="lr_search_holdout"):
        search_lr(feats, y, 4, eval_cfg("linear", ["ckpt_path=x", "protocol.lr_search_holdout=1.5"]).protocol, torch.device("cpu"), 0)


def test_a_checkpoint_trained_with_compile_loads_without_compiling(checkpoint, tmp_path, monkeypatch):
    saved = torch.load(checkpoint, weights_only=True)
    saved["hyper_parameters"]["model"]["compile"] = True  # as model.compile=true leaves it
    compiled = tmp_path / "run" / "checkpoints" / "last.ckpt"
    compiled.parent.mkdir(parents=True)
    torch.save(saved, compiled)
    shutil.copy(checkpoint.parent.parent / "config_resolved.yaml", compiled.parent.parent / "config_resolved.yaml")

    def refuse(*args, **kwargs):
        raise AssertionError("compiled")

    monkeypatch.setattr(torch.nn.Module, "compile", refuse)
    from mcl.module import MCLModule

    with pytest.raises(AssertionError, match="compiled"):  # building the module as the checkpoint says would compile
        MCLModule.load_from_checkpoint(compiled, map_location="cpu")
    module, _ = load_checkpoint(compiled)  # mcl.eval.knn / linear
    assert module.hparams.model["compile"] is False
    export(eval_cfg("export", [f"ckpt_path={compiled}", f"out={tmp_path / 'b.pt'}"]))  # mcl.export
    assert (tmp_path / "b.pt").is_file()


def test_lab_protocol_is_the_default_preset():
    cfg = eval_cfg("linear", ["ckpt_path=x"])
    p = cfg.protocol
    assert (p.name, p.augment, p.epochs, p.lr, p.nesterov, list(p.milestones), p.gamma) == ("lab", True, 100, 30.0, True, [60, 80], 0.1)
    assert eval_cfg("linear", ["ckpt_path=x", "protocol=fast"]).protocol.augment is False


def test_exported_backbone_loads_into_torchvision_resnet18_strictly(checkpoint, tmp_path, capsys):
    out = tmp_path / "backbone.pt"
    export(eval_cfg("export", [f"ckpt_path={checkpoint}", f"out={out}"]))  # python -m mcl.export ckpt_path=... out=...
    printed = capsys.readouterr().out
    state = torch.load(out, weights_only=True)  # tensors only
    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem
    model.maxpool = torch.nn.Identity()
    model.fc = torch.nn.Identity()
    assert model.load_state_dict(state, strict=True) is not None
    module, _ = load_checkpoint(checkpoint)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(model.eval()(x), module.backbone.eval()(x))  # same network, not only same names
    # the printed recipe rebuilds it without mcl
    namespace: dict = {}
    exec(printed.split("load it with:", 1)[1], namespace)
    torch.testing.assert_close(namespace["model"].eval()(x), module.backbone(x))
    record = json.loads((tmp_path / "backbone.json").read_text())  # the input it expects, beside it
    run = OmegaConf.load(checkpoint.parent.parent / "config_resolved.yaml")
    assert (record["image_size"], record["mean"], record["std"]) == (16, list(run.dataset.mean), list(run.dataset.std))
    assert record["dataset"] == "npz" and (record["arch"], record["width"], record["encoder"]) == ("resnet18", 64, "query")
    assert f"its input: 16 x 16 px RGB images scaled to [0, 1], normalised with mean {record['mean']}" in printed
    key_state = backbone_state_dict(module, "key")
    assert key_state.keys() == state.keys() and not all(torch.equal(key_state[k], state[k]) for k in state)  # the EMA copy differs


def test_resnet50_names_and_recipe_match_torchvision(tmp_path):
    backbone = WidthResNet("resnet50", width=64, cifar_stem=False)
    torch.save(backbone.state_dict(), tmp_path / "r50.pt")
    namespace: dict = {}
    exec(torchvision_recipe({"arch": "resnet50", "width": 64, "cifar_stem": False}, str(tmp_path / "r50.pt")), namespace)
    assert isinstance(namespace["model"], torchvision.models.ResNet)  # loaded with strict key matching
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(namespace["model"].eval()(x), backbone.eval()(x))


def test_bad_evaluation_input_is_one_clear_error(checkpoint, tmp_path):
    with pytest.raises(EvalError, match="is not a file"):
        linear_eval(eval_cfg("linear", [f"ckpt_path={tmp_path / 'missing.ckpt'}"]))
    alone = tmp_path / "alone.ckpt"
    shutil.copy(checkpoint, alone)  # a checkpoint away from its run dir
    with pytest.raises(EvalError, match="run_config=PATH"):
        load_checkpoint(alone)
    module, _ = load_checkpoint(alone, run_config=str(checkpoint.parent.parent / "config_resolved.yaml"))
    with pytest.raises(EvalError, match="encoder must be"):
        backbone_state_dict(module, "momentum")
    from mcl.eval.knn import knn_grid

    with pytest.raises(EvalError, match="k must be"):
        knn_grid(eval_cfg("knn", [f"ckpt_path={checkpoint}", "k=[]"]))


def test_probe_divergence_is_a_warning_and_a_sane_probe_is_not():
    torch.manual_seed(0)
    y = torch.arange(64) % 4
    feats = torch.randn(64, 8) + 3 * torch.nn.functional.one_hot(y, 8).float()  # separable, 4 classes
    noise = torch.randint(0, 4, (64,))  # labels a linear layer cannot fit: the loss stays up
    loader = DataLoader(TensorDataset(torch.randn(64, 8) * 50, noise), batch_size=16, shuffle=True)  # large features, lr 30
    protocol = eval_cfg("linear", ["ckpt_path=x", "protocol=fast", "protocol.epochs=5", "protocol.milestones=[]"]).protocol
    with pytest.warns(ProbeDivergedWarning, match=r"ended at .*above ln\(4\) = 1.39.*lr=30 .*protocol.lr_search=true"):
        _, loss = fit_classifier(loader, None, 8, 4, protocol, torch.device("cpu"))
    assert probe_diverged(loss, 4)
    protocol.lr = 0.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, loss = fit_classifier(DataLoader(TensorDataset(feats, y), batch_size=16), None, 8, 4, protocol, torch.device("cpu"))
    assert not probe_diverged(loss, 4) and loss < math.log(4)


def test_a_rerun_never_overwrites_an_evaluation_result(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    paths = [write_result(ckpt, "linear-lab", {"run": i}) for i in range(3)]
    assert [p.name for p in paths] == ["last.linear-lab.json", "last.linear-lab.2.json", "last.linear-lab.3.json"]
    assert [json.loads(p.read_text())["run"] for p in paths] == [0, 1, 2]


def test_recipe_for_a_width_other_than_64_runs_as_printed(tmp_path):
    backbone = WidthResNet("resnet18", width=8, cifar_stem=True)
    torch.save(backbone.state_dict(), tmp_path / "w8.pt")
    namespace: dict = {}
    exec(
        torchvision_recipe({"arch": "resnet18", "width": 8, "cifar_stem": True}, str(tmp_path / "w8.pt")), namespace
    )  # imports torch itself
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(namespace["model"].eval()(x), backbone.eval()(x))
