"""`python -m mcl.eval.knn ckpt_path=PATH`: weighted kNN top-1/top-5 over a grid of k and t.

Features of the un-augmented train and test splits are extracted once; every (k, t) of the grid
(conf/eval/knn.yaml) reuses them. Prints the grid and writes `<ckpt stem>.knn.json` beside the
checkpoint (a rerun: `<ckpt stem>.knn.2.json`, ...). The best cell is picked on the test split, so it is an optimistic figure; the lab
protocol's k=200, t=0.1 is the one to compare across runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from mcl import runtime
from mcl.eval.common import EvalError, datamodule_for, device_of, extract_features, labelled, load_checkpoint, write_result
from mcl.monitors import knn_predict, topk_accuracy

CONF_DIR = str(Path(runtime.CONF_DIR) / "eval")  # the packaged conf/ or the checkout's


def knn_settings(cfg: DictConfig) -> dict[str, Any]:
    """The knobs a kNN result depends on: the grid and the dataset fields replaced."""
    return {"k": list(cfg.k), "t": list(cfg.t), "dataset": OmegaConf.to_container(cfg.dataset, resolve=True)}


def knn_grid(cfg: DictConfig) -> dict[str, Any]:
    """The kNN evaluation; returns (and writes) {"grid": [{k, t, top1, top5}], "best": {...}}."""
    if not cfg.k or not cfg.t or min(cfg.k) < 1 or min(cfg.t) <= 0:
        raise EvalError(f"k must be a non-empty list of positive integers and t of positive floats, got k={cfg.k}, t={cfg.t}")
    module, run_cfg = load_checkpoint(cfg.ckpt_path, cfg.run_config)
    datamodule = datamodule_for(run_cfg, cfg.dataset, eval_batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    device = device_of(cfg.device)
    train_loader, test_loader = datamodule.val_dataloader()  # un-augmented train split, test split
    memory, memory_labels = labelled(*extract_features(module.backbone, train_loader, device))  # N x D, N
    query, query_labels = extract_features(module.backbone, test_loader, device)  # Q x D, Q
    grid = []
    for k in cfg.k:
        for t in cfg.t:
            scores = knn_predict(query, memory, memory_labels, datamodule.num_classes, k, t)  # Q x C
            grid.append({"k": k, "t": t, "top1": topk_accuracy(scores, query_labels), "top5": topk_accuracy(scores, query_labels, 5)})
    result = {
        "ckpt_path": str(cfg.ckpt_path),
        "dataset": datamodule.dataset_cfg["name"],
        "settings": knn_settings(cfg),  # what a rerun with other settings differs in (mcl.eval.sweep skips a match)
        "train_images": len(memory),
        "test_images": len(query),
        "grid": grid,
        "best": max(grid, key=lambda r: r["top1"]),
    }
    result["json"] = str(write_result(cfg.ckpt_path, "knn", result))
    return result


def print_grid(result: dict[str, Any]) -> None:
    print(f"kNN on {result['dataset']}: {result['train_images']} train features vote for {result['test_images']} test images")
    print(f"{'k':>5} {'t':>6} {'top1':>7} {'top5':>7}")
    for r in result["grid"]:
        print(f"{r['k']:>5} {r['t']:>6} {r['top1']:>7.4f} {r['top5']:>7.4f}")
    best = result["best"]
    print(f"best: k={best['k']} t={best['t']} top1={best['top1']:.4f} top5={best['top5']:.4f}  (written: {result['json']})")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="knn")
def main(cfg: DictConfig) -> None:
    print_grid(knn_grid(cfg))


if __name__ == "__main__":
    from mcl.runtime import run_cli

    run_cli(main)  # a user's mistake: one message, no traceback
