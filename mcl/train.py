"""`python -m mcl.train [overrides]`: compose the config, check it, pre-train, print a summary."""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from mcl import runtime
from mcl.data.datamodule import ContrastiveDataModule
from mcl.eval.common import EvalError, find_run_config
from mcl.module import MCLModule
from mcl.records import training_started
from mcl.reliability import RunConfig, resume_checkpoint
from mcl.runtime import task_overrides

CONF_DIR = runtime.CONF_DIR  # conf/: the packaged copy, or the checkout's


class ConfigError(ValueError):
    """A configuration that cannot train; raised before training starts."""


def plain(node: Any) -> Any:
    """Resolved plain containers: what checkpoints and hyper-parameters may hold."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def callback_targets(cfg: DictConfig) -> list[str]:
    """The `_target_` of every configured callback."""
    return [str(c.get("_target_", "")) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def check_config(cfg: DictConfig, world_size: int) -> None:
    """Reject configurations that would fail or silently misbehave later."""
    for side in ("positive", "negative"):
        node = cfg.mining.get(side)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(
                f"mining.{side} must select a strategy file from conf/mining.{side}/ (e.g. mining.{side}=...), "
                f"got {node!r}; set knobs with mining.{side}.<knob>=value"
            )
        for knob in node:
            check_strategy_knob(side, node, str(knob))
    if cfg.model.candidates == "batch":
        if any(t.endswith("MiningPanel") for t in callback_targets(cfg)):
            raise ConfigError(
                "callbacks.mining_panel draws the bank's neighbours, and model.candidates=batch has no bank: "
                "remove it with ~callbacks.mining_panel (experiment=simclr does)"
            )
        for side in ("positive", "negative"):
            if not cfg.mining[side].get("exclude_self", True):
                raise ConfigError(
                    f"model.candidates=batch contrasts each query with its own two views too: "
                    f"mining.{side}.exclude_self must stay true, got false"
                )
    if cfg.model.candidates == "neighbours":
        check_neighbours(cfg)
    check_composition(cfg)
    keys_per_step = cfg.data.batch_size * world_size
    if cfg.model.candidates != "batch" and cfg.model.queue_size % keys_per_step:
        raise ConfigError(
            f"model.queue_size={cfg.model.queue_size} must be a multiple of the keys enqueued per step, one key an image: "
            f"data.batch_size={cfg.data.batch_size} x {world_size} device(s) = {keys_per_step}"
        )
    check_mining_candidates(cfg, world_size)
    check_batchnorm(cfg)
    warn_idle_shuffle_bn(cfg, world_size)
    check_ranges(cfg)
    check_resume_and_callbacks(cfg)


def check_mining_candidates(cfg: DictConfig, world_size: int) -> None:
    """Each strategy's knobs can run on the candidates a query gets (the bank, or the global batch's two views):
    ConfigError naming the knob first, then where the count of candidates comes from."""
    if cfg.model.candidates == "batch":
        count = 2 * cfg.data.batch_size * world_size
        source = f"model.candidates=batch: 2 views x data.batch_size={cfg.data.batch_size} x {world_size} device(s)"
    else:
        count, source = cfg.model.queue_size, f"the memory bank: model.queue_size={cfg.model.queue_size}"
    for side in ("positive", "negative"):
        strategy = hydra.utils.instantiate(cfg.mining[side])
        try:
            getattr(strategy, "validate", lambda n: None)(count)
        except ValueError as err:
            raise ConfigError(f"{err} [{count} candidates a query, from {source}]") from None


def check_batchnorm(cfg: DictConfig) -> None:
    """SplitBatchNorm needs whole groups; SyncBN would undo both SplitBatchNorm and ShuffleBN."""
    splits = cfg.model.bn_splits
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ConfigError(f"model.bn_splits must be a positive integer (1: ordinary batch norm), got {splits!r}")
    if cfg.data.batch_size % splits:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (per device) must be a multiple of model.bn_splits={splits}: "
            f"every backbone batch norm normalises {splits} equal groups; set model.bn_splits to a divisor of the batch size"
        )
    if cfg.trainer.get("sync_batchnorm") and (splits > 1 or cfg.model.shuffle_bn):
        raise ConfigError(
            "trainer.sync_batchnorm=true normalises the global batch at once, which undoes model.bn_splits and model.shuffle_bn "
            "(MoCo uses no SyncBN): set trainer.sync_batchnorm=false, or model.bn_splits=1 model.shuffle_bn=false"
        )


def warn_idle_shuffle_bn(cfg: DictConfig, world_size: int) -> None:
    """A warning, once before training, when model.shuffle_bn=true cannot change anything: with bn_splits=1 on one
    device every key is normalised in one batch-norm batch, and a permutation of that batch changes no statistic."""
    if cfg.model.shuffle_bn and cfg.model.bn_splits == 1 and world_size == 1:
        rank_zero_warn(
            "mcl: model.shuffle_bn=true changes nothing in this run: with model.bn_splits=1 on one device all keys share "
            "one batch-norm batch, and shuffling it changes no statistic. Set model.bn_splits=8 (the lab's SplitBatchNorm) "
            "to normalise groups apart, or model.shuffle_bn=false to say that none is wanted."
        )


def check_neighbours(cfg: DictConfig) -> None:
    """model.candidates=neighbours: its rule picks positives and negatives, and there is no mining to draw."""
    chosen = {side: str(cfg.mining[side]._target_).rsplit(".", 1)[-1] for side in ("positive", "negative")}
    if chosen != {"positive": "NoPositives", "negative": "AllNegatives"}:
        raise ConfigError(
            f"model.candidates=neighbours takes its positives and negatives from model.neighbours.rule "
            f"({cfg.model.neighbours.rule}); the mining strategies run on the MoCo bank only: set "
            f"mining.positive=none mining.negative=all (got {chosen['positive']}, {chosen['negative']}), "
            f"or model.candidates=bank to mine inside MoCo"
        )
    if any(t.endswith("MiningPanel") for t in callback_targets(cfg)):
        raise ConfigError(
            "callbacks.mining_panel draws what the mining strategies pick, and model.candidates=neighbours "
            "replaces them: remove it with ~callbacks.mining_panel (experiment=nnclr and snclr do)"
        )


def check_composition(cfg: DictConfig) -> None:
    """Objective x candidates x mining x views: refuse the combinations that cannot mean anything."""
    m, target = cfg.model, {side: str(cfg.mining[side]._target_).rsplit(".", 1)[-1] for side in ("positive", "negative")}
    if m.objective == "regression" and m.candidates != "bank":
        raise ConfigError(
            f"model.objective=regression regresses the prediction onto EMA keys and bank entries, and model.candidates={m.candidates} "
            f"has {'no bank' if m.candidates == 'batch' else 'its own loss (model.neighbours)'}: set model.candidates=bank"
        )
    if m.objective == "regression" and target["negative"] != "AllNegatives":
        raise ConfigError(
            f"model.objective=regression has no negatives, so mining.negative={cfg.mining.negative._target_} would change nothing: "
            f"set mining.negative=all, or model.objective=infonce to mine negatives"
        )
    if target["positive"] == "RelationalPositives" and target["negative"] == "DebiasedNegatives":
        raise ConfigError(
            "relational positives (mining.positive=sce / ressl) spread their targets over every kept bank entry, so a debiased "
            "estimate of the negatives' mass (mining.negative=hard / debiased) has no negatives to estimate: choose mining.negative="
            "all, gradient, ring or fn_elimination"
        )
    if bool(m.aux_view) != (cfg.data.extra_view is not None):
        raise ConfigError(
            f"model.aux_view={m.aux_view} and data.extra_view={cfg.data.extra_view} go together: the auxiliary view is the data's "
            "third view (experiment=cmsf sets model.aux_view=true data.extra_view=weak)"
        )
    if m.aux_view and (m.candidates != "bank" or target["positive"] in ("NoPositives", "RelationalPositives")):
        raise ConfigError(
            f"model.aux_view=true picks a second set of bank neighbours through the third view, which needs model.candidates=bank "
            f"(got {m.candidates}) and a neighbour rule for mining.positive (nn, soft, hard, soft_hard, msf; got {target['positive']})"
        )


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return value


def check_ranges(cfg: DictConfig) -> None:
    """Numbers outside the range where training means anything."""
    for name in ("optim.lr", "model.temperature", "monitor.knn_t", "monitor.linear_lr"):
        if not _number(name, OmegaConf.select(cfg, name)) > 0:
            raise ConfigError(f"{name} must be > 0, got {OmegaConf.select(cfg, name)}")
    for name in ("optim.weight_decay", "optim.warmup_epochs", "optim.momentum", "data.num_workers"):
        if _number(name, OmegaConf.select(cfg, name)) < 0:
            raise ConfigError(f"{name} must be >= 0, got {OmegaConf.select(cfg, name)}")
    if not 0 <= _number("model.momentum", cfg.model.momentum) < 1:
        raise ConfigError(
            f"model.momentum (EMA of the key encoder) must lie in [0, 1), got {cfg.model.momentum}; 1 freezes the key encoder"
        )
    calls = cfg.model.ema_calls
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 1:
        raise ConfigError(f"model.ema_calls (EMA moves per optimizer step) must be a positive integer, got {calls!r}")
    if cfg.model.momentum_schedule not in ("const", "cosine"):
        raise ConfigError(f"model.momentum_schedule must be 'const' or 'cosine', got {cfg.model.momentum_schedule!r}")
    if _number("monitor.knn_k", cfg.monitor.knn_k) < 1:
        raise ConfigError(f"monitor.knn_k must be >= 1, got {cfg.monitor.knn_k}")


def check_resume_and_callbacks(cfg: DictConfig) -> None:
    """Resuming needs checkpoints, and one source of them."""
    targets = callback_targets(cfg)
    if cfg.ckpt_path is not None and cfg.auto_resume:
        raise ConfigError(f"set either ckpt_path (got {cfg.ckpt_path}) or auto_resume=true, not both")
    if cfg.auto_resume and not any(t.endswith("ModelCheckpoint") for t in targets):
        raise ConfigError("auto_resume=true resumes from this run's checkpoints, but no callback writes any: use callbacks=default")


def strategy_knobs(node: DictConfig) -> list[str]:
    """The knobs a mining strategy takes: its class's keyword arguments (every one in its conf/ file)."""
    params = inspect.signature(hydra.utils.get_class(node._target_)).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def file_keys(path: Path) -> set[str]:
    """The keys a group file sets, itself or through the sibling files in its defaults list."""
    node = OmegaConf.load(path)
    parents = [d for d in node.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return set(map(str, node)).union(*(file_keys(path.with_name(f"{d}.yaml")) for d in parents))


def check_strategy_knob(side: str, node: DictConfig, knob: str) -> None:
    """`knob` is one of mining.<side>'s knobs, or ConfigError listing them, the closest one and the strategies that have it."""
    knobs = strategy_knobs(node)
    if knob in knobs or knob.startswith("_"):  # _target_ and Hydra's other instantiate keys
        return
    close = difflib.get_close_matches(knob, knobs, n=1)
    owners = [f.stem for f in sorted(Path(CONF_DIR, f"mining.{side}").glob("*.yaml")) if knob in file_keys(f)]
    raise ConfigError(
        f"mining.{side} ({node._target_.rsplit('.', 1)[-1]}) has no knob '{knob}'"
        + (f": did you mean mining.{side}.{close[0]}?" if close else ".")
        + (f" Its knobs: {', '.join(knobs)}." if knobs else " It takes no knobs.")
        + (f" '{knob}' is a knob of mining.{side}={'|'.join(owners)}." if owners else f" Strategies: conf/mining.{side}/.")
    )


KNOB_OVERRIDE = re.compile(r"(mining\.(positive|negative))\.(\w+)=")


def check_knob_overrides(args: list[str]) -> None:
    """Command-line `mining.<side>.<knob>=value` for a knob the selected strategy lacks: ConfigError listing
    its knobs, before Hydra would advise `+mining.<side>.<knob>` (an argument the strategy does not take)."""
    knobs = [m for m in map(KNOB_OVERRIDE.match, args) if m]
    if not knobs:
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    base = []  # the other overrides, a sweep's first value standing for it
    for o in OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith(("-", "hydra"))]):
        if not KNOB_OVERRIDE.match(o.input_line or ""):
            value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
            base.append(f"{o.get_key_element()}={value}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=base)
    for m in knobs:
        side = m.group(2)
        check_strategy_knob(side, cfg.mining[side], m.group(3))


def wandb_offline_unless_logged_in(cfg: DictConfig) -> None:
    """W&B never prompts. logger.wandb.mode null: the WANDB_MODE the user set, else online with an API key
    (WANDB_API_KEY or `wandb login`) and offline without one (upload later with `wandb sync`). Decided for every
    job and passed to the logger itself: W&B reads its environment once a process, so a sweep's later jobs would
    not see a variable set for the first."""
    if "wandb" not in (cfg.get("logger") or {}) or cfg.logger.wandb.mode:
        return
    if os.environ.get("WANDB_MODE"):
        cfg.logger.wandb.mode = os.environ["WANDB_MODE"]
        return
    import wandb

    if os.environ.get("WANDB_API_KEY") or wandb.login(prompt=False, verify=False):
        cfg.logger.wandb.mode = "online"
    else:
        print("mcl: no W&B API key configured; logging offline to the run directory (upload with `wandb sync`).")
        cfg.logger.wandb.mode = "offline"


def check_accelerator(trainer: DictConfig) -> None:
    """The trainer's accelerator is on this machine, and SyncBatchNorm gets GPUs: Lightning would fail with
    no hint (SyncBatchNorm only once its DDP processes run)."""
    has_cuda, has_mps = CUDAAccelerator.is_available(), MPSAccelerator.is_available()
    accelerator, ddp = str(trainer.get("accelerator", "auto")), "ddp" in str(trainer.get("strategy", ""))
    on_cpu = "trainer=ddp_cpu (DDP over CPU processes)" if ddp else "trainer=cpu"
    found = {"gpu": has_cuda or has_mps, "cuda": has_cuda, "mps": has_mps}.get(accelerator, True)
    if not found:
        raise ConfigError(
            f"trainer.accelerator={accelerator}, but torch finds no such device on this machine: use {on_cpu}, or run on a GPU node"
        )
    devices = trainer.get("devices")
    if has_cuda and accelerator in ("gpu", "cuda") and isinstance(devices, int) and devices > CUDAAccelerator.auto_device_count():
        count = CUDAAccelerator.auto_device_count()
        raise ConfigError(
            f"trainer.devices={devices}, but this machine has {count} GPU(s): set trainer.devices={count} (or -1: all of them)"
        )
    if trainer.get("sync_batchnorm") and (accelerator == "cpu" or (accelerator == "auto" and not (has_cuda or has_mps))):
        raise ConfigError(
            "trainer.sync_batchnorm=true needs GPUs (SyncBatchNorm does not run on CPU) and this run is on CPU: "
            "use trainer=ddp_cpu for DDP over CPU processes (or trainer.sync_batchnorm=false)"
        )


def instantiate_dict(node: DictConfig | None) -> list:
    return [hydra.utils.instantiate(v) for v in (node or {}).values() if v is not None]


@contextmanager
def own_errors():
    """Hydra wraps an error raised while building a `_target_`; a check's ValueError (ConfigError,
    DatasetError, ...) is re-raised as it is, so the user reads the check's own message. A plain ValueError
    of a check in a constructor (`backbone.width`, `data.key_view`, Lightning's `trainer.precision`) is a
    setting that cannot work: a ConfigError with its message (the CLI prints it without a traceback)."""
    try:
        yield
    except InstantiationException as err:
        cause = err.__cause__
        if not isinstance(cause, ValueError):
            raise
        if is_mcl_error(cause):
            raise cause from None
        raise ConfigError(str(cause)) from cause
    except ValueError as err:
        if is_mcl_error(err):
            raise
        raise ConfigError(str(err)) from err


def is_mcl_error(err: Exception) -> bool:
    """One of mcl's own errors (ConfigError, DatasetError, CheckpointError, ...): raised by a check, in mcl's words."""
    return type(err).__module__.startswith("mcl.")


def trains_on_cuda(trainer: DictConfig) -> bool:
    """Whether Lightning puts this trainer config on CUDA GPUs (its accelerator=auto does when torch finds one)."""
    return str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and CUDAAccelerator.is_available()


def build_module(cfg: DictConfig, num_classes: int) -> MCLModule:
    """The LightningModule of a composed config (benchmarks build it without data); model.channels_last=auto: on CUDA."""
    parts = {k: plain(cfg[k]) for k in ("backbone", "model", "mining", "optim", "monitor")}
    channels_last = parts["model"]["channels_last"]
    if channels_last not in (True, False, "auto"):
        raise ConfigError(f"model.channels_last must be true, false or auto, got {channels_last!r}")
    if channels_last == "auto":
        parts["model"]["channels_last"] = trains_on_cuda(cfg.trainer)
    return MCLModule(**parts, num_classes=num_classes)


@own_errors()
def build(cfg: DictConfig) -> tuple[ContrastiveDataModule, MCLModule, L.Trainer]:
    """The three Lightning pieces, with the data loaded and every check done."""
    if cfg.seed is not None:
        L.seed_everything(cfg.seed, workers=True)
    wandb_offline_unless_logged_in(cfg)
    check_accelerator(cfg.trainer)
    run_config = RunConfig()  # the resolved config rides in every checkpoint
    bar = cfg.trainer.get("enable_progress_bar", True)  # false: no bar, callbacks.progress_bar included
    callbacks = [c for c in instantiate_dict(cfg.get("callbacks")) if bar or not isinstance(c, ProgressBar)] + [run_config]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=instantiate_dict(cfg.get("logger")) or False, callbacks=callbacks)
    if trainer.fast_dev_run:  # Lightning skips checkpoints under fast_dev_run, except save_last's at the end of training
        for checkpoint in trainer.checkpoint_callbacks:
            checkpoint.save_last = False
    check_config(cfg, trainer.world_size)
    datamodule = ContrastiveDataModule(dataset=plain(cfg.dataset), **plain(cfg.data))
    datamodule.trainer = trainer
    datamodule.setup("fit")
    model = build_module(cfg, datamodule.num_classes)
    # the "auto" speed settings as resolved for this machine: what config_resolved.yaml, loggers and checkpoints record
    cfg.data.batched_augment, cfg.data.images_on_device = datamodule.batched_augment, datamodule.images_on_device
    cfg.model.channels_last = model.cfg_model["channels_last"]
    run_config.config = plain(cfg)
    if cfg.auto_resume:  # resolved once here (every DDP process finds the same file); recorded in config_resolved.yaml
        cfg.ckpt_path, cfg.auto_resume = resume_checkpoint(cfg, model, trainer), False
    elif cfg.ckpt_path is not None:
        resume_checkpoint(cfg, model, trainer)  # readable, of this architecture and of the same run, before training starts
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Pre-train; returns the summary (also printed): output dir, final monitors and what scored them, checkpoints."""
    datamodule, model, trainer = build(cfg)
    out = Path(cfg.paths.output_dir)
    if trainer.is_global_zero and not trainer.fast_dev_run:  # config_resolved.yaml (an earlier run's records kept: mcl.records)
        training_started(out, cfg, task_overrides())
    for logger in trainer.loggers:  # the whole resolved config (W&B run config, hparams.yaml), not only the module's arguments
        logger.log_hyperparams(plain(cfg))
    summary: dict[str, Any] = {"output_dir": str(out), "fast_dev_run": bool(trainer.fast_dev_run)}
    try:
        if cfg.monitor.at_start:
            summary["initial"] = {k: float(v) for k, v in trainer.validate(model, datamodule, verbose=False)[0].items()}
        trainer.fit(model, datamodule, ckpt_path=cfg.ckpt_path)
        if not (trainer.interrupted or trainer.fast_dev_run) and trainer.current_epoch % trainer.check_val_every_n_epoch:
            trainer.validate(model, datamodule, verbose=False)  # the monitors also after a last epoch off the N-epoch grid
    finally:
        if "wandb" in (cfg.get("logger") or {}):
            import wandb

            wandb.finish()
    summary.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
    summary.update(checkpoint_files(trainer), epochs=trainer.current_epoch, steps=trainer.global_step, interrupted=trainer.interrupted)
    summary["limit_val_batches"] = trainer.limit_val_batches
    summary["knn_memory_total"] = int((datamodule.train_images.labels >= 0).sum())  # what a full monitor pass scores
    summary["knn_queries_total"] = int((datamodule.test_images.labels >= 0).sum())
    if trainer.is_global_zero:
        print_summary(summary)
    return summary


def checkpoint_files(trainer: L.Trainer) -> dict[str, Any]:
    """last_checkpoint: the file with the final weights (None: none written); kept_checkpoints: the
    other checkpoints in the checkpoint folders (periodic ones, and those of an earlier part of a resumed run)."""
    folders = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if c.dirpath}
    last = next((c.last_model_path for c in trainer.checkpoint_callbacks if c.last_model_path), None)
    kept = sorted(str(f) for d in folders for f in d.glob("*.ckpt") if str(f) != last)
    return {"last_checkpoint": last, "kept_checkpoints": kept}


def print_summary(summary: dict[str, Any]) -> None:
    """Which values are final, what scored them, and what each checkpoint file is."""
    written = "none: trainer.fast_dev_run (debug=fast) writes nothing" if summary.get("fast_dev_run") else summary["output_dir"]
    lines = [
        f"output dir:        {written}",
        f"{'last measured monitors (the run was interrupted)' if summary['interrupted'] else 'final monitors'}, "
        f"after {summary['epochs']} epoch(s) / {summary['steps']} steps, on the test split (logged only: no checkpoint is chosen by them):",
    ]
    for key in ("val/knn_top1", "val/linear_top1"):
        before = summary.get("initial", {}).get(key)
        start = f"  (before training: {before:.4f})" if before is not None else ""
        value = summary.get(key)
        lines.append(f"  {key + ':':<16} {'not measured' if value is None else f'{value:.4f}'}{start}")
    voters, queries = summary.get("val/knn_memory_size"), summary.get("val/knn_queries")
    if voters is not None:
        total_v, total_q = summary["knn_memory_total"], summary["knn_queries_total"]
        limit = summary["limit_val_batches"]
        part = (
            ""
            if (voters, queries) == (total_v, total_q)
            else f"  (trainer.limit_val_batches={limit}: part of each split; mcl.eval.knn uses all)"
        )
        lines.append(f"  kNN:             {voters:.0f} of {total_v} training images voted for {queries:.0f} of {total_q} test images{part}")
    last = summary["last_checkpoint"]
    lines.append(
        f"last checkpoint:   {last}  (the final weights)"
        if last
        else "last checkpoint:   none written (callbacks=none or trainer.fast_dev_run)"
    )
    kept = summary["kept_checkpoints"]
    lines.append(
        f"kept checkpoints:  {', '.join(kept)}"
        if kept
        else "kept checkpoints:  none (periodic ones every callbacks.model_checkpoint.every_n_epochs)"
    )
    print("\n== mcl summary ==\n" + "\n".join(lines))


def resume_in_run_dir(args: list[str]) -> list[str]:
    """The Hydra overrides that make `ckpt_path=X` continue in X's run dir (the folder of the
    config_resolved.yaml beside X or one level up); none
    when the command names its own run dir (hydra.run.dir= or paths.output_dir=), is a multirun,
    or X has no run dir."""
    given = dict(a.lstrip("+").split("=", 1) for a in args if "=" in a and not a.startswith("-"))
    ckpt = given.get("ckpt_path", "null").strip("'\"")
    if ckpt == "null" or {"-m", "--multirun"} & set(args) or {"hydra.run.dir", "paths.output_dir"} & given.keys():
        return []
    try:
        run_dir = find_run_config(Path(ckpt)).parent.resolve()
    except EvalError:
        return []
    # Hydra writes no .hydra/ files for it: the run's own (read by mcl.report) stay, and one that is refused writes nothing;
    # one that starts records its overrides in .hydra/resumed/<k>/ (mcl.records.training_started)
    return [f"hydra.run.dir='{run_dir}'", "hydra.output_subdir=null"]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    # Run the main of the importable module, not of `__main__`: the sweep launchers that pickle the task
    # (submitit, joblib) can then refer to this module's functions by name instead of copying them.
    from mcl import train as importable
    from mcl.runtime import run_cli

    def cli() -> None:
        importable.check_knob_overrides(sys.argv[1:])
        sys.argv += importable.resume_in_run_dir(sys.argv[1:])  # a resumed run writes into its checkpoint's run dir
        importable.main()

    run_cli(cli)
