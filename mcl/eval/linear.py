"""`python -m mcl.eval.linear ckpt_path=PATH [protocol=fast]`: linear evaluation of a frozen backbone.

protocol=lab (default, docs/method.md): a linear classifier on the backbone features of augmented
training images (random resized crop + flip), SGD lr 30 Nesterov, 100 epochs, lr x0.1 at 60 and
80. protocol=fast: the same optimiser on features of the un-augmented images, extracted once.
Top-1/top-5 on the test split are printed and written to `<ckpt stem>.linear-<protocol>.json`
(a rerun: `.linear-<protocol>.2.json`, ...). A training loss that ends above chance level is a warning.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from mcl import runtime
from mcl.data import transforms
from mcl.data.datamodule import OneView
from mcl.eval.common import EvalError, datamodule_for, device_of, extract_features, labelled, load_checkpoint, write_result
from mcl.monitors import topk_accuracy

CONF_DIR = str(Path(runtime.CONF_DIR) / "eval")  # the packaged conf/ or the checkout's


class ProbeDivergedWarning(UserWarning):
    """The linear classifier's training loss ended above chance level: its accuracy means little."""


def probe_diverged(loss: float, num_classes: int) -> bool:
    """A final training loss above ln(num_classes) (a uniform guess's), or not finite."""
    return not loss <= math.log(num_classes)


def fit_classifier(
    loader: DataLoader, backbone: nn.Module | None, dim: int, num_classes: int, p: DictConfig, device: torch.device
) -> tuple[nn.Linear, float]:
    """SGD on a linear layer; `backbone` (frozen, eval mode) turns image batches into features, None: batches are features.

    Returns the classifier and its last epoch's mean training loss. A loss that ends above
    ln(num_classes), the loss of a uniform guess, means the optimiser diverged: a warning says so.
    """
    classifier = nn.Linear(dim, num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.nesterov, weight_decay=p.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(p.milestones), gamma=p.gamma)
    for epoch in range(p.epochs):
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if backbone is not None:
                with torch.no_grad():
                    x = backbone(x)  # B x dim
            loss = F.cross_entropy(classifier(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(y), count + len(y)
        schedule.step()
        if (epoch + 1) % max(1, p.epochs // 10) == 0 or epoch + 1 == p.epochs:
            print(f"epoch {epoch + 1}/{p.epochs}: train loss {total / count:.4f}")
    final = total / count
    if probe_diverged(final, num_classes):
        warnings.warn(
            f"linear probe: the training loss ended at {final:.4g}, above ln({num_classes}) = {math.log(num_classes):.2f}, the loss of a "
            f"uniform guess: the optimiser diverged at protocol.lr={p.lr} on these features, so its accuracy means little. "
            f"Rerun with a smaller protocol.lr (e.g. protocol.lr={p.lr / 30:g}).",
            ProbeDivergedWarning,
            stacklevel=2,
        )
    return classifier, final


def linear_eval(cfg: DictConfig) -> dict[str, Any]:
    """The linear evaluation; returns (and writes) {"top1", "top5", "protocol", ...}."""
    p = cfg.protocol
    if p.epochs < 1 or p.batch_size < 1 or p.lr <= 0:
        raise EvalError(f"protocol.epochs, protocol.batch_size and protocol.lr must be positive, got {p.epochs}, {p.batch_size}, {p.lr}")
    torch.manual_seed(cfg.seed)
    module, run_cfg = load_checkpoint(cfg.ckpt_path, cfg.run_config)
    datamodule = datamodule_for(run_cfg, cfg.dataset, eval_batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers)
    device = device_of(cfg.device)
    backbone = module.backbone.eval().requires_grad_(False).to(device)
    plain_train, plain_test = datamodule.val_dataloader()  # un-augmented train split, test split
    if p.augment:
        d = datamodule.dataset_cfg
        view = transforms.weak_view(d["image_size"], d["mean"], d["std"], crop_scale=tuple(p.crop_scale), flip_prob=p.flip_prob)
        images = datamodule.train_images
        train_set = Subset(OneView(images, view), np.flatnonzero(images.labels >= 0).tolist())
        extractor = backbone
    else:
        train_set = TensorDataset(*labelled(*extract_features(backbone, plain_train, device)))  # N x D, N
        extractor = None
    if len(train_set) == 0:
        raise EvalError(f"dataset {datamodule.dataset_cfg['name']} has no labelled training image to fit a classifier on")
    loader = DataLoader(train_set, batch_size=p.batch_size, shuffle=True, num_workers=cfg.num_workers if p.augment else 0)
    classifier, final_loss = fit_classifier(loader, extractor, module.backbone.out_dim, datamodule.num_classes, p, device)
    test_feats, test_labels = extract_features(backbone, plain_test, device)  # Q x D, Q
    with torch.no_grad():
        logits = classifier(test_feats.to(device)).cpu()  # Q x C
    result = {
        "ckpt_path": str(cfg.ckpt_path),
        "dataset": datamodule.dataset_cfg["name"],
        "protocol": p.name,
        "epochs": p.epochs,
        "settings": OmegaConf.to_container(p),  # the whole protocol; a rerun writes a new file beside this one
        "train_images": len(train_set),
        "test_images": len(test_labels),
        "top1": topk_accuracy(logits, test_labels),
        "top5": topk_accuracy(logits, test_labels, 5),
        "final_train_loss": final_loss,
        "diverged": probe_diverged(final_loss, datamodule.num_classes),
    }
    result["json"] = str(write_result(cfg.ckpt_path, f"linear-{p.name}", result))
    return result


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="linear")
def main(cfg: DictConfig) -> None:
    r = linear_eval(cfg)
    print(
        f"linear ({r['protocol']}, {r['epochs']} epochs) on {r['dataset']}: top1={r['top1']:.4f} top5={r['top5']:.4f}  (written: {r['json']})"
    )


if __name__ == "__main__":
    from mcl.runtime import run_cli

    run_cli(main)  # a user's mistake: one message, no traceback
