"""Exact resume: a run stopped mid-epoch or at an epoch end and resumed ends with the same state,
bit for bit (CPU, deterministic), as a run that was never stopped. Helpers here are shared with
test_faults.py (the uninterrupted run is made once per session and reused)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import make_cfg
from torch.utils.data import Dataset
from torchvision.transforms import v2

from mcl.reliability import CheckpointError, ResumableSampler, SeededItems, find_resume_checkpoint, rng_state, set_rng_state
from mcl.train import build, train


class NoisyGradients(L.Callback):
    """Each step draws from torch's, numpy's and python's global random streams (as dropout or a
    randomised mining rule would), so a resume is exact only if all three are restored."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        scale = 1e-3 * (1.0 + np.random.rand() + random.random())
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.add_(torch.randn_like(p.grad), alpha=scale)


# 3 steps an epoch, 2 epochs, a monitor pass after each, one loader worker, a stochastic step
RUN = [
    "debug=tiny",
    "dataset=digits",
    "dataset.image_size=16",
    "backbone.width=8",
    "model.proj_hidden=64",
    "data.batch_size=16",
    "model.queue_size=64",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.deterministic=true",
    "seed=0",
    "data.num_workers=1",
    "+callbacks.noise._target_=test_resume.NoisyGradients",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]
# every step's and every epoch's checkpoint kept
KEEP_ALL = [
    "+callbacks.keep_steps._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.keep_steps.dirpath=${paths.output_dir}/kept",
    "+callbacks.keep_steps.filename='step{step}'",
    "+callbacks.keep_steps.auto_insert_metric_name=false",
    "+callbacks.keep_steps.every_n_train_steps=1",
    "+callbacks.keep_steps.save_top_k=-1",
    "+callbacks.keep_epochs._target_=lightning.pytorch.callbacks.ModelCheckpoint",
    "+callbacks.keep_epochs.dirpath=${paths.output_dir}/kept",
    "+callbacks.keep_epochs.filename='epoch{epoch}'",
    "+callbacks.keep_epochs.auto_insert_metric_name=false",
    "+callbacks.keep_epochs.save_top_k=-1",
]


def run(out: Path, *overrides: str) -> dict:
    return train(make_cfg([*RUN, *overrides], out))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def uninterrupted(tmp_path_factory) -> Path:
    """The reference run, made once per test session (its kept/ folder holds every step's checkpoint)."""
    out = tmp_path_factory.getbasetemp() / "uninterrupted"
    if not (out / "done").exists():
        shutil.rmtree(out, ignore_errors=True)
        run(out, *KEEP_ALL)
        (out / "done").touch()
    return out


def assert_same_training_state(got: dict, ref: dict) -> None:
    """Weights, EMA encoder, bank, optimizer, scheduler and position equal bit for bit."""
    assert got["global_step"] == ref["global_step"] and got["epoch"] == ref["epoch"]
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    differ = [k for k in ref["state_dict"] if not torch.equal(got["state_dict"][k], ref["state_dict"][k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"
    for a, b in zip(got["optimizer_states"][0]["state"].values(), ref["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert got["lr_schedulers"] == ref["lr_schedulers"]


# --- the pieces ----------------------------------------------------------------------------
def test_sampler_order_is_fixed_by_seed_and_epoch_and_resumes_mid_epoch():
    data = list(range(103))
    a = list(ResumableSampler(data, 1, 0, seed=5))
    assert a == list(ResumableSampler(data, 1, 0, seed=5))
    assert a != list(ResumableSampler(data, 1, 0, seed=6))
    assert sorted(i for i, _ in a) == data and len({s for _, s in a}) == len(a)  # a permutation, one seed per item
    later = ResumableSampler(data, 1, 0, seed=5)
    later.set_epoch(1)
    assert list(later) != a
    # two ranks: disjoint shards of one order, the odd item dropped
    shards = [list(ResumableSampler(data, 2, r, seed=5)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 51 and not {i for i, _ in shards[0]} & {i for i, _ in shards[1]}
    # resuming epoch 1 after 3 batches of 8 on each rank: the rest of the same epoch, same seeds
    for r in (0, 1):
        full = ResumableSampler(data, 2, r, seed=5)
        full.set_epoch(1)
        rest = ResumableSampler(data, 2, r, seed=5, skip_epoch=1, skip=24)
        assert rest.epoch == 1 and list(rest) == list(full)[24:]
        rest.set_epoch(2)  # the next epoch is whole again
        full.set_epoch(2)
        assert list(rest) == list(full)
    plain = list(ResumableSampler(data, 1, 0, seed=5, with_seeds=False))
    assert plain == [i for i, _ in a]


class RandomCrops(Dataset):
    def __init__(self):
        self.image = torch.arange(3 * 16 * 16, dtype=torch.uint8).reshape(3, 16, 16)
        self.view = v2.Compose([v2.RandomResizedCrop(8, antialias=True), v2.RandomHorizontalFlip()])

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.view(self.image)


def test_seeded_items_repeat_their_views_and_leave_the_global_random_state_alone():
    items = SeededItems(RandomCrops())
    before = torch.get_rng_state()
    a, b, c = items[(0, 11)], items[(0, 11)], items[(0, 12)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save({"rng": rng_state()}, tmp_path / "s.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


# --- whole runs ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "checkpoint",
    [
        "step4.ckpt",  # mid-epoch: epoch 1 after its first batch (the bank has wrapped, a monitor pass happened)
        "epoch0.ckpt",  # epoch end, after the monitor pass
    ],
)
def test_resume_equals_uninterrupted(tmp_path_factory, tmp_path, checkpoint):
    ref = uninterrupted(tmp_path_factory)
    start = ref / "kept" / checkpoint
    assert load(start)["global_step"] in (3, 4)
    run(tmp_path / "resumed", f"ckpt_path={start}")
    assert_same_training_state(load(tmp_path / "resumed" / "checkpoints" / "last.ckpt"), load(ref / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_auto_resume_picks_the_newest_compatible_checkpoint(tmp_path_factory, tmp_path):
    ref = uninterrupted(tmp_path_factory)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step2.ckpt", "step4.ckpt"):
        shutil.copy(ref / "kept" / name, folder / name)
    (folder / "last.ckpt").write_bytes((ref / "kept" / "step5.ckpt").read_bytes()[:5000])  # torn: a crash mid-write
    other = load(ref / "kept" / "step5.ckpt")
    other["state_dict"]["bank.keys"] = torch.zeros(128, 128)  # another config's bank (queue_size=128)
    torch.save(other, folder / "other.ckpt")
    _, model, _ = build(make_cfg(RUN, tmp_path / "probe"))
    with pytest.warns(UserWarning) as warned:
        assert find_resume_checkpoint(folder, model) == folder / "step4.ckpt"
    text = " ".join(str(w.message) for w in warned)
    assert "last.ckpt is not a readable checkpoint" in text and "other.ckpt does not fit" in text and "bank.keys" in text
    for name in ("step2.ckpt", "step4.ckpt"):
        (folder / name).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be resumed"):
        find_resume_checkpoint(folder, model)
    assert find_resume_checkpoint(tmp_path / "empty", model) is None


@pytest.mark.slow
def test_mid_epoch_checkpoint_with_another_batch_size_is_refused(tmp_path_factory, tmp_path):
    ref = uninterrupted(tmp_path_factory)
    with pytest.raises(CheckpointError, match=r"taken mid-epoch with 1 device\(s\) x data.batch_size=16; resuming it with 1 x 8"):
        run(tmp_path / "resumed", f"ckpt_path={ref / 'kept' / 'step4.ckpt'}", "data.batch_size=8", "resume_allow_changes=true")
