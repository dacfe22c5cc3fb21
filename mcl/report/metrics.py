"""Metrics by name: their words for tables and axes, shares shown in percent, counts apart, the order of
the columns, and which metrics the results table, the accuracy plot and the paired differences show."""

from __future__ import annotations

from mcl.report.groups import Group

METRIC_NAMES = {  # metric key -> words for tables, axes and legends; "%": a share, shown in percent
    "val/knn_top1": "kNN top-1 (%)",
    "val/knn_top5": "kNN top-5 (%)",
    "val/linear_top1": "online linear top-1 (%)",
    "eval/knn200_top1": "offline 200-NN top-1 (%)",
    "val/knn_memory_size": "kNN monitor: train images voting",
    "val/knn_queries": "kNN monitor: test images scored",
    "mining/pos_kept": "mined positives kept per query",
    "mining/pos_purity": "mined positives of the query's class (%)",
    "mining/neg_kept": "negatives kept per query",
    "mining/neg_fn_kept": "false negatives among kept (%)",
    "mining/neg_fn_dropped": "false negatives among dropped (%)",
    "mining/neg_grad_share_kept": "gradient share of kept negatives (%)",
    "mining/neg_sim_kept": "similarity of kept negatives",
    "mining/neg_sim_dropped": "similarity of dropped negatives",
}
ACCURACY = ("val/knn_top1", "val/knn_top5", "val/linear_top1", "eval/knn200_top1")  # first in tables, in this order


def metric_name(metric: str) -> str:
    """`val/knn_top1` -> `kNN top-1 (%)`; `eval/linear_lab_best_top1` -> `linear (lab) top-1, best test epoch (%)`;
    an unknown metric reads as its last part in words."""
    if metric in METRIC_NAMES:
        return METRIC_NAMES[metric]
    if metric.startswith("eval/linear_") and metric.endswith("_top1"):
        protocol, best = metric[len("eval/linear_") : -len("_top1")], False
        if protocol.endswith("_best"):
            protocol, best = protocol[: -len("_best")], True
        return f"linear ({protocol}) top-1, {'best test' if best else 'final'} epoch (%)"
    return metric.rsplit("/", 1)[-1].replace("_", " ")


COUNTS = ("val/knn_memory_size", "val/knn_queries")  # numbers of things, as the metrics `... per query`


def is_count(metric: str) -> bool:
    """A number of things, not a rate: kept out of the results tables, in a table of its own."""
    return metric in COUNTS or metric_name(metric).endswith("per query")


def is_share(metric: str) -> bool:
    """A share in [0, 1] as logged, shown in percent (its name ends in `(%)`)."""
    return metric_name(metric).endswith("(%)")


def shown(metric: str, value: float) -> float:
    """The value as tables and plots show it: shares in percent."""
    return 100 * value if is_share(metric) else value


def _order(metric: str) -> tuple:
    if metric in ACCURACY:
        return (0, ACCURACY.index(metric), metric)
    if metric.startswith("eval/"):
        return (1, "best" not in metric, metric)  # the lab's best-epoch figure before the final epoch's
    return (2, 0, metric)


def metrics_of(groups: list[Group], prefix: str | tuple[str, ...] = "") -> list[str]:
    """Metric names with a final value in some completed job, monitors first, then the offline evaluations."""
    names = {m for g in groups for j in g.completed for m in j.final if m.startswith(prefix)}
    return sorted(names, key=_order)


def results_metrics(groups: list[Group], metrics: list[str] | None = None) -> list[str]:
    """The results table's metrics: `metrics` (checked), else every `val/*` and `eval/*` metric that is no count."""
    available = metrics_of(groups, ("val/", "eval/", "mining/"))
    if metrics:
        unknown = [m for m in metrics if m not in available]
        if unknown:
            raise ValueError(f"--metrics {' '.join(unknown)}: no completed job has it; the metrics: {' '.join(available)}")
        return list(metrics)
    return [m for m in available if m.startswith(("val/", "eval/")) and not is_count(m)]


def accuracy_metrics(groups: list[Group], metrics: list[str] | None = None) -> list[str]:
    """The accuracies the plot and the paired differences show: the chosen ones, else the lab's offline
    figures where the runs have them (200-NN, linear best epoch), else the online kNN and linear monitors."""
    if metrics:
        return [m for m in metrics if is_share(m)]
    have = set(metrics_of(groups))
    offline = [m for m in metrics_of(groups, "eval/") if m == "eval/knn200_top1" or m.endswith("_best_top1")]
    return offline or [m for m in ("val/knn_top1", "val/linear_top1") if m in have]
