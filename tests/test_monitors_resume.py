"""Monitors that say what they measured, checkpoints that are not chosen on the test split, and a
resume that is the same run (same settings, same run dir)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import MICRO, make_cfg, run_cli
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

from mcl.eval.common import datamodule_for, extract_features, load_checkpoint
from mcl.monitors import knn_predict, topk_accuracy, unpad_distributed
from mcl.reliability import CONFIG_KEY, CheckpointError, ResumableCSVLogger, run_changes
from mcl.report import load_runs, write_report
from mcl.train import CONF_DIR, build, print_summary, resume_in_run_dir, train

EVAL_BATCH = 128  # with limit_val_batches=1: the first 128 images of each split
RUN = [*MICRO, "logger=csv", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "seed=0"]
PERIODIC = "callbacks.model_checkpoint.every_n_epochs=1"  # a kept checkpoint after every epoch


# --- DDP padding ----------------------------------------------------------------------------
@pytest.mark.parametrize("n, world, per_rank", [(10, 3, 4), (10, 4, 3), (8, 2, 4), (10, 3, 2)])
def test_unpad_distributed_restores_each_image_once_in_dataset_order(n, world, per_rank):
    """What every rank of an unshuffled DistributedSampler evaluates, gathered, comes back as the
    dataset (or the prefix the ranks reached, per_rank < its share), without the padding repeats."""
    data = list(range(n))
    samplers = [DistributedSampler(data, num_replicas=world, rank=r, shuffle=False) for r in range(world)]
    seen = [torch.tensor(list(s))[:per_rank] for s in samplers]  # each rank's first per_rank items
    gathered = torch.stack(seen)  # W x per_rank, as all_gather returns it
    rows = torch.stack([gathered, -gathered], dim=-1)  # W x per_rank x 2: any trailing shape
    out = unpad_distributed(rows, samplers[0])
    expected = torch.arange(min(n, per_rank * world))
    assert torch.equal(out[:, 0], expected) and torch.equal(out[:, 1], -expected)
    if per_rank * world > n:  # the padding repeated the first images: they were dropped
        assert torch.cat(seen).numel() > n and out.shape[0] == n


def test_unpad_distributed_refuses_a_shuffled_sampler():
    sampler = DistributedSampler(list(range(6)), num_replicas=2, rank=0, shuffle=True)
    with pytest.raises(ValueError, match="unshuffled"):
        unpad_distributed(torch.zeros(2, 3), sampler)


# --- a tiny run: counts, summary, checkpoints ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("monitors") / "run"
    return out, train(make_cfg([*RUN, PERIODIC], out))


def test_partial_monitor_pass_says_how_many_images_voted_and_matches_an_offline_knn(tiny_run):
    out, summary = tiny_run
    assert summary["val/knn_memory_size"] == summary["val/knn_queries"] == EVAL_BATCH
    assert summary["knn_memory_total"] > EVAL_BATCH and summary["knn_queries_total"] > EVAL_BATCH
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r.get("val/knn_memory_size")]
    assert [float(rows[-1]["val/knn_memory_size"]), float(rows[-1]["val/knn_queries"])] == [EVAL_BATCH, EVAL_BATCH]
    # the same kNN, recomputed from the final checkpoint on the first 128 images of each split
    module, run_cfg = load_checkpoint(summary["last_checkpoint"])
    memory_loader, query_loader = datamodule_for(run_cfg, eval_batch_size=EVAL_BATCH, num_workers=0).val_dataloader()
    memory, memory_labels = extract_features(module.backbone, [next(iter(memory_loader))], torch.device("cpu"))
    query, query_labels = extract_features(module.backbone, [next(iter(query_loader))], torch.device("cpu"))
    scores = knn_predict(query, memory, memory_labels, module.num_classes, run_cfg.monitor.knn_k, run_cfg.monitor.knn_t)
    assert summary["val/knn_top1"] == pytest.approx(topk_accuracy(scores, query_labels), abs=1e-6)


def test_summary_names_the_final_values_and_each_checkpoint(tiny_run, capsys):
    out, summary = tiny_run
    print_summary(summary)
    text = capsys.readouterr().out
    assert "final monitors, after 1 epoch(s) / 2 steps, on the test split (logged only: no checkpoint is chosen by them)" in text
    total_v, total_q = summary["knn_memory_total"], summary["knn_queries_total"]
    assert f"128 of {total_v} training images voted for 128 of {total_q} test images  (trainer.limit_val_batches=1" in text
    assert f"last checkpoint:   {out / 'checkpoints' / 'last.ckpt'}  (the final weights)" in text
    assert f"kept checkpoints:  {out / 'checkpoints' / 'epoch000.ckpt'}" in text
    assert " -" not in text and "best" not in text
    # no checkpoint is chosen by a monitor: last.ckpt and the periodic one
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch000.ckpt", "last.ckpt"]
    assert summary["kept_checkpoints"] == [str(folder / "epoch000.ckpt")] and summary["last_checkpoint"] == str(folder / "last.ckpt")
    saved = torch.load(folder / "epoch000.ckpt", weights_only=True)
    assert saved["epoch"] == 0 and saved[CONFIG_KEY]["mining"]["negative"]["_target_"].endswith("AllNegatives")


def test_default_checkpoints_are_not_chosen_by_a_monitor():
    cfg = OmegaConf.load(Path(CONF_DIR) / "callbacks" / "default.yaml")
    assert all(c.get("monitor") is None for c in cfg.values() if str(c.get("_target_", "")).endswith("ModelCheckpoint"))


# --- resume is the same run ------------------------------------------------------------------
def test_run_changes_lists_what_makes_another_run_and_ignores_the_rest():
    old = {"seed": 0, "mining": {"negative": {"_target_": "A", "x": 1}}, "model": {"temperature": 0.2, "compile": False}}
    old |= {"data": {"batch_size": 16, "num_workers": 0}, "trainer": {"max_epochs": 1}, "paths": {"output_dir": "a"}}
    same = {**old, "trainer": {"max_epochs": 9}, "paths": {"output_dir": "b"}, "data": {"batch_size": 16, "num_workers": 4}}
    assert run_changes(old, {**same, "model": {"temperature": 0.2, "compile": True}}) == []
    new = {**old, "seed": 1, "mining": {"negative": {"_target_": "B", "y": 2}}, "data": {"batch_size": 8, "num_workers": 0}}
    assert run_changes(old, new) == ["data.batch_size: 16 -> 8", "mining.negative: 'A' -> 'B'", "seed: 0 -> 1"]


def test_resume_with_other_mining_is_refused_with_the_diff_and_runs_with_the_flag(tiny_run, tmp_path):
    ckpt = tiny_run[0] / "checkpoints" / "last.ckpt"
    changed = [*RUN, "logger=none", f"ckpt_path={ckpt}", "mining.positive=soft_hard", "seed=3"]
    with pytest.raises(
        CheckpointError, match=r"other settings \(checkpoint -> now\): .*mining.positive: 'mcl.mining.base.NoPositives' -> "
    ):
        build(make_cfg(changed, tmp_path / "refused"))
    with pytest.raises(CheckpointError, match=r"seed: 0 -> 3.*resume_allow_changes=true"):
        build(make_cfg(changed, tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    with pytest.warns(UserWarning, match="resume_allow_changes=true"):
        summary = train(make_cfg([*changed, "resume_allow_changes=true", "trainer.max_epochs=2"], tmp_path / "allowed"))
    assert summary["steps"] == 4  # two more steps on top of the checkpoint's two
    saved = torch.load(summary["last_checkpoint"], weights_only=True)[CONFIG_KEY]
    assert saved["seed"] == 3 and saved["mining"]["positive"]["hard_rule"] == "above_mean"


def test_resume_in_run_dir_points_hydra_at_the_checkpoints_run(tiny_run, tmp_path):
    out = tiny_run[0]
    ckpt = out / "checkpoints" / "last.ckpt"
    resumed = resume_in_run_dir([f"ckpt_path={ckpt}", "trainer.max_epochs=3"])
    assert resumed == [f"hydra.run.dir='{out.resolve()}'", "hydra.output_subdir=null"]
    assert resume_in_run_dir([f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path}"]) == []  # a run dir of its own wins
    assert resume_in_run_dir(["-m", f"ckpt_path={ckpt}"]) == [] and resume_in_run_dir(["seed=1"]) == []
    assert resume_in_run_dir([f"ckpt_path={tmp_path / 'x.ckpt'}"]) == []  # no run dir found: Hydra's default


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under a run dir, byte for byte."""
    return {str(f.relative_to(run_dir)): f.read_bytes() for f in sorted(run_dir.rglob("*")) if f.is_file()}


def report_of(run_dir: Path, out: Path) -> tuple[list[str], str]:
    """What mcl.report reads of a run dir (each run's status) and the report.md it writes (elsewhere: never into the run)."""
    return [job.status for job in load_runs(run_dir)], write_report([run_dir], out).read_text()


@pytest.mark.slow
def test_resumed_cli_run_continues_in_the_checkpoints_run_dir_and_keeps_its_records(tmp_path):
    """A refused resume writes nothing into the run it names; one that starts appends to its records."""
    run_dir = tmp_path / "run"
    first = run_cli([*RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before, report_before = snapshot(run_dir), report_of(run_dir, tmp_path / "report_before")
    assert json.loads(before["job.json"])["status"] == "completed" and report_before[0] == ["completed"]
    ckpt = f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"

    refused = run_cli([*RUN, ckpt, "mining.negative=gradient"], cwd=tmp_path)
    assert refused.returncode != 0 and "belongs to a run with other settings" in refused.stderr
    assert snapshot(run_dir) == before  # no job.json "failed", no .hydra/resumed/, nothing else
    assert report_of(run_dir, tmp_path / "report_after") == report_before
    assert not (tmp_path / "outputs").exists()

    rows_before = list(csv.DictReader(open(run_dir / "metrics.csv")))
    resumed = run_cli([*RUN, ckpt, "trainer.max_epochs=2"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"output dir:        {run_dir}" in resumed.stdout and not (tmp_path / "outputs").exists()
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == before[".hydra/overrides.yaml"]  # the run's own record stays
    assert "ckpt_path" in (run_dir / ".hydra" / "resumed" / "1" / "overrides.yaml").read_text()
    # the config it replaced is kept, the new one says 2 epochs
    assert (run_dir / ".hydra" / "resumed" / "1" / "previous_config_resolved.yaml").read_bytes() == before["config_resolved.yaml"]
    assert OmegaConf.load(run_dir / "config_resolved.yaml").trainer.max_epochs == 2
    record = json.loads((run_dir / "job.json").read_text())
    assert record["status"] == "completed" and any("ckpt_path" in o for o in record["overrides"])
    assert record["earlier"] == [json.loads(before["job.json"])]  # appended, not replaced
    assert report_of(run_dir, tmp_path / "report_resumed")[0] == ["completed"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))  # the first part's rows are kept, the new ones appended
    assert [r["step"] for r in rows[: len(rows_before)]] == [r["step"] for r in rows_before]
    assert {r["epoch"] for r in rows[len(rows_before) :] if r["epoch"]} == {"1"}  # the lr monitor's rows carry no epoch


def test_batched_augmentation_stream_resumes_per_rank(tmp_path):
    """data.batched_augment: the checkpoint holds each rank's view stream; a resumed rank r continues
    stream r (here: rank 1 of 2, simulated), not rank 0's."""
    cfg = make_cfg([*RUN, "data.batched_augment=true"], tmp_path / "r")

    def datamodule(rank: int):
        dm = datamodule_for(cfg, num_workers=0)
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        return dm

    ranks = [datamodule(r) for r in (0, 1)]
    for dm in ranks:
        dm.train_dataloader()
        torch.rand(5, generator=dm.generator)  # some views drawn
    states = [dm.generator.get_state() for dm in ranks]
    assert not torch.equal(states[0], states[1])  # one stream per rank
    saved = {**ranks[0].order.state_dict(None, 16), "generators": states}  # what per_rank gathers under DDP
    resumed = datamodule(1)
    resumed.load_state_dict(saved)
    resumed.train_dataloader()
    assert torch.equal(resumed.generator.get_state(), states[1])
    one = datamodule_for(cfg, num_workers=0)  # one process: state_dict holds its own stream, and it comes back
    one.train_dataloader()
    torch.rand(3, generator=one.generator)
    again = datamodule_for(cfg, num_workers=0)
    again.load_state_dict(one.state_dict())
    again.train_dataloader()
    assert len(one.state_dict()["generators"]) == 1 and torch.equal(again.generator.get_state(), one.generator.get_state())


def test_csv_logger_of_a_resumed_run_appends_to_its_metrics(tmp_path):
    first = ResumableCSVLogger(tmp_path, name="", version="")
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.save()
    resumed = ResumableCSVLogger(tmp_path, name="", version="")  # Lightning's CSVLogger would delete metrics.csv here
    resumed.log_metrics({"train/loss": 2.0, "val/knn_top1": 0.5}, step=1)  # a new column: the header grows
    resumed.save()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(r["step"], r["train/loss"], r["val/knn_top1"]) for r in rows] == [("0", "1.0", ""), ("1", "2.0", "0.5")]
