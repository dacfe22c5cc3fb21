"""`python -m mcl.eval.linear ckpt_path=PATH [protocol=fast]`: linear evaluation of a frozen backbone.

protocol=lab (default, docs/method.md): a linear classifier, initialised as the lab's (weights
N(0, 0.01), bias 0), on the backbone features of augmented training images (random resized crop
+ flip), SGD lr 30 Nesterov, 100 epochs, lr x0.1 at 60 and 80. protocol=fast: the same optimiser
on features of the un-augmented images, extracted once. After every epoch the classifier is
tested; the result holds the final epoch's top-1/top-5 and the best test epoch's (what the lab
reports as "Acc-1-Best": picked on the test split, so optimistic). Written to
`<ckpt stem>.linear-<protocol>.json` (a rerun: `.linear-<protocol>.2.json`, ...).

protocol.lr_search=true picks the lr first: each of protocol.lr_candidates trains
protocol.lr_search_epochs epochs on frozen features of (1 - protocol.lr_search_holdout) of the
labelled training split and is scored on the held-out rest (never the test split); the lowest
held-out cross-entropy wins. Should the full run at that lr still diverge (its training loss ends
above ln(classes)), it is trained again at the next smaller candidate, the best of those by the
held-out loss, until one does not. A training loss that ends above chance level is a warning that says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
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


def lab_classifier(dim: int, num_classes: int) -> nn.Linear:
    """The lab's linear head: weights ~ N(0, 0.01^2) (std 0.01), bias 0."""
    classifier = nn.Linear(dim, num_classes)
    nn.init.normal_(classifier.weight, mean=0.0, std=0.01)
    nn.init.zeros_(classifier.bias)
    return classifier


def fit_classifier(
    loader: DataLoader,
    backbone: nn.Module | None,
    dim: int,
    num_classes: int,
    p: DictConfig,
    device: torch.device,
    lr: float | None = None,
    after_epoch: Callable[[nn.Linear, int], None] | None = None,
    warn: bool = True,
    verbose: bool = True,
) -> tuple[nn.Linear, float]:
    """SGD (p's momentum, Nesterov, weight decay, milestones) at `lr` (default p.lr) on the lab's linear head;
    `backbone` (frozen, eval mode) turns image batches into features, None: batches are features.

    `after_epoch(classifier, epoch)` runs after every epoch (epochs counted from 1). Returns the
    classifier and its last epoch's mean training loss. A loss that ends above ln(num_classes),
    the loss of a uniform guess, means the optimiser diverged: a warning says so (`warn`).
    `verbose`: print the training loss ten times.
    """
    lr = p.lr if lr is None else lr
    classifier = lab_classifier(dim, num_classes).to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=p.momentum, nesterov=p.nesterov, weight_decay=p.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(p.milestones), gamma=p.gamma)
    for epoch in range(1, p.epochs + 1):
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
        if after_epoch is not None:
            after_epoch(classifier, epoch)
        if verbose and (epoch % max(1, p.epochs // 10) == 0 or epoch == p.epochs):
            print(f"epoch {epoch}/{p.epochs}: train loss {total / count:.4f}")
    final = total / count
    if warn and probe_diverged(final, num_classes):
        warnings.warn(
            f"linear probe: the training loss ended at {final:.4g}, above ln({num_classes}) = {math.log(num_classes):.2f}, the loss of a "
            f"uniform guess: the optimiser diverged at lr={lr:g} on these features, so its accuracy means little. "
            f"Rerun with protocol.lr_search=true (it picks the lr on a held-out slice of the training split).",
            ProbeDivergedWarning,
            stacklevel=2,
        )
    return classifier, final


def search_lr(
    feats: torch.Tensor, labels: torch.Tensor, num_classes: int, p: DictConfig, device: torch.device, seed: int
) -> tuple[float, dict[str, dict[str, float]]]:
    """The lr of p.lr_candidates with the lowest cross-entropy on a held-out slice of the training features.

    feats, labels: N x D, N of the labelled *training* split. A random p.lr_search_holdout share
    is held out; each candidate trains p.lr_search_epochs epochs (at most p.epochs; constant lr) on the rest. The
    held-out loss, not the held-out top-1, decides: on a slice of a few dozen images several lrs
    tie on top-1, and one that is about to diverge still guesses right with exploding logits,
    which the loss shows. Ties go to the candidate listed first. Returns (lr, {lr: {loss, top1}}).
    """
    if not 0 < p.lr_search_holdout < 1 or not p.lr_candidates or min(p.lr_candidates) <= 0 or p.lr_search_epochs < 1:
        raise EvalError(
            "protocol.lr_search=true needs 0 < protocol.lr_search_holdout < 1, positive protocol.lr_candidates and "
            f"protocol.lr_search_epochs >= 1, got {p.lr_search_holdout}, {list(p.lr_candidates)}, {p.lr_search_epochs}"
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))  # N
    held = max(1, round(p.lr_search_holdout * len(labels)))
    if held >= len(labels):
        raise EvalError(f"protocol.lr_search_holdout={p.lr_search_holdout} leaves no training image out of {len(labels)}")
    fit_idx, held_idx = order[held:], order[:held]
    loader = DataLoader(TensorDataset(feats[fit_idx], labels[fit_idx]), batch_size=p.batch_size, shuffle=True)
    short = OmegaConf.merge(p, {"epochs": min(p.lr_search_epochs, p.epochs), "milestones": []})  # a short protocol: no longer than it
    scores: dict[str, dict[str, float]] = {}
    for lr in p.lr_candidates:
        classifier, _ = fit_classifier(loader, None, feats.shape[1], num_classes, short, device, lr=lr, warn=False, verbose=False)
        with torch.no_grad():
            logits = classifier(feats[held_idx].to(device)).cpu()  # H x C
        loss = F.cross_entropy(logits, labels[held_idx]).item()
        scores[f"{lr:g}"] = {"loss": loss if math.isfinite(loss) else math.inf, "top1": topk_accuracy(logits, labels[held_idx])}
    best = min(p.lr_candidates, key=lambda lr: scores[f"{lr:g}"]["loss"])  # min keeps the first of equals
    print(
        "lr search (held-out loss / top-1 on the training split): "
        + ", ".join(f"lr={k} {v['loss']:.3g} / {v['top1']:.3f}" for k, v in scores.items())
        + f" -> lr={best:g}"
    )
    return float(best), scores


def lr_order(candidates: list[float], scores: dict[str, dict[str, float]]) -> list[float]:
    """The lrs to train with, in turn while the full run diverges: the search's best, then each smaller
    candidate by its held-out loss."""
    ranked = sorted(candidates, key=lambda lr: scores[f"{lr:g}"]["loss"])
    order = [ranked[0]]
    for lr in ranked[1:]:
        if lr < order[-1] and lr not in order:
            order.append(lr)
    return order


def linear_settings(cfg: DictConfig) -> dict[str, Any]:
    """The knobs a linear result depends on: the protocol, the seed and the dataset fields replaced."""
    return {
        **OmegaConf.to_container(cfg.protocol, resolve=True),
        "seed": cfg.seed,
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
    }


def linear_eval(cfg: DictConfig) -> dict[str, Any]:
    """The linear evaluation; returns (and writes) {"final": {epoch, top1, top5}, "best": {...}, "top1" (final), ...}."""
    p = cfg.protocol
    if p.epochs < 1 or p.batch_size < 1 or p.lr <= 0:
        raise EvalError(f"protocol.epochs, protocol.batch_size and protocol.lr must be positive, got {p.epochs}, {p.batch_size}, {p.lr}")
    torch.manual_seed(cfg.seed)
    module, run_cfg = load_checkpoint(cfg.ckpt_path, cfg.run_config)
    datamodule = datamodule_for(run_cfg, cfg.dataset, eval_batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers)
    device = device_of(cfg.device)
    backbone = module.backbone.eval().requires_grad_(False).to(device)
    num_classes = datamodule.num_classes
    plain_train, plain_test = datamodule.val_dataloader()  # un-augmented train split, test split
    plain_feats = None
    if not p.augment or p.lr_search:
        plain_feats = labelled(*extract_features(backbone, plain_train, device))  # N x D, N
    lrs, lr_scores = [p.lr], None
    if p.lr_search:
        _, lr_scores = search_lr(*plain_feats, num_classes, p, device, cfg.seed)
        lrs = lr_order(list(p.lr_candidates), lr_scores)
    if p.augment:
        d = datamodule.dataset_cfg
        view = transforms.weak_view(d["image_size"], d["mean"], d["std"], crop_scale=tuple(p.crop_scale), flip_prob=p.flip_prob)
        images = datamodule.train_images
        train_set = Subset(OneView(images, view), np.flatnonzero(images.labels >= 0).tolist())
        extractor = backbone
    else:
        train_set = TensorDataset(*plain_feats)
        extractor = None
    if len(train_set) == 0:
        raise EvalError(f"dataset {datamodule.dataset_cfg['name']} has no labelled training image to fit a classifier on")
    test_feats, test_labels = extract_features(backbone, plain_test, device)  # Q x D, Q
    epochs: list[dict[str, float]] = []

    def test(classifier: nn.Linear, epoch: int) -> None:
        with torch.no_grad():
            logits = classifier(test_feats.to(device)).cpu()  # Q x C
        epochs.append({"epoch": epoch, "top1": topk_accuracy(logits, test_labels), "top5": topk_accuracy(logits, test_labels, 5)})

    loader = DataLoader(train_set, batch_size=p.batch_size, shuffle=True, num_workers=cfg.num_workers if p.augment else 0)
    for i, lr in enumerate(lrs):  # with the search: a full run that diverges is rerun at the next smaller candidate
        epochs.clear()
        last = i == len(lrs) - 1
        _, final_loss = fit_classifier(
            loader, extractor, module.backbone.out_dim, num_classes, p, device, lr=lr, after_epoch=test, warn=last
        )
        if not probe_diverged(final_loss, num_classes) or last:
            break
        print(f"linear probe: the training loss ended at {final_loss:.4g} > ln({num_classes}) at lr={lr:g}: again at lr={lrs[i + 1]:g}")
    final, best = epochs[-1], max(epochs, key=lambda e: e["top1"])  # best: the first epoch reaching the highest top-1
    result = {
        "ckpt_path": str(cfg.ckpt_path),
        "dataset": datamodule.dataset_cfg["name"],
        "protocol": p.name,
        "epochs": p.epochs,
        "settings": linear_settings(cfg),  # the whole protocol, seed, dataset fields; a rerun writes a new file beside this one
        "lr": lr,
        "lrs_tried": lrs[: lrs.index(lr) + 1],
        "lr_search": lr_scores,  # held-out loss and top-1 per candidate lr (None: no search)
        "train_images": len(train_set),
        "test_images": len(test_labels),
        "top1": final["top1"],  # the final epoch's, as the two fields below
        "top5": final["top5"],
        "final": final,
        "best": {**best, "note": "best test epoch (the lab's Acc-1-Best): picked on the test split, optimistic"},
        "per_epoch": epochs,
        "final_train_loss": final_loss,
        "diverged": probe_diverged(final_loss, num_classes),
    }
    result["json"] = str(write_result(cfg.ckpt_path, f"linear-{p.name}", result))
    return result


def print_result(r: dict[str, Any]) -> None:
    final, best = r["final"], r["best"]
    print(f"linear ({r['protocol']}, {r['epochs']} epochs, lr {r['lr']:g}) on {r['dataset']}:")
    print(f"  final epoch ({final['epoch']}):     top1={final['top1']:.4f} top5={final['top5']:.4f}")
    print(f"  best test epoch ({best['epoch']}): top1={best['top1']:.4f} top5={best['top5']:.4f}  (the lab's Acc-1-Best; optimistic)")
    print(f"  written: {r['json']}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="linear")
def main(cfg: DictConfig) -> None:
    print_result(linear_eval(cfg))


if __name__ == "__main__":
    from mcl.runtime import run_cli

    run_cli(main)  # a user's mistake: one message, no traceback
