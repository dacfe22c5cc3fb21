"""The report's figures (matplotlib, no pyplot state): final accuracy per group, kNN top-1 over epochs and
the mining diagnostics over epochs; titled in words, legends outside the axes, epochs counted from 1."""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict

import numpy as np
from matplotlib.figure import Figure

from mcl.report.groups import Group, Setting
from mcl.report.metrics import accuracy_metrics, is_share, metric_name, metrics_of, shown

MARKERS = "osD^vPX*"  # a group keeps its colour C<i> and marker in every plot


def _titled(fig: Figure, what: str, setting: Setting) -> Figure:
    """A title of words (dataset, budget, what varies; or the user's), and below it what is drawn."""
    width = int(fig.get_figwidth() * 12)  # characters of a medium-size line that fit the figure
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in (setting.words, what)), fontsize="medium")
    return fig


def plot_accuracy(groups: list[Group], setting: Setting, metrics: list[str] | None = None) -> Figure | None:
    """Final accuracy per group, one panel per metric: the mean (marker) ± one std (bar), beside it a dot
    per run, the runs of one seed joined by a thin line (what the paired differences compare).

    The axis spans the values drawn (not from 0), so a gap of a point shows."""
    groups = [g for g in groups if g.completed]
    metrics = [m for m in (metrics or accuracy_metrics(groups)) if any(m in j.final for g in groups for j in g.completed)]
    if not metrics:
        return None
    fig = Figure(figsize=(max(6.5, (0.9 * len(groups) + 1.5) * len(metrics)), 4.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(metrics), squeeze=False)).ravel()
    for ax, metric in zip(axes, metrics):
        drawn, by_seed = [], defaultdict(list)  # seed -> [(x, value)] across groups
        for i, g in enumerate(groups):
            runs = [(j.seed, shown(metric, j.final[metric])) for j in g.completed if metric in j.final]
            if not runs:
                continue
            mean, std, _ = g.stats(metric)
            mean, std = shown(metric, mean), 0.0 if math.isnan(std) else shown(metric, std)
            ax.errorbar([i], [mean], yerr=[std], fmt=MARKERS[i % len(MARKERS)], color=f"C{i}", markersize=8, capsize=5, zorder=2)
            ax.scatter([i + 0.22] * len(runs), [v for _, v in runs], color="black", s=12, zorder=3, alpha=0.7)
            for seed, v in runs:
                if seed is not None:
                    by_seed[seed].append((i + 0.22, v))
            drawn += [v for _, v in runs] + [mean - std, mean + std]
        for points in by_seed.values():
            if len(points) > 1:
                ax.plot(*zip(*points), color="grey", linewidth=0.6, alpha=0.5, zorder=1)
        lo, hi = min(drawn), max(drawn)
        pad = max(0.15 * (hi - lo), 0.5)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        many = len(groups) > 2
        ax.set_xticks(np.arange(len(groups)), [g.label for g in groups], rotation=20 if many else 0, ha="right" if many else "center")
        ax.set_title(metric_name(metric), fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    return _titled(fig, "Final accuracy: mean ± std over seeds; a dot per run, one seed's runs joined", setting)


def _plot_history(ax, groups: list[Group], metric: str) -> bool:
    drawn, every = False, set()
    dodge = min(0.06, 0.3 / max(1, len(groups) - 1))  # at most 0.3 epochs between the outermost groups
    for i, g in enumerate(groups):
        curves = [j.history[metric] for j in g.completed if metric in j.history]
        epochs = sorted({e for c in curves for e in c})
        if not epochs:
            continue
        values = np.array([[shown(metric, c.get(e, np.nan)) for e in epochs] for c in curves])  # runs x epochs
        mean = np.nanmean(values, axis=0)
        std = np.nanstd(values, axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
        x = np.array(epochs) + 1  # metrics.csv counts epochs from 0; a value logged in epoch e is after e + 1 epochs
        shift = (i - (len(groups) - 1) / 2) * dodge  # a little apart, so equal lines do not hide each other
        label = f"{g.label} (n={len(curves)})"
        ax.plot(x + shift, mean, marker=MARKERS[i % len(MARKERS)], markersize=4, color=f"C{i}", label=label, alpha=0.9)
        if len(x) > 1:
            ax.fill_between(x + shift, mean - std, mean + std, color=f"C{i}", alpha=0.15)
        else:  # one epoch: a band would be a line; error bars
            ax.errorbar(x + shift, mean, yerr=std, fmt="none", ecolor=f"C{i}", capsize=4)
        drawn, every = True, every | set(x.tolist())
    if every and max(every) - min(every) < 4:  # a short run: whole epochs, with room around the points
        ax.set_xlim(min(every) - 0.5, max(every) + 0.5)
        ax.set_xticks(sorted(every))
    else:
        ax.xaxis.get_major_locator().set_params(integer=True)
    lo, hi = ax.get_ylim()
    least = 1.0 if is_share(metric) else 1e-3 * max(abs(lo), abs(hi), 1e-9)  # a flat metric: an axis of plain numbers, not 1e-6 offsets
    if hi - lo < least:
        ax.set_ylim((lo + hi - least) / 2, (lo + hi + least) / 2)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("epochs trained")
    ax.set_ylabel(metric_name(metric))
    ax.grid(alpha=0.3)
    return drawn


def _legend(fig: Figure, axes: list, groups: list[Group], loc: str) -> None:
    """One legend for the figure, outside the axes: every group once, in launch order."""
    handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    order = [g.label for g in groups]
    labels = sorted(handles, key=lambda label: order.index(label.rsplit(" (n=", 1)[0]))
    ncols = 1 if "right" in loc else min(4, len(labels))
    fig.legend([handles[k] for k in labels], labels, loc=loc, ncols=ncols, fontsize="small", frameon=False)


def plot_history(groups: list[Group], setting: Setting, metric: str = "val/knn_top1") -> Figure | None:
    """One metric over epochs: a line per group (mean over seeds) with a one-std band; the legend right of the axes."""
    fig = Figure(figsize=(8.0, 4.4), layout="constrained")
    ax = fig.subplots()
    if not _plot_history(ax, groups, metric):
        return None
    _legend(fig, [ax], groups, "outside center right")
    return _titled(fig, f"{metric_name(metric)} per epoch: mean ± std over seeds", setting)


def plot_diagnostics(groups: list[Group], setting: Setting) -> Figure | None:
    """Every `mining/*` metric over epochs, one panel each; the legend below the panels."""
    names = metrics_of(groups, "mining/")
    if not names:
        return None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(max(6.5, 4.4 * cols), 3.0 * rows + 1.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, name in zip(axes, names):
        _plot_history(ax, groups, name)
        ax.set_title(metric_name(name), fontsize="medium")
        ax.set_ylabel("")
    lo, hi = min(ax.get_xlim()[0] for ax in axes[: len(names)]), max(ax.get_xlim()[1] for ax in axes[: len(names)])
    ticks = sorted({t for ax in axes[: len(names)] for t in ax.get_xticks() if lo <= t <= hi})
    for ax in axes[: len(names)]:  # one epoch axis for every panel, also those a metric logged only late
        ax.set_xlim(lo, hi)
        ax.set_xticks(ticks)
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    _legend(fig, list(axes), groups, "outside lower center")
    return _titled(fig, "Mining diagnostics per epoch: mean ± std over seeds", setting)


def figures(groups: list[Group], setting: Setting, metrics: list[str] | None = None) -> dict[str, Figure | None]:
    """The report's figures by file name (written as <name>.png, .svg and .pdf); None where there is nothing to draw."""
    return {
        "accuracy": plot_accuracy(groups, setting, accuracy_metrics(groups, metrics)),
        "knn_over_epochs": plot_history(groups, setting, "val/knn_top1"),
        "diagnostics": plot_diagnostics(groups, setting),
    }
