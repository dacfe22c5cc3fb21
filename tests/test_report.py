"""The report (mcl.report) on run dirs written here in the layout mcl.train leaves: cheap, no training."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from mcl.report import figures, group_jobs, load_runs, main, setting_of

SHARED = ["dataset=digits", "trainer.max_epochs=1"]


def fake_run(run_dir: Path, overrides: list[str], knn: list[float], fn_kept: float = 0.1, status: str = "completed") -> Path:
    """A run dir as mcl.train leaves it: .hydra/overrides.yaml, config_resolved.yaml, job.json, metrics.csv."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"dataset": {"name": "digits"}, "trainer": {"max_epochs": len(knn)}}
    (run_dir / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "job.json").write_text(json.dumps({"status": status, "num": None}))
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", "mining/neg_fn_kept_epoch", "val/knn_top1"])
        writer.writeheader()
        for epoch, value in enumerate(knn):
            writer.writerow({"epoch": epoch, "step": 4 * epoch + 3, "mining/neg_fn_kept_epoch": fn_kept})
            writer.writerow({"epoch": epoch, "step": 4 * epoch + 3, "val/knn_top1": value})
    return run_dir


@pytest.fixture
def outputs(tmp_path) -> Path:
    """Three single runs of one epoch: two seeds of MoCo v2, one of the paper's method, in outputs/<task>/<date>."""
    root = tmp_path / "outputs"
    fake_run(root / "moco_v2_digits" / "2026-01-01_10-00-00", ["experiment=moco_v2", *SHARED, "seed=1"], [0.40], 0.10)
    fake_run(root / "moco_v2_digits" / "2026-01-01_11-00-00", ["experiment=moco_v2", *SHARED, "seed=2"], [0.50], 0.20)
    fake_run(root / "paper_cifar10_digits" / "2026-01-02_10-00-00", ["experiment=paper_cifar10", *SHARED, "seed=1"], [0.6125], 0.05)
    return root


def test_separate_runs_are_compared_in_percent_with_their_setting(outputs, tmp_path, capsys):
    out = tmp_path / "compare"
    main([str(outputs / "moco_v2_digits"), str(outputs / "paper_cifar10_digits"), "--out", str(out)])
    report = (out / "report.md").read_text()
    assert "**digits, 1 epoch**; fixed overrides: `dataset=digits trainer.max_epochs=1`" in report
    assert "3 jobs: 3 completed, 0 failed" in report
    assert "| experiment | runs | kNN top-1 (%) |" in report  # metric names in words, seeds averaged
    assert "| moco_v2 | 2/2 | 45.00 ± 7.07 |" in report and "| paper_cifar10 | 1/1 | 61.25 |" in report
    assert "| experiment | runs | false negatives among kept (%) |" in report and "| moco_v2 | 2/2 | 15.00 ± 7.07 |" in report
    for name in ("accuracy", "knn_over_epochs", "diagnostics"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (out / f"{name}.svg").read_bytes()[:1000]
    written = json.loads((out / "report.json").read_text())
    assert written["groups"][0]["metrics"]["val/knn_top1"]["mean"] == pytest.approx(0.45)  # JSON: as logged
    assert written["setting"]["datasets"] == ["digits"] and written["vector_plots"][0] == "accuracy.svg"
    assert "written:" in capsys.readouterr().out


def test_a_folder_of_runs_and_a_single_run_dir(outputs):
    jobs = load_runs(outputs)  # outputs/: every run under it
    assert [j.name for j in jobs] == [
        "moco_v2_digits/2026-01-01_10-00-00",
        "moco_v2_digits/2026-01-01_11-00-00",
        "paper_cifar10_digits/2026-01-02_10-00-00",
    ]
    assert [g.label for g in group_jobs(jobs)] == ["experiment=moco_v2", "experiment=paper_cifar10"]
    single = outputs / "paper_cifar10_digits" / "2026-01-02_10-00-00"
    main([str(single)])
    assert "1 jobs: 1 completed" in (single / "report.md").read_text()


def test_plots_name_dataset_budget_overrides_and_metrics_in_words(outputs):
    jobs = load_runs(outputs)
    groups = group_jobs(jobs)
    figs = figures(groups, setting_of(jobs))
    knn = figs["knn_over_epochs"]
    title = knn._suptitle.get_text()
    assert "kNN top-1 (%) per epoch" in title and "digits, 1 epoch" in title and "fixed: dataset=digits trainer.max_epochs=1" in title
    ax = knn.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["experiment=moco_v2 (n=2)", "experiment=paper_cifar10 (n=1)"]
    assert ax.get_ylabel() == "kNN top-1 (%)" and ax.get_xlabel() == "epoch"
    assert ax.get_xlim() == (0.5, 1.5) and [t for t in ax.get_xticks()] == [1]  # one epoch: not 0.96 .. 1.04
    assert ax.lines[0].get_ydata().tolist() == pytest.approx([45.0])  # percent
    bars = figs["accuracy"].axes[0]
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["kNN top-1 (%)"]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["experiment=moco_v2", "experiment=paper_cifar10"]
    panel = figs["diagnostics"].axes[0]
    assert panel.get_title() == "false negatives among kept (%)"


def test_a_run_without_an_override_another_sets_reads_default(tmp_path):
    fake_run(tmp_path / "a", ["dataset=digits"], [0.5])
    fake_run(tmp_path / "b", ["dataset=digits", "model.temperature=0.1"], [0.6])
    groups = group_jobs(load_runs(tmp_path / "a", tmp_path / "b"))
    assert [g.values for g in groups] == [{"model.temperature": "default"}, {"model.temperature": "0.1"}]
    assert [g.label for g in groups] == ["temperature=default", "temperature=0.1"]
