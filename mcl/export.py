"""`python -m mcl.export ckpt_path=PATH out=FILE`: the backbone as a plain torchvision state_dict, and beside
it `<FILE stem>.json`: the input it expects (image size, normalisation mean / std) and its architecture.

`mcl.models.WidthResNet` is torchvision's ResNet with torchvision's parameter names and an
Identity classifier, so the file (tensors only, `torch.load(FILE, weights_only=True)`) loads
with strict key matching into `torchvision.models.resnet18()` / `resnet50()` whose `fc` is an
Identity (and, for the CIFAR stem, whose conv1 is 3x3 stride 1, and maxpool an Identity unless
the dataset keeps it: TinyImageNet, STL-10). The export prints those lines. torchvision builds
width 64 only; another width loads into `WidthResNet(arch, width, cifar_stem, maxpool)`.
SplitBatchNorm (model.bn_splits) is a BatchNorm2d with the same parameters and buffers: nothing
of it shows in the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from mcl import runtime
from mcl.eval.common import EvalError, module_from_checkpoint
from mcl.module import MCLModule
from mcl.reliability import CONFIG_KEY, read_checkpoint

CONF_DIR = str(Path(runtime.CONF_DIR) / "eval")


def backbone_state_dict(module: MCLModule, encoder: str = "query") -> dict[str, torch.Tensor]:
    """The query backbone (or its EMA copy, encoder="key") as a CPU state_dict with torchvision's keys."""
    if encoder not in ("query", "key"):
        raise EvalError(f"encoder must be 'query' or 'key', got {encoder!r}")
    if encoder == "key" and module.key_backbone is None:
        raise EvalError(
            "encoder=key: this checkpoint has no key encoder (model.candidates=batch and model.key_encoder=online train one encoder); use encoder=query"
        )
    backbone = module.backbone if encoder == "query" else module.key_backbone
    return {name: t.detach().cpu().clone() for name, t in backbone.state_dict().items()}


def torchvision_recipe(backbone: dict, out: str) -> str:
    """Python lines that rebuild the exported backbone without mcl."""
    arch, width, cifar_stem = backbone["arch"], backbone["width"], backbone["cifar_stem"]
    maxpool = backbone.get("maxpool")
    maxpool = not cifar_stem if maxpool is None else maxpool  # checkpoints written before the knob: as the stem
    if width != 64:
        return (
            f"# width {width}: torchvision's constructors build width 64 only; load it into mcl's ResNet:\n"
            f"import torch\n"
            f"from mcl.models import WidthResNet\n"
            f"model = WidthResNet({arch!r}, width={width}, cifar_stem={cifar_stem}, maxpool={maxpool})\n"
            f"model.load_state_dict(torch.load({out!r}, weights_only=True))"
        )
    lines = ["import torch, torchvision", f"model = torchvision.models.{arch}()"]
    if cifar_stem:
        lines.append("model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem conv")
    if not maxpool:
        lines.append("model.maxpool = torch.nn.Identity()  # no max-pool after the stem")
    lines += [
        "model.fc = torch.nn.Identity()  # features; put your classifier here",
        f"model.load_state_dict(torch.load({out!r}, weights_only=True))",
    ]
    return "\n".join(lines)


def input_record(run_config: dict | None, backbone: dict, encoder: str, ckpt: Path) -> dict:
    """What the exported backbone expects and what it is: image size, normalisation (dataset.mean / std, applied
    to images scaled to [0, 1]), the dataset it was trained on, its architecture. None where the checkpoint holds
    no run config (an older mcl wrote it)."""
    dataset = (run_config or {}).get("dataset", {})
    return {
        "checkpoint": str(ckpt),
        "encoder": encoder,
        "dataset": dataset.get("name"),
        "image_size": dataset.get("image_size"),
        "mean": dataset.get("mean"),
        "std": dataset.get("std"),
        **{k: backbone.get(k) for k in ("arch", "width", "cifar_stem", "maxpool")},
    }


def export(cfg: DictConfig) -> Path:
    """Write the backbone of cfg.ckpt_path to cfg.out, and beside it (<out stem>.json) its input: image size and
    normalisation; returns the path of the backbone."""
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.is_file():
        raise EvalError(f"ckpt_path={ckpt} is not a file (a .ckpt written by python -m mcl.train)")
    run_config = read_checkpoint(ckpt).get(CONFIG_KEY)  # a truncated or foreign file: the CheckpointError training gives
    module = module_from_checkpoint(ckpt)
    state = backbone_state_dict(module, cfg.encoder)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    record = input_record(run_config, module.hparams.backbone, cfg.encoder, ckpt)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    size, mean, std = record["image_size"], record["mean"], record["std"]
    expects = (
        f"its input: {size} x {size} px RGB images scaled to [0, 1], normalised with mean {mean} and std {std} (dataset {record['dataset']})"
        if size is not None
        else "its input: not recorded (the checkpoint holds no run config)"
    )
    print(f"wrote the {cfg.encoder} backbone ({len(state)} tensors) to {out}; {expects}, in {out.with_suffix('.json')}; load it with:\n")
    print(torchvision_recipe(module.hparams.backbone, str(out)))
    return out


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    from mcl.runtime import run_cli

    run_cli(main)  # a user's mistake: one message, no traceback
