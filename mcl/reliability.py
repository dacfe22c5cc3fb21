"""Runs that survive preemption and crashes, resume exactly, and stop loudly when they diverge.

What makes a resumed run continue as if never stopped (on CPU with `trainer.deterministic=true`,
final weights equal an uninterrupted run's bit for bit):
- model, EMA key encoder, memory bank, optimizer, scheduler and loop position: Lightning's own
  checkpoint (the bank lives in registered buffers);
- the data order: `ResumableSampler`, a function of (seed, epoch) alone, skips the batches an
  interrupted epoch already trained on; its state rides in the datamodule's `state_dict`;
- the augmentations: `SeededItems` draws every item's views from its own seed (also drawn from
  (seed, epoch)), so they do not depend on workers, ranks or where the run was stopped;
  with data.batched_augment, each rank's view generator (seeded from (seed, rank)) is
  checkpointed (`per_rank`) and continued;
- every one of those streams is seeded through `stream_seed` (numpy's SeedSequence), so no two
  (seed, epoch) or (seed, rank) share one: with seed + epoch, seed 1339's epoch 1 was seed 1340's
  epoch 0, and the protocol's three seeds one data stream;
- the other random streams (torch, numpy, python; one state per rank): `ResumeState` stores
  them in every checkpoint and sets them back when training restarts.

A resumed run is the same run: `RunConfig` stores the resolved config in every checkpoint and
`check_same_run` refuses a resume whose settings (`RUN_KEYS`) differ, listing them, unless
`resume_allow_changes=true`; `ResumableCSVLogger` appends to the run's metrics.csv.

Faults: `AtomicCheckpointIO` writes each checkpoint beside its target and renames it into place;
`ResumeState` saves `last.ckpt` on SIGTERM; `NonFiniteGuard` stops the run at the first
non-finite loss or gradient, before that step updates the weights or writes a checkpoint.
"""

from __future__ import annotations

import csv
import math
import os
import random
import secrets
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf
from torch.utils.data import Dataset, DistributedSampler


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; raised before training starts."""


# --- data order ---------------------------------------------------------------------------
STREAMS = ("order", "views")  # what a stream seeds: the epoch's order and item seeds, or a rank's batched views
STREAM_SCHEME = "seedsequence"  # recorded in the data state; checkpoints without it used seed + epoch and seed + rank


def stream_seed(seed: int, stream: str, index: int, legacy: bool = False) -> int:
    """The torch seed of one random stream of run seed `seed`: stream "order" with index = epoch, "views" with index = rank.

    numpy's SeedSequence([seed, stream, index]) mixes the three into 64 unrelated bits: distinct triples
    give unrelated streams. legacy: seed + index, what checkpoints written before this mix used (and go on using).
    """
    if legacy:
        return seed + index
    return int(np.random.SeedSequence([seed % 2**64, STREAMS.index(stream), index]).generate_state(1, np.uint64)[0])


class ResumableSampler(DistributedSampler):
    """Yields this rank's dataset indices (with_seeds: (index, item seed) pairs) in an order fixed by (seed, epoch).

    The epoch's order is randperm(N) under stream_seed(seed, "order", epoch), cut to a multiple of the world size
    (drop_last); rank r takes positions r, r + W, ... (disjoint shards). `skip` items of this
    rank are left out of epoch `skip_epoch`: the ones an interrupted run already trained on.
    A DistributedSampler, so Lightning sets its epoch and does not replace it under DDP.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int,
        rank: int,
        seed: int,
        skip_epoch: int = -1,
        skip: int = 0,
        with_seeds: bool = True,
        legacy_seeds: bool = False,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip_epoch, self.skip, self.with_seeds, self.legacy_seeds = skip_epoch, skip, with_seeds, legacy_seeds
        if skip_epoch >= 0:
            self.epoch = skip_epoch  # right even if the loader is iterated before Lightning sets the epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(stream_seed(self.seed, "order", self.epoch, self.legacy_seeds))
        order = torch.randperm(len(self.dataset), generator=g)[: self.total_size]  # N' (a multiple of W)
        seeds = torch.randint(2**62, (len(order),), generator=g)  # N', one augmentation seed per position
        start = self.rank + (self.skip * self.num_replicas if self.epoch == self.skip_epoch else 0)
        mine = order[start :: self.num_replicas].tolist()
        return zip(mine, seeds[start :: self.num_replicas].tolist()) if self.with_seeds else iter(mine)


class SeededItems(Dataset):
    """Item (i, seed) -> dataset[i], computed with torch's CPU generator seeded with `seed`.

    The caller's random state is left as it was (torchvision's transforms draw from torch).
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class DataOrder:
    """Seed and position of the training order; checkpointed through the datamodule's state_dict.

    seed: None draws one (rank 0's, broadcast) when training starts; it is then saved, so a
    resumed unseeded run keeps its order. A checkpoint written before `stream_seed` mixed the seeds
    (no "streams" entry) resumes with the streams it was trained with (seed + epoch, seed + rank).
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.resume: dict[str, int] | None = None  # position loaded from a checkpoint
        self.legacy_seeds = False  # True: resumed from a checkpoint of the seed + epoch scheme

    def view_seed(self, rank: int) -> int:
        """The seed of this rank's batched-view stream (after `sampler` has fixed the run seed)."""
        return stream_seed(self.seed, "views", rank, self.legacy_seeds)

    def sampler(self, dataset: Dataset, batch_size: int, trainer: L.Trainer | None, with_seeds: bool = True) -> ResumableSampler:
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if self.seed is None:
            self.seed = secrets.randbits(31)
            if trainer is not None:
                self.seed = trainer.strategy.broadcast(self.seed)
        skip_epoch, skip = -1, 0
        if self.resume is not None:  # used once: the loader built right after a restore
            saved, done = (self.resume["world_size"], self.resume["batch_size"]), self.resume["batches_done"]
            if done > 0 and saved != (world, batch_size):
                raise CheckpointError(
                    f"the checkpoint was taken mid-epoch with {saved[0]} device(s) x data.batch_size={saved[1]}; resuming it "
                    f"with {world} x {batch_size} would repeat or skip images. Resume with the same devices and batch size, "
                    "or from an epoch-end checkpoint."
                )
            skip_epoch, skip, self.resume = self.resume["epoch"], done * batch_size, None
        return ResumableSampler(dataset, world, rank, self.seed, skip_epoch, skip, with_seeds, self.legacy_seeds)

    def state_dict(self, trainer: L.Trainer | None, batch_size: int) -> dict[str, Any]:
        """Where the next training batch comes from: (epoch, batches of it already trained on)."""
        epoch, done, world = 0, 0, 1
        if trainer is not None:
            epoch, world = trainer.current_epoch, trainer.world_size
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if done >= trainer.num_training_batches:  # the epoch is over: the next batch opens the next epoch
                epoch, done = epoch + 1, 0
        scheme = "legacy" if self.legacy_seeds else STREAM_SCHEME
        return {"seed": self.seed, "epoch": epoch, "batches_done": done, "world_size": world, "batch_size": batch_size, "streams": scheme}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.resume = state["seed"], dict(state)
        self.legacy_seeds = state.get("streams", "legacy") != STREAM_SCHEME
        if self.legacy_seeds:
            rank_zero_warn(
                "mcl: this checkpoint was written before the data streams were seeded through numpy's SeedSequence: it resumes "
                "with the streams it was trained with (seed + epoch, seed + rank), so the resume stays exact; a new run gets the "
                "mixed ones (docs/reliability.md)"
            )


# --- random states ------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's random streams, as plain containers and tensors (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def per_rank(state: Any, trainer: L.Trainer | None) -> list[Any]:
    """`state` of every rank, in rank order ([state] in one process). Every rank must call it: checkpoint
    hooks run on all ranks, and only rank 0's checkpoint dict is written."""
    if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
        return [state]
    states = [None] * trainer.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    ckpt = trainer.checkpoint_callback
    folder = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else Path(trainer.default_root_dir) / "checkpoints"
    return folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


class ResumeState(L.Callback):
    """Random states of every rank in each checkpoint, set back when training restarts; last.ckpt on SIGTERM.

    The states are restored at `on_train_start`, after Lightning has rebuilt everything else, so
    the first random draw of the resumed run is the one the interrupted run would have made.
    SIGTERM (what SLURM sends before preemption; Lightning stops at the end of the current batch)
    writes last.ckpt, then the process exits with status 0.
    """

    def __init__(self) -> None:
        self._to_restore: list[dict[str, Any]] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = per_rank(rng_state(), trainer)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._to_restore = checkpoint.get("rng_states")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self._to_restore = self._to_restore, None
        if states is None:
            return
        if len(states) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds random states of {len(states)} rank(s), this run has {trainer.world_size}: not restored")
            return
        set_rng_state(states[trainer.global_rank])

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(
            f"mcl: SIGTERM received; saved {path} at step {trainer.global_step} (epoch {trainer.current_epoch}). "
            f"Resume with ckpt_path={path} (or auto_resume=true with the same run dir)."
        )


# --- divergence ---------------------------------------------------------------------------
class NonFiniteError(RuntimeError):
    """Training produced NaN/inf values; raised before they reach the weights."""


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or infinite."""


class NonFiniteGradientError(NonFiniteError):
    """A gradient became NaN or infinite while the loss was finite."""


class NonFiniteGuard(L.Callback):
    """Stops training at the first NaN/inf loss or gradient, before the optimizer step applies it.

    The losses of the step (every backward since the last optimizer step) and all gradients are
    reduced on the device to one flag, summed over ranks, and read once, in
    `on_before_optimizer_step`: one device->host read a step, and every DDP process stops at the
    same step. Nothing is saved afterwards: the last checkpoint on disk stays the last good one.
    Under 16-bit mixed precision (a gradient scaler) only the losses are checked: the scaler
    itself skips the steps whose scaled gradients overflow.
    """

    def __init__(self) -> None:
        self._batch: Any = None
        self._losses: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = batch

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())  # checked with the gradients, without a read here

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        losses, self._losses = self._losses, []
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        grads = [] if scaled else [p.grad for p in pl_module.parameters() if p.grad is not None]
        worst = torch.nn.utils.get_total_norm([*losses, *grads], norm_type=math.inf)  # max |x|: nan/inf if any is
        bad = trainer.strategy.reduce((~torch.isfinite(worst)).float(), reduce_op="sum")  # ranks with a non-finite value
        if bool(bad):  # the step's one device->host read
            raise self._error(trainer, pl_module, losses, check_grads=not scaled)

    def _error(self, trainer: L.Trainer, pl_module: L.LightningModule, losses: list[torch.Tensor], check_grads: bool) -> NonFiniteError:
        hp = pl_module.hparams
        loss = torch.stack(losses).float().sum() if losses else torch.tensor(0.0)
        params = pl_module.named_parameters() if check_grads else ()
        named = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
        bad_loss, here = not torch.isfinite(loss), bool(named) or not torch.isfinite(loss)
        views = [t for t in (self._batch or [])[:2] if torch.is_tensor(t) and t.is_floating_point()]
        if not here:
            cause = "see that process's message"
        elif any(not torch.isfinite(p).all() for p in pl_module.parameters()):
            cause = "the weights are already non-finite: an earlier update diverged (optim.lr too high?)"
        elif views and not all(torch.isfinite(v).all() for v in views):
            cause = "this batch's images hold NaN/inf values (check the dataset and its mean/std)"
        elif bad_loss:
            cause = (
                f"the loss overflowed with finite weights and inputs: optim.lr={hp['optim']['lr']} too high or "
                f"model.temperature={hp['model']['temperature']} too low (or half precision overflowing: trainer.precision)"
            )
        else:
            mining = ", ".join(f"mining.{side}: {hp['mining'][side]['_target_'].rsplit('.', 1)[-1]}" for side in ("positive", "negative"))
            cause = (
                "the backward pass of a finite loss produced NaN/inf with finite weights and inputs: an operation with an "
                f"undefined derivative in the loss (0 * inf, log or sqrt at 0; {mining}), or gradients overflowing "
                f"(optim.lr={hp['optim']['lr']}, trainer.precision={trainer.precision})"
            )
        last = last_checkpoint_path(trainer)
        kept = f"the last good checkpoint {last} was left untouched" if last.is_file() else "no checkpoint had been written yet"
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx + 1})"
        if not here:
            what, kind = (
                f"non-finite training loss or gradient on another DDP process (rank {trainer.global_rank}'s loss is {loss.item():.4g})",
                NonFiniteError,
            )
        elif bad_loss:
            what, kind = f"non-finite training loss ({loss.item()})", NonFiniteLossError
        else:
            shown = ", ".join(named[:5]) + (f", ... ({len(named)} in all)" if len(named) > 5 else "")
            what, kind = f"non-finite gradient of {shown} with a finite loss ({loss.item():.4g})", NonFiniteGradientError
        return kind(f"{what} at {where}. Likely cause: {cause}. Training stopped before the optimizer step; {kept}.")


# --- checkpoint files ---------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `path.tmp` in the target's folder, flushes it to disk, then renames it onto `path`.

    A crash at any point leaves either the previous file or the new one, never a torn file.
    (Lightning writes to the system temp folder and moves the file: when that folder is on
    another filesystem, the move is a copy and a crash can leave a truncated checkpoint.)
    Reading a corrupt or truncated file raises `CheckpointError` naming it.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's fsspec transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def load_checkpoint(self, path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err


REQUIRED_KEYS = ("state_dict", "loops", "optimizer_states", "global_step", "epoch")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path` (memory-mapped: cheap), or CheckpointError saying why it cannot be resumed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated: {type(err).__name__}: {err})") from err
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a training checkpoint of mcl: it lacks {missing}")
    return ckpt


def incompatibilities(ckpt: dict[str, Any], model: torch.nn.Module) -> list[str]:
    """Tensors whose name or shape differ between the checkpoint and the model this config builds."""
    saved, ours = ckpt["state_dict"], model.state_dict()
    out = [f"{k}: in the checkpoint, not in this model" for k in saved.keys() - ours.keys()]
    out += [f"{k}: in this model, not in the checkpoint" for k in ours.keys() - saved.keys()]
    out += [
        f"{k}: {tuple(saved[k].shape)} in the checkpoint, {tuple(ours[k].shape)} here"
        for k in saved.keys() & ours.keys()
        if saved[k].shape != ours[k].shape
    ]
    return sorted(out)


def check_resume_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Readable and of the same architecture (backbone, heads, bank), or CheckpointError listing the differences."""
    ckpt = read_checkpoint(path)
    problems = incompatibilities(ckpt, model)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise CheckpointError(f"{path} does not fit this config's model: {shown}. Resume with the settings it was trained with.")
    return ckpt


def find_resume_checkpoint(folder: str | Path, model: torch.nn.Module) -> Path | None:
    """The compatible checkpoint in `folder` with the most training steps (the newest on a tie).

    Unreadable or incompatible files are reported and passed over; None when the folder holds no
    checkpoint at all; CheckpointError when it holds some but none can be resumed.
    """
    found = sorted(Path(folder).glob("*.ckpt"))
    usable, rejected = [], []
    for path in found:
        try:
            ckpt = check_resume_checkpoint(path, model)
        except CheckpointError as err:
            rejected.append(str(err))
            continue
        usable.append((int(ckpt["global_step"]), path.stat().st_mtime, path))
    for reason in rejected:
        rank_zero_warn(f"auto_resume: skipping {reason}")
    if found and not usable:
        raise CheckpointError(f"auto_resume: no checkpoint in {folder} can be resumed: " + " | ".join(rejected))
    return max(usable)[2] if usable else None


# --- logs of a resumed run -----------------------------------------------------------------
class _AppendingWriter(ExperimentWriter):
    """Lightning's metrics.csv writer, continuing an existing file (Lightning's deletes it)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])  # the header: new columns are merged into it


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv survives a resumed run in the same run dir: new rows are appended."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


# --- same run -------------------------------------------------------------------------------
RUN_KEYS = (
    "seed",
    "backbone",
    "dataset",
    "mining",
    "model",
    "optim",
    "data.batch_size",
    "data.key_view",
    "data.augment",
    "data.batched_augment",
    "data.seed",
)
"""The settings that make a run: a checkpoint resumes only with the same ones (resume_allow_changes=true overrides).
trainer.*, logging, paths, monitors and the loader's speed knobs may change freely."""
FREE_KEYS = (
    "model.compile",
    "model.channels_last",
    "dataset.root",
    "dataset.path",
    "dataset.download",
    "dataset.source.root",
    "dataset.source.path",
    "dataset.source.download",
    "dataset.source.cache_dir",
)
"""Within RUN_KEYS, what changes speed or where files live, not the training itself."""
CONFIG_KEY = "mcl_config"  # the checkpoint entry holding the run's resolved config


class RunConfig(L.Callback):
    """Stores the run's resolved config (plain containers: loadable with weights_only) in every checkpoint."""

    def __init__(self, config: dict[str, Any] | None = None):
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = self.config


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def run_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting under RUN_KEYS (less FREE_KEYS) that differs between two resolved
    configs; a node whose `_target_` changed (another strategy or backbone) is one line, not one per knob."""
    old, new = _flat(saved), _flat(current)
    keys = [k for k in sorted(old.keys() | new.keys()) if any(k == r or k.startswith(r + ".") for r in RUN_KEYS) and k not in FREE_KEYS]
    changed = [k for k in keys if old.get(k, "<unset>") != new.get(k, "<unset>")]
    swapped = [k.removesuffix("._target_") for k in changed if k.endswith("._target_")]
    return [
        f"{k.removesuffix('._target_')}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}"
        for k in changed
        if k.endswith("._target_") or not any(k.startswith(node + ".") for node in swapped)
    ]


def check_same_run(ckpt: dict[str, Any], path: str | Path, config: dict[str, Any], allow_changes: bool) -> None:
    """CheckpointError listing the RUN_KEYS settings that differ from the checkpoint's run (a warning with allow_changes)."""
    saved = ckpt.get(CONFIG_KEY)
    if saved is None:
        rank_zero_warn(f"{path} holds no training config (an older mcl wrote it): resuming without checking that the settings match")
        return
    changes = run_changes(saved, config)
    if not changes:
        return
    listed = "; ".join(changes)
    if allow_changes:
        rank_zero_warn(f"resuming {path} with changed settings (resume_allow_changes=true): {listed}")
        return
    raise CheckpointError(
        f"{path} belongs to a run with other settings (checkpoint -> now): {listed}. Resume with the run's own settings "
        "(its config_resolved.yaml), or set resume_allow_changes=true to continue it with these."
    )


def resume_checkpoint(cfg: Any, model: torch.nn.Module, trainer: L.Trainer) -> str | None:
    """The checkpoint a run resumes from: `ckpt_path` (checked), or with `auto_resume` the one
    `find_resume_checkpoint` picks in the checkpoint callback's folder (None: a fresh start).
    Either must come from a run with the same settings (`check_same_run`)."""
    if cfg.ckpt_path is not None:
        path = Path(cfg.ckpt_path)
    elif not cfg.get("auto_resume"):
        return None
    else:
        folder = Path(trainer.checkpoint_callback.dirpath)
        path = find_resume_checkpoint(folder, model)
        rank_zero_info(
            f"mcl: auto_resume from {path}" if path else f"mcl: auto_resume found no checkpoint in {folder}; starting from scratch"
        )
        if path is None:
            return None
    config = OmegaConf.to_container(cfg, resolve=True)
    check_same_run(check_resume_checkpoint(path, model), path, config, bool(cfg.get("resume_allow_changes")))
    return str(path)
