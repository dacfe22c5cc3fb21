"""Faults: SIGKILL mid-epoch, SIGTERM, a non-finite loss, a crash during a checkpoint write, a corrupt last.ckpt.

The fault injectors below are callbacks added with `+callbacks.<name>._target_=test_faults.<Class>`
(the CLI child processes import this file through PYTHONPATH).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_cfg, run_cli
from test_resume import RUN, assert_same_training_state, load, run, uninterrupted

import mcl.reliability
from mcl.reliability import AtomicCheckpointIO, CheckpointError, NonFiniteGradientError, NonFiniteLossError, read_checkpoint
from mcl.train import build

HERE = Path(__file__).resolve().parent
EVERY_STEP = ["callbacks.last_checkpoint.every_n_train_steps=1"]  # last.ckpt after every step


class SignalAt(L.Callback):
    """Sends `signum` to this very process when global step `step` starts."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNWeightsAt(L.Callback):
    """Makes the weights non-finite when global step `step` starts (a diverged update)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.backbone.conv1.weight.fill_(float("nan"))


class NaNGradientAt(L.Callback):
    """From global step `step` on, the backward pass turns the gradient of `backbone.conv1.weight` into NaN
    (an operation with an undefined derivative); the forward pass and the loss stay finite."""

    def __init__(self, step: int):
        self.step, self.handle = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.handle is None:
            self.handle = pl_module.backbone.conv1.weight.register_hook(lambda grad: grad * float("nan"))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_auto_resume_through_the_cli(tmp_path_factory, tmp_path):
    ref = uninterrupted(tmp_path_factory)
    out = tmp_path / "run"
    # last.ckpt written by the every-step callback only: which callback writes it last (and with which
    # epoch field) otherwise depends on whether the last epoch's kNN beat the best one
    common = [*RUN, *EVERY_STEP, "callbacks.model_checkpoint.save_last=false", f"paths.output_dir={out}", f"hydra.run.dir={out}"]
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    killer = ["+callbacks.kill._target_=test_faults.SignalAt", "+callbacks.kill.step=4", f"+callbacks.kill.signum={int(signal.SIGKILL)}"]
    killed = run_cli([*common, *killer], cwd=tmp_path, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert load(out / "checkpoints" / "last.ckpt")["global_step"] == 4  # mid-epoch 1: nothing lost before the kill
    resumed = run_cli([*common, "auto_resume=true"], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "auto_resume from" in resumed.stdout + resumed.stderr
    assert_same_training_state(load(out / "checkpoints" / "last.ckpt"), load(ref / "kept" / "step6.ckpt"))


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_exits_cleanly_and_resumes_exactly(tmp_path_factory, tmp_path):
    ref = uninterrupted(tmp_path_factory)
    out = tmp_path / "run"
    term = ["+callbacks.term._target_=test_faults.SignalAt", "+callbacks.term.step=4", f"+callbacks.term.signum={int(signal.SIGTERM)}"]
    with pytest.raises(SystemExit) as stopped:
        run(out, *term)  # no periodic checkpoint: last.ckpt can only come from the SIGTERM handler
    assert not stopped.value.code  # a clean exit: status 0
    saved = load(out / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 5  # the batch running when the signal came was finished, then saved
    run(out, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}")
    assert_same_training_state(load(out / "checkpoints" / "last.ckpt"), load(ref / "checkpoints" / "last.ckpt"))


def test_nan_loss_stops_naming_step_and_cause_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    nan = ["+callbacks.nan._target_=test_faults.NaNWeightsAt", "+callbacks.nan.step=2", "trainer.max_epochs=1"]
    with pytest.raises(NonFiniteLossError, match=r"at global step 2 \(epoch 0, batch 3\).*weights are already non-finite") as err:
        run(out, *EVERY_STEP, *nan)
    assert "last good checkpoint" in str(err.value) and "untouched" in str(err.value)
    last = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


def test_nan_gradient_with_finite_loss_stops_before_the_update_naming_the_parameter(tmp_path):
    out = tmp_path / "run"
    nan = ["+callbacks.nan._target_=test_faults.NaNGradientAt", "+callbacks.nan.step=2", "trainer.max_epochs=1"]
    pattern = r"non-finite gradient of backbone.conv1.weight with a finite loss \(\d.*\) at global step 2 \(epoch 0, batch 3\)"
    with pytest.raises(NonFiniteGradientError, match=pattern + r".*undefined derivative.*before the optimizer step") as err:
        run(out, *EVERY_STEP, *nan)
    assert "last good checkpoint" in str(err.value) and "untouched" in str(err.value)
    last = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2  # the step that met the NaN wrote nothing
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


def test_overflowing_loss_names_lr_and_temperature(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at global step \d+ .*model.temperature=1e-30 too low.*no checkpoint had been written"):
        run(tmp_path / "run", "model.temperature=1e-30", "trainer.max_epochs=1")


def test_a_crash_during_a_checkpoint_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(mcl.reliability.torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_corrupt_last_checkpoint_is_rejected_before_training(tmp_path):
    broken = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1}, broken)
    broken.write_bytes(broken.read_bytes()[:100])  # truncated by a crash of a non-atomic writer
    with pytest.raises(CheckpointError, match=r"last.ckpt is not a readable checkpoint"):
        build(make_cfg([*RUN, f"ckpt_path={broken}"], tmp_path / "run"))
    with pytest.raises(CheckpointError, match=r"last.ckpt is not a readable checkpoint"):
        io.load_checkpoint(broken)
    with pytest.raises(CheckpointError, match="no such file"):
        build(make_cfg([*RUN, f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path / "run"))
