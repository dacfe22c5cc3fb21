"""Grouping runs: the jobs that share their swept values form a group (over seeds), and the setting
every table and plot states about the runs compared (dataset, budget, what varies, fixed overrides)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mcl.report.runs import Job, override_key

DEFAULT = "default"  # the value of a key a separate run left as its config has it, while another run sets it


@dataclass
class Group:
    """The jobs that share the swept values `values` (key -> value), over seeds. name: a label given
    by the user (`--labels`), shown instead of the values."""

    values: dict[str, str]
    jobs: list[Job]
    name: str | None = None

    @property
    def label(self) -> str:
        """For legends and axes: the user's name, else `negative=gradient, temperature=0.1` (the last part of each key)."""
        if self.name:
            return self.name
        short = short_keys(list(self.values))
        return ", ".join(f"{short[k]}={v}" for k, v in self.values.items()) or "all runs"

    @property
    def auto_label(self) -> str:
        return Group(self.values, self.jobs).label

    @property
    def completed(self) -> list[Job]:
        return [j for j in self.jobs if j.status == "completed"]

    def stats(self, metric: str) -> tuple[float, float, int]:
        """Mean, sample std (nan for one run) and count of the completed runs' final values."""
        values = [j.final[metric] for j in self.completed if metric in j.final]
        if not values:
            return math.nan, math.nan, 0
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan, len(values)


def short_keys(keys: list[str]) -> dict[str, str]:
    """Each override key by its last dotted part, or the whole key where two would read the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def swept_keys(jobs: list[Job], average_over: tuple[str, ...] = ("seed",)) -> list[str]:
    """Override keys whose value differs between jobs, in the order they were given."""
    keys: list[str] = []
    for job in jobs:
        for key in map(override_key, job.overrides):
            if key not in keys and key not in average_over:
                keys.append(key)
    return [k for k in keys if len({j.value(k) for j in jobs}) > 1]


def group_jobs(jobs: list[Job], average_over: tuple[str, ...] = ("seed",), labels: dict[str, str] | None = None) -> list[Group]:
    """Jobs grouped by their swept values, groups in launch order; `labels`: automatic label -> the name to show."""
    keys = swept_keys(jobs, average_over)
    groups: dict[tuple, Group] = {}
    for job in jobs:
        values = {k: job.value(k, DEFAULT) for k in keys}
        groups.setdefault(tuple(values.values()), Group(values, [])).jobs.append(job)
    labels = labels or {}
    unknown = set(labels) - {g.label for g in groups.values()}
    if unknown:
        raise ValueError(f"--labels names no group: {sorted(unknown)}; the groups are {[g.label for g in groups.values()]}")
    for g in groups.values():
        g.name = labels.get(g.label)
    return list(groups.values())


def plural(n: int, word: str) -> str:
    """`1 job`, `2 jobs`."""
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass
class Setting:
    """What every table and plot states about the runs compared: dataset, budget, what varies, fixed overrides."""

    datasets: list[str]
    epochs: list[int]
    fixed: list[str]  # overrides every job shares (the averaged-over keys left out)
    average_over: tuple[str, ...]
    varying: list[str] = field(default_factory=list)  # the override keys that define the groups
    seeds: tuple[int, int] = (0, 0)  # the fewest and the most completed runs of a group
    title: str | None = None  # the user's (--title): replaces the words below in every heading

    @property
    def headline(self) -> str:
        """`digits, 200 epochs` (several: `cifar10/digits, 2-200 epochs`)."""
        data = "/".join(self.datasets) or "dataset unknown"
        if not self.epochs:
            return data
        lo, hi = min(self.epochs), max(self.epochs)
        return f"{data}, {lo if lo == hi else f'{lo}-{hi}'} epoch{'' if hi == 1 else 's'}"

    @property
    def words(self) -> str:
        """The figures' title: `digits, 3 epochs; varies: negative x positive; 3 seeds per variant` (or the user's)."""
        if self.title:
            return self.title
        varies = "varies: " + " x ".join(short_keys(self.varying).values()) if self.varying else "one setting"
        lo, hi = self.seeds
        seeds = "" if not hi else f"; {plural(hi, 'run') if lo == hi else f'{lo}-{hi} runs'} per variant"
        return f"{self.headline}; {varies}{seeds}"


def setting_of(jobs: list[Job], average_over: tuple[str, ...] = ("seed",), title: str | None = None) -> Setting:
    ran = [j for j in jobs if j.status != "not started"] or jobs
    varying = set(swept_keys(jobs, average_over=()))
    fixed = [o for o in ran[0].overrides if override_key(o) not in varying and override_key(o) not in average_over]
    fixed = [o for o in fixed if all(o in j.overrides for j in jobs)]
    groups = group_jobs(jobs, average_over)
    return Setting(
        datasets=sorted({j.dataset for j in ran if j.dataset}),
        epochs=sorted({j.max_epochs for j in ran if j.max_epochs is not None}),
        fixed=fixed,
        average_over=average_over,
        varying=swept_keys(jobs, average_over),
        seeds=(min((len(g.completed) for g in groups), default=0), max((len(g.completed) for g in groups), default=0)),
        title=title,
    )
