"""The markdown tables of report.md, a row per group: results (mean ± std), counts, paired differences to
the baseline with their t intervals, and the published figures beside ours with the sources' notes."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from mcl.report.groups import Group, plural, short_keys
from mcl.report.metrics import metric_name
from mcl.report.publications import published, published_rows
from mcl.report.stats import baseline_key, choose_baseline, decimals, mean_std, paired_rows


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def group_table(groups: list[Group], columns: list[str], cells: Callable[[Group], list[str] | None]) -> list[str]:
    """A row per group: its name (`--labels`) and its swept values (`group`, its label, where nothing is swept),
    then `columns`, filled by `cells(group)`; a group for which it gives None has no row."""
    keys = list(groups[0].values)
    named = any(g.name for g in groups)
    head = [*(["variant"] if named else []), *(keys or ([] if named else ["group"])), *columns]
    lines = [_row(head), "|" + "---|" * len(head)]
    for g in groups:
        row = cells(g)
        if row is not None:
            lines.append(_row([*([g.label] if named else []), *(g.values.values() if keys else ([] if named else [g.label])), *row]))
    return lines


def results_table(groups: list[Group], metrics: list[str]) -> list[str]:
    """Completed / planned runs, then mean ± sample std of each metric's final value, one precision per metric."""
    places = {m: decimals(m, [g.stats(m)[0] for g in groups]) for m in metrics}
    return group_table(
        groups,
        ["runs", *map(metric_name, metrics)],
        lambda g: [f"{len(g.completed)}/{len(g.jobs)}", *(mean_std(m, *g.stats(m)[:2], places[m]) for m in metrics)],
    )


def _count(g: Group, metric: str) -> str:
    values = sorted({round(j.final[metric], 1) for j in g.completed if metric in j.final})
    return "-" if not values else f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g}-{values[-1]:g}"


def count_table(groups: list[Group], metrics: list[str]) -> list[str]:
    """Counts as counts: the value where every run of a group logged the same, else its range."""
    return group_table(groups, list(map(metric_name, metrics)), lambda g: [_count(g, m) for m in metrics])


def _signed(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:+.2f}".replace("-", "−")


def _difference(d: dict[str, Any]) -> str:
    if d["n"] == 0:
        return "no shared seed"
    if d["n"] == 1:
        return f"{_signed(d['mean'])} (1 seed: no interval)"
    noise = ", within noise" if d["within_noise"] else ""
    return f"{_signed(d['mean'])} [{_signed(d['low'])}, {_signed(d['high'])}] ({plural(d['n'], 'seed')}{noise})"


def paired_lines(groups: list[Group], metrics: list[str], baseline: str | None = None) -> list[str]:
    """The section of paired differences (paired_rows): variant minus baseline per metric, with its 95 % t interval."""
    chosen = choose_baseline(groups, baseline)
    key = baseline_key(chosen, baseline)
    by_group = defaultdict(dict)
    for r in paired_rows(groups, metrics, baseline):
        by_group[r["group"]][r["metric"]] = r
    strata = key is not None and len(chosen.values) > 1  # one baseline per value of the other keys
    to = f"{short_keys(list(chosen.values))[key]}={chosen.values[key]}" if strata else chosen.label
    lines = [
        f"## Paired differences to {to}",
        "",
        f"Per seed both ran: variant minus {to}"
        + (" (the group with the variant's other values)" if strata else "")
        + ", in points; mean over those seeds with a 95 % t interval. Within noise: the interval holds 0.",
        "",
    ]
    columns = [f"{metric_name(m)}: difference [95 % CI]" for m in metrics]

    def row(g: Group) -> list[str] | None:  # the baselines have none
        return [_difference(by_group[g.label][m]) for m in metrics] if g.label in by_group else None

    return [*lines, *group_table(groups, columns, row), ""]


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _ours(figure: dict[str, Any]) -> str:
    return _fmt(figure["ours_mean"]) + ("" if figure["n"] < 2 else f" ± {_fmt(figure['ours_std'])}")


def published_lines(groups: list[Group]) -> list[str]:
    """The section of published figures (published_rows) beside ours, or where they are for a dataset we did not run."""
    rows = published_rows(groups)
    table = published()
    if not rows:
        presets = {j.preset for g in groups for j in g.completed} & set(table["presets"])
        if not presets:
            return []
        datasets = sorted({d for p in presets for d in table["presets"][p] if d not in ("name", "source")})
        return [
            "## Published figures",
            "",
            f"None for these runs' dataset ({', '.join(sorted({j.dataset or '?' for g in groups for j in g.completed}))}); "
            f"the published ones are on {', '.join(datasets)}.",
            "",
        ]
    lines = [
        "## Published figures",
        "",
        "| variant | published as | dataset | 200-NN published | ours | difference | linear published | ours (best epoch) | difference | budget |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k, lin = r["knn200"], r["linear"]
        ours_knn = _ours(k) + (" (online)" if k["ours_metric"] == "val/knn_top1" else "")
        epochs = "/".join(map(str, r["epochs"])) or "?"
        budget = f"**budget differs**: {', '.join(r['differs'])}" if r["budget_differs"] else f"{epochs} epochs, as published"
        lines.append(
            f"| {r['group']} | {r['published_as']} | {r['dataset']} | {_fmt(k['published'])} | {ours_knn} | {_signed(k['difference'])} | "
            f"{_fmt(lin['published'])} | {_ours(lin)} | {_signed(lin['difference'])} | {budget} |"
        )
    lines.append("")
    if any(r["budget_differs"] for r in rows):
        lines += [
            "The budget differs from the published one: these differences measure the shorter (or longer) training, "
            "they do not say whether mcl reproduces the published figure.",
            "",
        ]
    for name in sorted({r["source"] for r in rows}):
        source = table["sources"][name]
        commit = f" (commit {source['commit']})" if source.get("commit") else ""
        epochs = f"{source['epochs']} epochs" + (" (assumed: not stated)" if source.get("epochs_assumed") else "")
        lines.append(f"- {name}: {source['what']}{commit}; {epochs}. {source['note'][0].upper()}{source['note'][1:]}.")
    lines += [
        "- ours: offline 200-NN (mcl.eval) where the runs have it, else the online kNN monitor (online); linear: protocol=lab, best test epoch.",
        "",
    ]
    return lines
