"""What the evaluation CLIs, the export and the notebooks share: load a checkpoint with its run's
config, rebuild that run's data, extract frozen backbone features."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from mcl.data.datamodule import ContrastiveDataModule
from mcl.module import MCLModule
from mcl.reliability import read_checkpoint

RUN_CONFIG = "config_resolved.yaml"  # what mcl.train writes into every run dir


class EvalError(ValueError):
    """A checkpoint or evaluation setting that cannot be used; raised before any work starts."""


def device_of(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; any other value is a torch device name."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def find_run_config(ckpt_path: Path, run_config: str | None = None) -> Path:
    """The run's resolved config: `run_config`, else config_resolved.yaml beside the checkpoint or one level up."""
    candidates = [Path(run_config)] if run_config else [ckpt_path.parent / RUN_CONFIG, ckpt_path.parent.parent / RUN_CONFIG]
    for path in candidates:
        if path.is_file():
            return path
    raise EvalError(
        f"no run config for {ckpt_path}: looked for {' and '.join(map(str, candidates))}. "
        f"Pass run_config=PATH (the {RUN_CONFIG} that mcl.train wrote into the run dir)."
    )


def load_checkpoint(ckpt_path: str | Path, run_config: str | None = None) -> tuple[MCLModule, DictConfig]:
    """The pre-trained module (on the CPU, eval mode) and the resolved config of the run that wrote it."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise EvalError(f"ckpt_path={ckpt_path} is not a file (a .ckpt written by python -m mcl.train)")
    cfg = OmegaConf.load(find_run_config(ckpt_path, run_config))
    read_checkpoint(ckpt_path)  # a truncated or foreign file: the CheckpointError training gives
    module = module_from_checkpoint(ckpt_path)
    return module.eval(), cfg


def module_from_checkpoint(ckpt_path: str | Path) -> MCLModule:
    """The module of a checkpoint, on the CPU, built uncompiled whatever its run's model.compile said:
    evaluation and export run the network a few times, where compiling would cost more than it saves."""
    hparams = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
    model = {**hparams["model"], "compile": False} if "model" in hparams else None
    return MCLModule.load_from_checkpoint(ckpt_path, map_location="cpu", **({"model": model} if model else {}))


def datamodule_for(run_cfg: DictConfig, dataset: dict[str, Any] | None = None, **data: Any) -> ContrastiveDataModule:
    """The run's data (its `dataset` node, updated with `dataset`), loaded; `data` overrides `run_cfg.data`."""
    dataset_cfg = OmegaConf.to_container(OmegaConf.merge(run_cfg.dataset, dataset or {}), resolve=True)
    datamodule = ContrastiveDataModule(dataset=dataset_cfg, **{**OmegaConf.to_container(run_cfg.data, resolve=True), **data})
    datamodule.setup("fit")
    return datamodule


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features (N x D float32, on the CPU) and labels (N) of every (image, label) batch."""
    backbone.eval().to(device)
    feats, labels = [], []
    for x, y in loader:
        feats.append(backbone(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def labelled(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the unlabelled rows (label -1, e.g. STL-10's unlabeled split)."""
    keep = labels >= 0
    return feats[keep], labels[keep]


def write_result(ckpt_path: str | Path, name: str, result: dict[str, Any]) -> Path:
    """`<checkpoint stem>.<name>.json` next to the checkpoint; never overwrites an earlier result:
    a rerun (other settings, another seed) writes `<stem>.<name>.2.json`, then `.3.json`, ..."""
    ckpt_path = Path(ckpt_path)
    text = json.dumps(result, indent=2)
    for n in itertools.count(1):
        path = ckpt_path.with_name(f"{ckpt_path.stem}.{name}{'' if n == 1 else f'.{n}'}.json")
        try:
            with path.open("x") as f:  # exclusive: two evaluations at once never take the same name
                f.write(text)
            return path
        except FileExistsError:
            continue


def result_paths(ckpt_path: str | Path, name: str) -> list[Path]:
    """The results `write_result(ckpt_path, name, ...)` wrote, oldest first: `<stem>.<name>.json`, `.2.json`, ..."""
    ckpt_path = Path(ckpt_path)
    paths = []
    for n in itertools.count(1):
        path = ckpt_path.with_name(f"{ckpt_path.stem}.{name}{'' if n == 1 else f'.{n}'}.json")
        if not path.is_file():
            return paths
        paths.append(path)


def find_result(ckpt_path: str | Path, name: str, settings: dict[str, Any]) -> Path | None:
    """The newest result of `name` beside the checkpoint written with exactly these `settings`, or None."""
    for path in reversed(result_paths(ckpt_path, name)):
        try:
            if json.loads(path.read_text()).get("settings") == settings:
                return path
        except json.JSONDecodeError:
            continue  # a result cut short (the evaluation was killed while writing): evaluate again
    return None
