"""Process-wide setup done when `mcl` is imported (every CLI, test and notebook imports it first).

- OmegaConf resolvers used by conf/:
  `${mcl.run_dir:TASK,OVERRIDES}`, `${mcl.sweep_dir:TASK,OVERRIDES,STAMP}`: the run and sweep dir names (conf/hydra/default.yaml);
  `${mcl.run_name:TASK}`, `${mcl.run_group:TASK}`, `${mcl.run_tags:}`: the W&B run's name, group and tags (conf/logger/wandb.yaml);
  `${mcl.workers:N}`: N loader workers, at most one per CPU this process may use (conf/eval/);
  `${mcl.task_cpus:N}`: N + 1, the CPUs a SLURM task asks for, N loader workers and the training process (conf/hydra/launcher/slurm.yaml).
- Two Lightning messages that never apply to an mcl run are dropped, each by its exact text:
  the "💡 Tip" adverts for Lightning's cloud services, and the CSV logger's "Previous log files
  in this directory will be deleted" (the run dir always holds `.hydra/` and the resolved
  config; metrics.csv is the only file the CSV logger writes).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf


def find_conf_dir() -> str:
    """conf/: the copy inside the installed package (a wheel ships it as mcl/conf), else the checkout's top-level conf/."""
    here = os.path.dirname(os.path.abspath(__file__))
    packaged, checkout = os.path.join(here, "conf"), os.path.join(os.path.dirname(here), "conf")
    return packaged if os.path.isfile(os.path.join(packaged, "train.yaml")) else checkout


CONF_DIR = find_conf_dir()  # what every CLI, test and notebook composes
SWEEP_SYNTAX = ",()[]*"  # a value with these is a sweep or a list, not one dataset name
NAME_SKIPS = ("experiment", "sweep", "logger", "paths", "hydra", "callbacks")  # keys the run name leaves out
MAX_NAME = 128


def _key_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def run_dir_name(task_name: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """`task_name`, plus `_<dataset>` when the command line picks a dataset (`dataset=NAME`) that
    the task name does not already say: `experiment=paper_cifar10 dataset=digits` runs in
    outputs/paper_cifar10_digits/, never among the CIFAR-10 runs."""
    for key, value in map(_key_value, overrides):
        if key == "dataset" and value and not any(c in value for c in SWEEP_SYNTAX) and value not in task_name:
            return f"{task_name}_{value}"
    return task_name


def sweep_dir_name(task_name: str, overrides: list[str], stamp: str) -> str:
    """`<run_dir_name>/<stamp>` of a sweep, as its launcher resolved it first (from the sweep's own
    overrides: values swept over, like `dataset=a,b`, are not named). Its jobs, which resolve the dir
    again with their own task name and overrides, get the launcher's value back from the environment
    (inherited by the launchers' worker processes), so all the jobs of a sweep share one dir."""
    key = "MCL_SWEEP_DIR_" + "".join(c if c.isalnum() else "_" for c in stamp)
    return os.environ.setdefault(key, f"{run_dir_name(task_name, overrides)}/{stamp}")


def task_overrides() -> list[str]:
    """The command line's overrides of the running Hydra job; [] outside one (compose, scripts)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return [str(o) for o in HydraConfig.get().overrides.task]
    except ValueError:  # HydraConfig was not set
        return []


def run_name(task_name: str, overrides: list[str] | None = None, sweep: str | None = None) -> str:
    """W&B run name: the run dir name and the overrides that tell runs apart (`paper_cifar10_digits seed=1
    mining.negative=all`; in a sweep, the ones it varies), at most 128 characters."""
    overrides = task_overrides() if overrides is None else overrides
    name = run_dir_name(task_name, overrides)
    sweep = sweep_dir() if sweep is None else sweep
    if sweep:
        overrides = sweep_job_overrides(overrides, sweep)
    said = {"dataset"} if name != task_name else set()
    kept = [o.lstrip("+") for o in overrides if _key_value(o)[0].split(".")[0] not in (*NAME_SKIPS, *said)]
    full = " ".join([name, *kept])
    return full if len(full) <= MAX_NAME else full[: MAX_NAME - 3] + "..."


def sweep_dir() -> str | None:
    """The running job's sweep dir (hydra.sweep.dir) when it is a job of a multirun; None for a single run or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # HydraConfig was not set
        return None
    return str(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None


def swept_keys(sweep: str) -> set[str] | None:
    """The keys a sweep varies (`seed=1,2 mining.negative=all,gradient` -> seed, mining.negative; with the
    sweeper's params of conf/sweep/), read from the multirun.yaml its launcher wrote; None when there is none."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = os.path.join(sweep, "multirun.yaml")
    if not os.path.isfile(path):
        return None
    cfg = OmegaConf.load(path)
    params = dict(OmegaConf.select(cfg, "hydra.sweeper.params") or {})
    parsed = OverridesParser.create().parse_overrides(
        [*(f"{k}={v}" for k, v in params.items()), *OmegaConf.select(cfg, "hydra.overrides.task")]
    )
    return {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


def sweep_job_overrides(overrides: list[str], sweep: str) -> list[str]:
    """The overrides of a sweep's job that its sweep varies (all of them when the sweep's keys are unknown)."""
    keys = swept_keys(sweep)
    return overrides if keys is None else [o for o in overrides if _key_value(o)[0] in keys]


def run_group(task_name: str, overrides: list[str] | None = None, sweep: str | None = None) -> str | None:
    """W&B group of a sweep's job: its run name without the seed (`train_digits mining.negative=all`), so a
    dashboard grouped by it shows each variant's mean and spread over seeds; None for a single run."""
    sweep = sweep_dir() if sweep is None else sweep
    if not sweep:
        return None
    overrides = task_overrides() if overrides is None else overrides
    return run_name(task_name, [o for o in overrides if _key_value(o)[0] not in ("seed", "data.seed")], sweep)


def run_tags(sweep: str | None = None) -> list[str]:
    """W&B tags of a sweep's job: the sweep's dir as `<task>/<date_time>` (its last two parts; W&B takes at most
    64 characters a tag), which tells two sweeps of the same variants apart; [] for a single run."""
    sweep = sweep_dir() if sweep is None else sweep
    if not sweep:
        return []
    return ["/".join(os.path.normpath(sweep).split(os.sep)[-2:])[-64:]]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def workers(limit: int | str) -> int:
    """min(limit, available CPUs): loader worker processes beyond the cores only compete for them."""
    return max(1, min(int(limit), available_cpus()))


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that are a user's mistake, raised in mcl's own words before (or instead of) training: a config,
    data, checkpoint or evaluation setting that cannot work, a diverged run, and Hydra's own config errors."""
    from hydra.errors import CompactHydraException

    from mcl.data.sources import DatasetError
    from mcl.eval.common import EvalError
    from mcl.reliability import CheckpointError, NonFiniteError
    from mcl.train import ConfigError

    return ConfigError, CheckpointError, DatasetError, EvalError, NonFiniteError, CompactHydraException


def run_cli(main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` CLI: a user's mistake (`user_errors`) prints one message, `Type: what is wrong and
    the fix`, and exits with status 1, without a traceback; any other error shows its full traceback. With
    HYDRA_FULL_ERROR=1 set by the user, every error shows Hydra's full traceback."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1" and not os.environ.get("MCL_CLI_ERRORS"):
        main()
        return
    # Hydra then re-raises the job's error instead of printing its traceback; processes this one starts (DDP, launchers) inherit both
    os.environ.update(HYDRA_FULL_ERROR="1", MCL_CLI_ERRORS="1")
    stderr, sys.stderr = sys.stderr, _WithoutHydraJobLine(sys.stderr)  # Hydra's line before the error: ours follows
    try:
        main()
    except user_errors() as err:
        cause = f"\n{err.__cause__}" if type(err).__module__.startswith("hydra") and err.__cause__ is not None else ""
        sys.stderr = stderr
        sys.exit(f"{type(err).__name__}: {err}{cause}")
    finally:
        sys.stderr = stderr


class _WithoutHydraJobLine:
    """sys.stderr without the `Error executing job with overrides: [...]` line Hydra writes above a job's error."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        return len(text) if text.startswith("Error executing job with overrides:") else self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def register() -> None:
    """Idempotent: the resolvers and the two message filters."""
    OmegaConf.register_new_resolver("mcl.run_dir", lambda task, overrides=(): run_dir_name(task, list(overrides or [])), replace=True)
    OmegaConf.register_new_resolver(
        "mcl.sweep_dir", lambda task, overrides, stamp: sweep_dir_name(task, list(overrides or []), stamp), replace=True
    )
    OmegaConf.register_new_resolver("mcl.run_name", lambda task: run_name(task), replace=True)
    OmegaConf.register_new_resolver("mcl.run_group", lambda task: run_group(task), replace=True)
    OmegaConf.register_new_resolver("mcl.run_tags", lambda: run_tags(), replace=True)
    OmegaConf.register_new_resolver("mcl.workers", workers, replace=True)
    OmegaConf.register_new_resolver("mcl.task_cpus", lambda num_workers: int(num_workers) + 1, replace=True)
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty\. Previous log files")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())
