"""`python -m mcl.report DIR [DIR ...]`: one table and three plots from sweeps and runs.

DIR is a Hydra sweep (`python -m mcl.train -m ...`: multirun/<task>/<date_time>), a single run
dir (outputs/<task>/<date_time>) or a folder of them (outputs/<task>, outputs/); several DIRs
are compared as one set of runs. Every run leaves `.hydra/overrides.yaml` (what it changed),
`metrics.csv` (csv logger), its config and `job.json`, written by `mcl.records.JobStatusFile` (a
Hydra callback, conf/hydra/default.yaml) when it starts and ends: status running / completed /
failed, and the error of a failed job.

The report groups the completed runs by the swept values (every override that differs between
runs, except the ones averaged over: `seed`; a run without an override another run sets reads
`default`), and writes into the one DIR given (with several: reports/<date_time>, or `--out`):
- `report.md`: the dataset, budget and what varies; mean ± sample std over seeds of the final
  monitors and of the offline evaluations beside each job's last checkpoint (`mcl.eval.sweep`:
  200-NN, linear final and best test epoch), one precision per metric, shares in percent; the
  published figure (mcl/published.yaml) and our difference for a preset and dataset that has
  one, saying when the budget differs; each variant's paired difference to the baseline group
  over the seeds both ran, with a 95 % t interval; the final `mining/*` diagnostics, the counts
  apart; the jobs that failed, are unfinished or never started;
- `report.json`: the same numbers as logged (shares in [0, 1]), for scripts and notebooks;
- `accuracy`, `knn_over_epochs`, `diagnostics` as .png, .svg and .pdf: final accuracy per group
  (mean ± std, every run a dot, the axis spanning the values), kNN top-1 per epoch (mean and std
  band), each `mining/*` metric per epoch; titled in words (dataset, budget, what varies; or
  `--title`), legends outside the axes, epochs counted from 1 (after the first). A metric's value
  at an epoch is the mean of what was logged in that epoch; its final value is the one of the last epoch.

The package, a module a part: `runs` (reading runs, sweeps and
offline evaluations back), `groups` (groups over seeds, the setting), `metrics` (names, units, which are
shown), `stats` (mean ± std, paired t intervals), `publications` (mcl/published.yaml beside ours),
`tables` (markdown tables), `plots` (the figures), `write` (report.md, report.json), `cli` (the options).
"""

from mcl.report.cli import main
from mcl.report.groups import Group, Setting, group_jobs, setting_of, swept_keys
from mcl.report.plots import figures
from mcl.report.publications import published, published_rows
from mcl.report.runs import Job, expand_grid, expected_jobs, load_runs
from mcl.report.stats import choose_baseline, paired_difference, paired_rows, t_quantile
from mcl.report.write import markdown, summary, write_report

__all__ = [
    "Group",
    "Job",
    "Setting",
    "choose_baseline",
    "expand_grid",
    "expected_jobs",
    "figures",
    "group_jobs",
    "load_runs",
    "main",
    "markdown",
    "paired_difference",
    "paired_rows",
    "published",
    "published_rows",
    "setting_of",
    "summary",
    "swept_keys",
    "t_quantile",
    "write_report",
]
