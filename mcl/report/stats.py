"""The numbers of the report: mean ± std at one precision per metric, and paired differences to a
baseline group over the seeds both ran, with a 95 % Student t interval (the t quantile in closed form)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mcl.report.groups import Group
from mcl.report.metrics import is_share, shown


def decimals(metric: str, means: list[float]) -> int:
    """One precision for a metric's means and stds: 2 decimals for percentages, else 3 significant digits of the largest mean."""
    if is_share(metric):
        return 2
    biggest = max((abs(shown(metric, m)) for m in means if not math.isnan(m)), default=0.0)
    return 0 if biggest == 0 else int(min(6, max(0, 2 - math.floor(math.log10(biggest)))))


def mean_std(metric: str, mean: float, std: float, places: int) -> str:
    """A table cell: `61.25 ± 7.07` in shown units at `places` decimals, the mean alone for one run, `-` for none."""
    if math.isnan(mean):
        return "-"
    mean, std = shown(metric, mean), shown(metric, std)
    return f"{mean:.{places}f}" if math.isnan(std) else f"{mean:.{places}f} ± {std:.{places}f}"


T_MASS = 0.95  # the paired intervals' coverage


def t_central_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with an integer df >= 1, in closed form (Abramowitz & Stegun 26.7.3-4):
    theta = atan(t / sqrt(df)); odd df: (2/pi)(theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)),
    even df: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), the sums running to cos^(df-3) and cos^(df-2)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    term = total = 1.0
    if df % 2:
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(mass: float, df: int) -> float:
    """The t with P(|T| <= t) = mass (the two-sided quantile: 4.303 for 95 % and df 2), by bisection."""
    lo, hi = 0.0, 1.0
    while t_central_mass(hi, df) < mass:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central_mass(mid, df) < mass else (lo, mid)
    return (lo + hi) / 2


def paired_difference(variant: Group, baseline: Group, metric: str) -> dict[str, Any]:
    """Mean over the shared seeds of (variant - baseline) (shown units: points for percentages) with a
    95 % t interval: mean ± t(0.975, n-1) * sd / sqrt(n), sd the sample std of the n paired differences.
    within_noise: the interval holds 0 (None below two shared seeds: no interval)."""
    base = {j.seed: j.final[metric] for j in baseline.completed if metric in j.final and j.seed is not None}
    ours = {j.seed: j.final[metric] for j in variant.completed if metric in j.final and j.seed is not None}
    seeds = sorted(base.keys() & ours.keys())
    diffs = [shown(metric, ours[s]) - shown(metric, base[s]) for s in seeds]
    out: dict[str, Any] = {"seeds": seeds, "n": len(diffs), "mean": float(np.mean(diffs)) if diffs else math.nan}
    out |= {"low": math.nan, "high": math.nan, "within_noise": None}
    if len(diffs) > 1:
        half = t_quantile(T_MASS, len(diffs) - 1) * float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs))
        out |= {"low": out["mean"] - half, "high": out["mean"] + half, "within_noise": out["mean"] - half <= 0 <= out["mean"] + half}
    return out


def choose_baseline(groups: list[Group], baseline: str | None = None) -> Group:
    """The group named `baseline` (its label, a value, or `key=value`), else the one with a value `moco_v2`, else the first."""
    if baseline is not None:
        for g in groups:
            if baseline in (g.label, g.auto_label, *g.values.values(), *(f"{k}={v}" for k, v in g.values.items())):
                return g
        raise ValueError(f"--baseline {baseline} names no group; the groups are {[g.label for g in groups]}")
    return next((g for g in groups if "moco_v2" in g.values.values()), groups[0])


def baseline_key(chosen: Group, baseline: str | None) -> str | None:
    """The override key whose value made `chosen` the baseline (`experiment` for moco_v2), None for a label or the first group."""
    wanted = "moco_v2" if baseline is None else baseline.rpartition("=")[2]
    for k, v in chosen.values.items():
        if v == wanted and (baseline is None or baseline in (v, f"{k}={v}")):
            return k
    return None


def paired_rows(groups: list[Group], metrics: list[str], baseline: str | None = None) -> list[dict[str, Any]]:
    """Each group's paired difference (paired_difference) to its baseline, per metric.

    Where the baseline is a value of one swept key (`experiment=moco_v2`), a group is paired with the
    group that has that value and the group's own other values (a sweep over presets x datasets pairs
    on each dataset); groups with the baseline value are the baselines. Else every group is paired
    with the one baseline group."""
    chosen = choose_baseline(groups, baseline)
    key = baseline_key(chosen, baseline)
    rows = []
    for g in groups:
        if key is None:
            base = chosen if g is not chosen else None
        else:
            wanted = {**g.values, key: chosen.values[key]}
            base = next((b for b in groups if b.values == wanted), None) if g.values[key] != chosen.values[key] else None
        if base is None:
            continue
        rows += [{"group": g.label, "baseline": base.label, "metric": m, **paired_difference(g, base, m)} for m in metrics]
    return rows
