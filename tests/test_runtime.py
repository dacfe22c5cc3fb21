"""Run names, run dirs, evaluation workers and the Lightning messages mcl silences (mcl.runtime)."""

from __future__ import annotations

import logging
import warnings

from conftest import make_cfg
from hydra import compose, initialize_config_dir
from lightning.fabric.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from mcl.eval.linear import CONF_DIR as EVAL_CONF_DIR
from mcl.runtime import available_cpus, register, run_dir_name, run_name, sweep_dir_name
from mcl.train import CONF_DIR


def test_run_dir_says_the_dataset_when_the_command_line_picks_another():
    assert run_dir_name("paper_cifar10", ["experiment=paper_cifar10", "dataset=digits"]) == "paper_cifar10_digits"
    assert run_dir_name("paper_cifar10", ["dataset=cifar10"]) == "paper_cifar10"  # the task already says it
    assert run_dir_name("demo", ["seed=1"]) == "demo"
    assert run_dir_name("ablation", ["dataset=cifar10,cifar100"]) == "ablation"  # a sweep over datasets: jobs differ


def test_hydra_run_and_sweep_dirs_use_that_name(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=paper_cifar10", "dataset=digits"], return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/paper_cifar10_digits/")
    assert cfg.hydra.sweep.dir.startswith("multirun/paper_cifar10_digits/")
    assert "file" not in cfg.hydra.job_logging.handlers  # no train.log: the run's messages go to the console


def test_the_jobs_of_a_sweep_share_the_dir_their_launcher_named(monkeypatch):
    """The launcher resolves the sweep dir first, from the sweep's overrides; each job resolves it again with
    its own task name and overrides (experiment=moco_v2,paper_cifar10 -> two task names) and gets the same."""
    monkeypatch.delenv("MCL_SWEEP_DIR_2026_01_02_03_04_05", raising=False)
    stamp = "2026-01-02_03-04-05"
    assert sweep_dir_name("train", ["experiment=moco_v2,paper_cifar10", "dataset=digits"], stamp) == f"train_digits/{stamp}"
    assert sweep_dir_name("paper_cifar10", ["experiment=paper_cifar10", "dataset=digits"], stamp) == f"train_digits/{stamp}"
    assert sweep_dir_name("ablation", ["dataset=digits"], "2026-01-02_03-04-06") == "ablation_digits/2026-01-02_03-04-06"  # another sweep


def test_wandb_run_name_holds_the_task_and_the_overrides(tmp_path):
    name = run_name("paper_cifar10", ["experiment=paper_cifar10", "dataset=digits", "seed=1", "+mining.negative.start=0.1", "logger=wandb"])
    assert name == "paper_cifar10_digits seed=1 mining.negative.start=0.1"
    assert len(run_name("train", [f"model.temperature={i}" for i in range(100)])) == 128
    cfg = make_cfg(["logger=wandb"], tmp_path)  # composed outside a Hydra run: the task name alone
    assert cfg.logger.wandb.name == "train"


def test_evaluation_workers_never_exceed_the_cpus():
    with initialize_config_dir(config_dir=EVAL_CONF_DIR, version_base="1.3"):
        for name in ("knn", "linear"):
            assert compose(name, overrides=["ckpt_path=x"]).num_workers == min(4, available_cpus())


def test_lightning_tips_and_the_csv_log_dir_warning_are_silenced(tmp_path):
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(handler)
    try:
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing something")
        rank_zero_info("`Trainer.fit` stopped: `max_epochs=1` reached.")
    finally:
        lightning_logger.removeHandler(handler)
    assert records == ["`Trainer.fit` stopped: `max_epochs=1` reached."]  # other messages still pass

    (tmp_path / "config_resolved.yaml").write_text("x: 1\n")  # a run dir is never empty
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning shown ...
        register()  # ... except the ones mcl filters (register puts its filter first again)
        assert CSVLogger(str(tmp_path), name="", version="").experiment is not None  # opens the log dir
        warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another warning"]
