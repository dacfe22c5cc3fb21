"""Published figures beside ours: mcl/published.yaml (the lab's table, the paper's figures; shipped with the
package) and, per group of one preset and dataset, the published 200-NN and linear top-1, ours, the difference
and whether the budget (epochs, backbone width) differs."""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import yaml

from mcl.report.groups import Group


def published() -> dict[str, Any]:
    """mcl/published.yaml: the lab's table and the paper's figures (shipped with the package)."""
    return yaml.safe_load(resources.files("mcl").joinpath("published.yaml").read_text(encoding="utf-8"))


def _ours(g: Group, metrics: tuple[str, ...]) -> tuple[str | None, float, float, int]:
    """The first of `metrics` the group has, with its mean, std and count (in percent)."""
    for m in metrics:
        mean, std, n = g.stats(m)
        if n:
            return m, 100 * mean, 100 * std, n
    return None, math.nan, math.nan, 0


def published_rows(groups: list[Group]) -> list[dict[str, Any]]:
    """Per group whose runs share a preset and dataset with a published figure: the figures, ours and the difference.

    200-NN: ours is the offline 200-NN (mcl.eval) where the runs have it, else the online kNN
    monitor (k=200, t=0.1 by default). Linear: ours is the lab protocol's best test epoch (as the
    lab reports it). budget_differs: our epochs or backbone width are not the published ones (then
    the difference measures the smaller budget, it is no reproduction); `differs` says which.
    """
    table = published()
    rows = []
    for g in groups:
        presets, datasets = {j.preset for j in g.completed}, {j.dataset for j in g.completed}
        if len(presets) != 1 or len(datasets) != 1:
            continue
        preset, dataset = presets.pop(), datasets.pop()
        entry = table["presets"].get(preset or "", {})
        figures_ = entry.get(dataset)
        if not figures_:
            continue
        source = table["sources"][entry["source"]]
        epochs = sorted({j.max_epochs for j in g.completed if j.max_epochs is not None})
        row: dict[str, Any] = {
            "group": g.label,
            "preset": preset,
            "published_as": entry["name"],
            "dataset": dataset,
            "source": entry["source"],
        }
        for what, ours in (("knn200", ("eval/knn200_top1", "val/knn_top1")), ("linear", ("eval/linear_lab_best_top1",))):
            metric, mean, std, n = _ours(g, ours)
            pub = figures_.get(what)
            row[what] = {"published": pub, "ours_metric": metric, "ours_mean": mean, "ours_std": std, "n": n}
            row[what]["difference"] = mean - pub if pub is not None and n else math.nan
        widths = sorted({j.width for j in g.completed if j.width is not None})
        differs = [f"{'/'.join(map(str, epochs))} vs {source['epochs']} epochs"] if epochs != [source["epochs"]] else []
        differs += [f"width {'/'.join(map(str, widths))} vs {source['width']}"] if widths and widths != [source["width"]] else []
        row |= {
            "epochs": epochs,
            "published_epochs": source["epochs"],
            "widths": widths,
            "budget_differs": bool(differs),
            "differs": differs,
        }
        rows.append(row)
    return rows
