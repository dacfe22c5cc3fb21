"""Clusters: multi-node DDP started the way torchrun or srun start it, and sweeps through Hydra's launcher plugins."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
import yaml
from conftest import MICRO, REPO, run_cli
from hydra import compose, initialize_config_dir
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from omegaconf import OmegaConf
from test_sweep_report import SMALL, final_knn, table_rows

from mcl.records import JobStatusFile
from mcl.report import main as report_main
from mcl.train import CONF_DIR, ConfigError, check_accelerator, check_config, train

HERE = Path(__file__).resolve().parent
NODE = [
    *MICRO,
    "trainer=ddp_cpu",
    "trainer.devices=1",
    "trainer.num_nodes=2",
    "model.proj_hidden=64",
    "model.queue_size=128",  # 2 views x 16 x 2 ranks = 64 keys a step: the bank turns over every 2 steps
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "seed=0",
    "callbacks=none",
    "+callbacks.probe._target_=test_ddp.BankProbe",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(launcher: str, node: int, port: int) -> dict[str, str]:
    """What torchrun (`--nnodes=2 --nproc-per-node=1 --node-rank=N`) or srun (2 nodes, 1 task each) set for node N's process."""
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if launcher == "torchrun":
        ranks = {"RANK": str(node), "GROUP_RANK": str(node), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2"}
        return {**common, **ranks, "TORCHELASTIC_RUN_ID": "mcl-test"}
    return {
        **common,
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "mcl",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": str(node),
        "SLURM_NODEID": str(node),
        "SLURM_LOCALID": "0",
    }


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_two_nodes_share_one_bank_and_finish(launcher, tmp_path):
    """Two single-process "nodes", each a `python -m mcl.train ... trainer.num_nodes=2` of its own, ranked by the environment."""
    out, port = tmp_path / "run", free_port()
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("LOCAL_RANK", "NODE_RANK", "RANK")
    }
    base = {**clean, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    base.update(WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "mcl.train", *NODE, f"paths.output_dir={out}", f"hydra.run.dir={out}"]
    nodes = [
        subprocess.Popen(
            args, cwd=tmp_path, env={**base, **node_env(launcher, n, port)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for n in (0, 1)
    ]
    logs = [p.communicate(timeout=600) for p in nodes]
    for node, (proc, (stdout, stderr)) in enumerate(zip(nodes, logs)):
        assert proc.returncode == 0, f"node {node}: {stdout[-2000:]}{stderr[-4000:]}"
    assert logs[0][0].count("== mcl summary ==") == 1 and "== mcl summary ==" not in logs[1][0]  # global rank 0 only

    r0, r1 = (torch.load(out / f"probe_rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["steps"]) == len(r1["steps"]) == 3
    for s0, s1 in [*zip(r0["steps"], r1["steps"]), (r0, r1)]:  # before every step, and at the end
        bank0, bank1 = s0.get("bank", s0.get("final_bank")), s1.get("bank", s1.get("final_bank"))
        for name in ("keys", "indices", "labels", "ptr", "num_written"):
            assert torch.equal(bank0[name], bank1[name]), name
    # both nodes' keys went into it, and each node trained on its own shard
    seen = [set(torch.cat([s["batch_index"] for s in r["steps"]]).tolist()) for r in (r0, r1)]
    assert not seen[0] & seen[1]
    final = set(r0["final_bank"]["indices"].tolist())
    assert final & seen[0] and final & seen[1]
    assert int(r0["final_bank"]["num_written"]) == 3 * 2 * 16  # 3 steps x 2 nodes x 16 images, one key an image
    assert r0["metrics"]["train/loss"] == r1["metrics"]["train/loss"]  # reduced over the nodes


@pytest.mark.slow
def test_sweep_through_submitit_local_writes_job_dirs_the_report_reads(tmp_path):
    """`-m hydra/launcher=local` (submitit_local): each job a process of its own, in the sweep's numbered dirs."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=local", *SMALL, "trainer.max_epochs=1", "model.temperature=0.1,0.2", f"hydra.sweep.dir={sweep}"]
    result = run_cli(args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (sweep / ".submitit").is_dir()  # submitit's own logs and pickles, beside the job dirs
    for num, temperature in enumerate(("0.1", "0.2")):
        job = sweep / str(num)
        status = json.loads((job / "job.json").read_text())  # the status callback ran inside the submitit job
        assert status["status"] == "completed" and status["overrides"][-1] == f"model.temperature={temperature}"
        assert yaml.safe_load((job / "config_resolved.yaml").read_text())["model"]["temperature"] == float(temperature)
        assert final_knn(job)

    report_main([str(sweep)])  # python -m mcl.report SWEEP_DIR
    markdown = (sweep / "report.md").read_text()
    assert "2 jobs: 2 completed, 0 failed" in markdown
    assert [row[:2] for row in table_rows(markdown, "Results")] == [["0.1", "1/1"], ["0.2", "1/1"]]


class Submitted(Exception):
    """Stands for `sbatch`: carries the script submitit would submit."""


def test_slurm_launcher_asks_for_the_trainer_s_nodes_and_devices(tmp_path, monkeypatch):
    """`hydra/launcher=slurm trainer=ddp trainer.num_nodes=2`: the sbatch script submitit writes (nothing is submitted)."""
    import submitit.slurm.slurm as submitit_slurm

    def capture(self, path):
        raise Submitted(Path(path).read_text())

    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were installed
    monkeypatch.setattr(submitit_slurm.SlurmExecutor, "_make_submission_command", capture)
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.partition=gpu", "data.num_workers=6"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"hydra.sweep.dir={tmp_path}", "hydra.job.name=train"], return_hydra_config=True)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=train, config=cfg)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    script = submitted.value.args[0].splitlines()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=7", "--partition=gpu", "--time=1440"):
        assert f"#SBATCH {line}" in script, line
    assert "#SBATCH --signal=USR2@120" in script and "#SBATCH --array=0-1%2" in script  # one array task per sweep job
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in script)  # srun starts the 2 x 4 tasks


@pytest.mark.parametrize("rank_variable", ["SLURM_PROCID", "RANK", "NODE_RANK", "LOCAL_RANK"])
def test_job_status_is_written_by_global_rank_zero_only(rank_variable, tmp_path, monkeypatch):
    """srun (and torchrun) start every process of a job the same way: only rank 0 writes job.json."""
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}, "overrides": {"task": ["seed=0"]}, "job": {"num": 3}}})
    for variable in ("SLURM_PROCID", "RANK", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(rank_variable, "1")
    JobStatusFile().on_job_start(config)
    assert not (tmp_path / "job.json").exists()
    monkeypatch.setenv(rank_variable, "0")
    JobStatusFile().on_job_start(config)
    assert json.loads((tmp_path / "job.json").read_text())["status"] == "running"


# --- errors that say what to do, before any process starts ---------------------------------------
def cli_error(tmp_path: Path, *args: str) -> str:
    """stderr of a `python -m mcl.train` that must fail before training (no run dir content beyond Hydra's)."""
    result = run_cli(["dataset=digits", "logger=none", *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Initializing distributed" not in result.stdout + result.stderr  # no DDP process was started
    assert not (tmp_path / "run" / "checkpoints").exists()
    return result.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a machine without GPU")
def test_ddp_without_gpu_names_ddp_cpu(tmp_path):
    err = cli_error(tmp_path, "trainer=ddp")
    assert "trainer.accelerator=gpu, but torch finds no such device on this machine: use trainer=ddp_cpu" in err
    assert "No supported gpu backend" not in err


@pytest.mark.slow
def test_ddp_on_cpu_with_sync_batchnorm_names_ddp_cpu(tmp_path):
    err = cli_error(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.sync_batchnorm=true")
    assert "trainer.sync_batchnorm=true needs GPUs" in err and "use trainer=ddp_cpu" in err


GRADIENT_KNOB_ERROR = (
    "mining.negative (GradientBandNegatives) has no knob 'strat': did you mean mining.negative.start? "
    "Its knobs: start, end, unit, final_start, final_end, rank_by, exclude_self, warmup."
)


@pytest.mark.slow
def test_unknown_strategy_knob_lists_the_knobs_and_the_closest(tmp_path):
    """`mining.negative.strat=0.1`: checked before Hydra composes (Hydra would advise `+mining.negative.strat`)."""
    err = cli_error(tmp_path, "mining.negative=gradient", "mining.negative.strat=0.1")
    assert GRADIENT_KNOB_ERROR in err
    assert "To append to your config" not in err


def test_unknown_strategy_knob_added_with_plus_gets_the_same_error(cfg_factory):
    """`+mining.negative.strat=0.1` composes; check_config stops it before the strategy's constructor fails (TypeError)."""
    with pytest.raises(ConfigError) as err:
        check_config(cfg_factory(["mining.negative=gradient", "+mining.negative.strat=0.1"]), world_size=1)
    assert GRADIENT_KNOB_ERROR in str(err.value)


def test_a_knob_of_another_strategy_names_the_strategies_that_have_it(cfg_factory):
    cfg = cfg_factory(["+mining.positive.topk=3"])  # mining.positive=none
    with pytest.raises(
        ConfigError,
        match=r"\(NoPositives\) has no knob 'topk'\. It takes no knobs\. 'topk' is a knob of mining\.positive=hard\|msf\|soft\|soft_hard\.",
    ):
        check_config(cfg, world_size=1)
    check_config(cfg_factory(["mining.positive=soft", "mining.positive.topk=3"]), world_size=1)


def test_gpu_checks_on_a_machine_with_or_without_gpus(monkeypatch):
    """In-process, with torch's view of the GPUs replaced: no GPU, and fewer GPUs than trainer.devices."""
    ddp = OmegaConf.create({"accelerator": "gpu", "strategy": "ddp", "devices": 4, "sync_batchnorm": True})
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    monkeypatch.setattr(MPSAccelerator, "is_available", staticmethod(lambda: False))
    with pytest.raises(ConfigError, match="use trainer=ddp_cpu"):
        check_accelerator(ddp)
    with pytest.raises(ConfigError, match=r"use trainer=cpu\b"):
        check_accelerator(OmegaConf.create({"accelerator": "gpu", "devices": 1}))
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(CUDAAccelerator, "auto_device_count", staticmethod(lambda: 2))
    with pytest.raises(ConfigError, match=r"trainer.devices=4, but this machine has 2 GPU\(s\): set trainer.devices=2"):
        check_accelerator(ddp)
    check_accelerator(OmegaConf.merge(ddp, {"devices": 2}))
    check_accelerator(OmegaConf.create({"accelerator": "auto", "strategy": "ddp", "devices": 2, "sync_batchnorm": True}))
    with pytest.raises(ConfigError, match="SyncBatchNorm does not run on CPU"):
        check_accelerator(OmegaConf.merge(ddp, {"accelerator": "cpu"}))


def test_the_slurm_example_asks_for_what_its_command_trains_on():
    """examples/slurm/train.sbatch: its srun command composes and passes the checks, on the nodes and tasks it asks for,
    with the CPUs a task of hydra/launcher=slurm asks for; it activates the environment mcl is installed in."""
    text = (REPO / "examples" / "slurm" / "train.sbatch").read_text()
    options = [line.split()[1].lstrip("-") for line in text.splitlines() if line.startswith("#SBATCH")]
    sbatch = {name: value for name, _, value in (o.partition("=") for o in options)}
    command = text.split("srun python -m mcl.train", 1)[1].replace("\\\n", " ").split("\n", 1)[0]
    args = [a.replace('"${SLURM_JOB_ID}"', "123") for a in command.split() if a != '"$@"']
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=args, return_hydra_config=True)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (int(sbatch["nodes"]), int(sbatch["ntasks-per-node"]))
    assert int(sbatch["gpus-per-node"]) == cfg.trainer.devices and int(sbatch["cpus-per-task"]) == cfg.data.num_workers + 1
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # what a sweep job of the same command asks for
        launched = compose("train", overrides=[*args, "hydra/launcher=slurm"], return_hydra_config=True)
    assert int(sbatch["cpus-per-task"]) == launched.hydra.launcher.cpus_per_task
    assert cfg.auto_resume and cfg.hydra.run.dir == "outputs/train/slurm-123"  # a requeued job (same id) finds its checkpoints
    assert sbatch["signal"] == "SIGUSR1@120" and "requeue" in sbatch
    assert 'source "$VENV/bin/activate"' in [line.strip() for line in text.splitlines()]  # not commented out
    check_config(cfg, world_size=cfg.trainer.num_nodes * cfg.trainer.devices)
