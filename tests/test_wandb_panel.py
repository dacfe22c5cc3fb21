"""The mining panel (mcl.panel) and the W&B logger: offline runs with the config, metrics and panel."""

from __future__ import annotations

import csv
import os
import struct
from pathlib import Path

import pytest
import torch
from conftest import make_cfg, run_cli
from torch.nn import functional as F
from wandb.proto import wandb_internal_pb2

from mcl.panel import NOT_IN_BANK, draw, mine
from mcl.train import build, train

SMALL = ["debug=tiny", "dataset=digits", "dataset.image_size=16", "backbone.width=8", "data.batch_size=16", "model.queue_size=128"]


def test_panel_shows_what_the_strategies_picked(tmp_path):
    """nn positives and fn_elimination negatives, on a full bank of real training keys."""
    threshold = 0.3
    overrides = [
        "mining.positive=nn",
        "mining.negative=fn_elimination",
        f"mining.negative.threshold={threshold}",
        "mining.negative.compare_to=query",
    ]
    datamodule, module, _ = build(make_cfg([*SMALL, "logger=none", "callbacks=none", *overrides], tmp_path))
    train_view = datamodule.val_dataloader()[0].dataset  # un-augmented training images
    with torch.no_grad():
        module.eval()
        images = torch.stack([train_view[i][0] for i in range(module.bank.size)])
        keys = F.normalize(module.key_projector(module.key_backbone(images)), dim=1)  # K x D
        module.bank.enqueue(keys, torch.arange(module.bank.size), torch.as_tensor(datamodule.train_images.labels[: module.bank.size]))
    module.train()
    assert module.bank.is_full  # the strategies' warm-up is over
    bn_before = module.backbone.bn1.running_mean.clone()

    queries = torch.stack([datamodule.val_dataloader()[1].dataset[i][0] for i in range(5)])  # 5 test images
    mined = mine(module, queries, num_positives=5, num_negatives=4)

    assert module.training and torch.equal(module.backbone.bn1.running_mean, bn_before)  # mode and statistics untouched
    module.eval()
    with torch.no_grad():
        q = F.normalize(module.projector(module.backbone(queries)), dim=1)  # 5 x D
        k = F.normalize(module.key_projector(module.key_backbone(queries)), dim=1)
    sim, key_sim = q @ module.bank.keys.T, k @ module.bank.keys.T  # 5 x K
    for i, m in enumerate(mined):
        # NNCLR: the key's nearest bank entry replaces the augmented positive (lambda 0, weight 1)
        assert m.lam == 0.0 and [slot for slot, _ in m.positives] == [int(key_sim[i].argmax())]
        assert m.positives[0][1] == pytest.approx(1.0)
        kept, dropped = [s for s, _ in m.kept], [s for s, _ in m.dropped]
        nearest = int(key_sim[i].argmax())
        # the four most similar entries on each side of the threshold, excluding the mined positive
        expect_dropped = [j for j in sim[i].argsort(descending=True).tolist() if sim[i, j] > threshold and j != nearest][:4]
        expect_kept = [j for j in sim[i].argsort(descending=True).tolist() if sim[i, j] <= threshold and j != nearest][:4]
        assert dropped == expect_dropped and kept == expect_kept
        assert [round(v, 5) for _, v in m.kept] == [round(float(sim[i, j]), 5) for j in kept]

    shown = [(datamodule.test_images.image(i), int(datamodule.test_images.labels[i])) for i in range(5)]
    fig = draw(shown, mined, module.bank.indices, module.bank.labels, datamodule.train_images, title="test")
    image_axes = [ax for ax in fig.get_axes() if ax.get_images()]
    assert len(image_axes) == sum(1 + len(m.positives) + len(m.kept) + len(m.dropped) for m in mined)
    fig.savefig(tmp_path / "panel.png")
    assert (tmp_path / "panel.png").stat().st_size > 10_000
    assert NOT_IN_BANK < -1  # validation queries can never match a bank slot (-1 marks an empty one)


@pytest.mark.slow
def test_wandb_offline_sweep_has_config_metrics_and_panel_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *SMALL,
        "logger=wandb",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "data.eval_batch_size=128",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "callbacks.mining_panel.every_n_epochs=2",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]
    result = run_cli(args, cwd=tmp_path, env={"WANDB_MODE": "offline", "WANDB_API_KEY": "", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_ids = set()
    for job in ("0", "1"):
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1  # one W&B run per job: a sweep never merges runs
        run_ids.add(runs[0].name.rsplit("-", 1)[1])
        records = next(runs[0].glob("run-*.wandb")).read_bytes()
        assert b'"image_size":16' in records  # the resolved config (the dataset is not a module argument)
        for key in (b"val/knn_top1", b"train/loss", b"mining/neg_kept", b"mining/panel"):
            assert key in records, key
        media = list((runs[0] / "files" / "media" / "images" / "mining").glob("panel_*.png"))
        assert len(media) == 1 and media[0].read_bytes()[:4] == b"\x89PNG"
        # every 2 epochs: after the second epoch (epochs counted from 1, as in the report), not after the first; the same PNG in the run dir
        assert sorted(p.name for p in (sweep / job / "panels").iterdir()) == ["epoch002.png"]
    assert len(run_ids) == 2


def wandb_run_records(path: Path) -> list:
    """The run records (name, group, tags) of an offline `run-*.wandb` file. Its format is LevelDB's log: a 7-byte
    file header (`:W&B`, magic, version), then 32 KiB blocks of chunks (crc 4, length 2, type 1: full, first,
    middle, last) that carry serialised `Record` protobufs."""
    data, block, pos, chunks, runs = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "run":
                runs.append(record.run)
    return runs


@pytest.mark.slow
def test_wandb_sweep_without_a_key_runs_every_job_offline_grouped_by_variant(tmp_path):
    """No API key, no netrc, no WANDB_MODE, no terminal: each job decides offline itself (W&B reads the environment
    once a process, so a mode set in os.environ by job 0 would not reach job 1). Groups: one per variant, its seeds'."""
    sweep, home = tmp_path / "sweep", tmp_path / "home"
    home.mkdir()
    args = ["-m", *SMALL, "logger=wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    args += ["data.eval_batch_size=128", "seed=1,2", "mining.negative=all,gradient", f"hydra.sweep.dir={sweep}"]
    env = {"HOME": str(home), "WANDB_MODE": None, "WANDB_API_KEY": None, "WANDB_DIR": None, "NETRC": None, "OMP_NUM_THREADS": "1"}
    result = run_cli(args, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed" not in result.stderr and "Enter your choice" not in result.stdout + result.stderr
    assert result.stdout.count("== mcl summary ==") == 4 and result.stdout.count("logging offline") == 4
    runs = {}
    for job, (seed, negative) in enumerate([(1, "all"), (1, "gradient"), (2, "all"), (2, "gradient")]):
        files = list((sweep / str(job) / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1  # offline, in the job's own dir
        (run,) = {(r.display_name, r.run_group, tuple(r.tags)) for r in wandb_run_records(files[0])}
        runs[seed, negative] = run
        assert run[0] == f"train_digits seed={seed} mining.negative={negative}"  # named by what the sweep varies
        assert run[2] == (f"{tmp_path.name}/sweep",)  # the sweep dir's last two parts
    for negative in ("all", "gradient"):
        assert runs[1, negative][1] == runs[2, negative][1] == f"train_digits mining.negative={negative}"  # seeds share it
    assert runs[1, "all"][1] != runs[1, "gradient"][1]


def test_a_single_run_has_no_wandb_group_and_no_sweep_tag(tmp_path):
    cfg = make_cfg(["logger=wandb", "seed=1"], tmp_path)  # composed outside a multirun
    assert cfg.logger.wandb.group is None and list(cfg.logger.wandb.tags) == []


@pytest.mark.slow
def test_debug_tiny_logs_every_step_and_draws_the_panel_once(tmp_path):
    """debug=tiny (2 epochs of 4 steps): train/loss and the mining diagnostics at each of the 8 steps, one panel after the last epoch."""
    summary = train(make_cfg(["debug=tiny", "dataset=digits", "dataset.image_size=16", "backbone.width=8", "logger=csv"], tmp_path))
    assert (summary["epochs"], summary["steps"]) == (2, 8)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for column in ("train/loss", "mining/neg_kept_step"):
        logged = [int(r["step"]) for r in rows if r.get(column)]
        assert len(logged) == 8 and len(set(logged)) == 8, (column, logged)  # one value at every step
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == ["epoch002.png"]  # epochs trained, from 1: the panel after the 2nd


def test_wandb_mode_is_decided_for_each_job_and_given_to_the_logger(tmp_path, monkeypatch):
    """With a key: online; without one (no WANDB_API_KEY, no netrc): offline; the environment is left alone,
    so the next job of a sweep decides again."""
    from mcl.train import wandb_offline_unless_logged_in

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with_key = make_cfg(["logger=wandb"], tmp_path)
    wandb_offline_unless_logged_in(with_key)
    monkeypatch.delenv("WANDB_API_KEY")
    without = make_cfg(["logger=wandb"], tmp_path)
    wandb_offline_unless_logged_in(without)
    assert (with_key.logger.wandb.mode, without.logger.wandb.mode) == ("online", "offline")
    assert "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice wins
    chosen = make_cfg(["logger=wandb"], tmp_path)
    wandb_offline_unless_logged_in(chosen)
    assert chosen.logger.wandb.mode == "disabled"
