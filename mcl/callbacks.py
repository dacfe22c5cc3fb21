"""The training step's own logging, read from the device only at Lightning's logging steps.

A value shown on Lightning's progress bar with `self.log(..., prog_bar=True)` is read into Python
(`.item()`) after every batch, and `self.log` of a Python float copies it to the device every step:
on a GPU each is a wait or a copy the step does not need. Here the bar reads its metrics when it
refreshes, and the learning rate goes straight from the optimizer to the loggers at the logging steps.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, showing `metrics` (logged without prog_bar) read from the device only at a refresh."""

    def __init__(self, refresh_rate: int = 1, metrics: tuple[str, ...] = ("train/loss",), **kwargs: Any):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.metrics = tuple(metrics)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        logged = trainer.callback_metrics
        for name in self.metrics:
            if name in logged:
                items[name] = f"{logged[name].item():.3f}"  # the one read, at this refresh
        return items


class LearningRates(LearningRateMonitor):
    """Lightning's LearningRateMonitor (every parameter group's lr, Python floats from the optimizer, logged
    at the logging steps: `train/lr` the encoder's, `train/linear_lr` the linear probe's: the
    names of the parameter groups under the scheduler's name, `train`), silent without a
    logger (logger=none) instead of stopping the run."""

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
