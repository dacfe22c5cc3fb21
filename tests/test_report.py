"""The report (mcl.report) on run dirs written here in the layout mcl.train leaves: cheap, no training."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg

from mcl.report import (
    choose_baseline,
    figures,
    group_jobs,
    load_runs,
    main,
    paired_difference,
    paired_rows,
    published,
    setting_of,
    t_quantile,
    write_report,
)

SHARED = ["dataset=digits", "trainer.max_epochs=1"]


def fake_run(
    run_dir: Path,
    overrides: list[str],
    knn: list[float],
    fn_kept: float = 0.1,
    status: str = "completed",
    dataset: str = "digits",
    neg_kept: float = 128.0,
    extra: dict[str, float] | None = None,
) -> Path:
    """A run dir as mcl.train leaves it: .hydra/overrides.yaml and hydra.yaml, config_resolved.yaml, job.json, metrics.csv."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    values = dict(o.split("=", 1) for o in overrides)
    choices = {"experiment": values["experiment"]} if "experiment" in values else {}
    (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}}))
    config = {"dataset": {"name": dataset}, "trainer": {"max_epochs": len(knn)}, "seed": int(values.get("seed", 0))}
    (run_dir / "config_resolved.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "job.json").write_text(json.dumps({"status": status, "num": None}))
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        extra = {f"{k}_epoch": v for k, v in (extra or {}).items()}
        writer = csv.DictWriter(f, ["epoch", "step", "mining/neg_fn_kept_epoch", "mining/neg_kept_epoch", *extra, "val/knn_top1"])
        writer.writeheader()
        for epoch, value in enumerate(knn):
            mining = {"mining/neg_fn_kept_epoch": fn_kept, "mining/neg_kept_epoch": neg_kept, **extra}
            writer.writerow({"epoch": epoch, "step": 4 * epoch + 3, **mining})
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
    assert "**digits, 1 epoch; varies: experiment; 1-2 runs per variant**; fixed overrides: `dataset=digits trainer.max_epochs=1`" in report
    assert "3 jobs: 3 completed, 0 failed" in report
    assert "| experiment | runs | kNN top-1 (%) |" in report  # metric names in words, seeds averaged
    assert "| moco_v2 | 2/2 | 45.00 ± 7.07 |" in report and "| paper_cifar10 | 1/1 | 61.25 |" in report
    assert "| experiment | runs | false negatives among kept (%) |" in report and "| moco_v2 | 2/2 | 15.00 ± 7.07 |" in report
    # a count is no result: its own table, as a count (not `128.0 ± 0`)
    results = report.split("## Results", 1)[1].split("\n## ", 1)[0]
    assert "per query" not in results and "± 0" not in report
    assert "## Counts (final epoch)\n\n| experiment | negatives kept per query |\n|---|---|\n| moco_v2 | 128 |" in report
    for name in ("accuracy", "knn_over_epochs", "diagnostics"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (out / f"{name}.svg").read_bytes()[:1000]
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    written = json.loads((out / "report.json").read_text())
    assert written["groups"][0]["metrics"]["val/knn_top1"]["mean"] == pytest.approx(0.45)  # JSON: as logged
    assert written["setting"]["datasets"] == ["digits"] and written["vector_plots"][:2] == ["accuracy.svg", "accuracy.pdf"]
    # the paper's run on digits: no published figure for this dataset, and the report says so
    assert "None for these runs' dataset (digits); the published ones are on cifar10, cifar100, tinyimagenet." in report
    assert "written:" in capsys.readouterr().out


def test_a_folder_of_runs_and_a_single_run_dir(outputs):
    jobs = load_runs(outputs)  # outputs/: every run under it
    assert [j.name for j in jobs] == [
        "moco_v2_digits/2026-01-01_10-00-00",
        "moco_v2_digits/2026-01-01_11-00-00",
        "paper_cifar10_digits/2026-01-02_10-00-00",
    ]
    assert [(j.preset, j.seed) for j in jobs] == [("moco_v2", 1), ("moco_v2", 2), ("paper_cifar10", 1)]
    assert [g.label for g in group_jobs(jobs)] == ["experiment=moco_v2", "experiment=paper_cifar10"]
    single = outputs / "paper_cifar10_digits" / "2026-01-02_10-00-00"
    main([str(single)])
    text = (single / "report.md").read_text()
    assert "1 job: 1 completed" in text and "1 jobs" not in text
    assert "Paired differences" not in text  # one group: nothing to pair with


def test_plots_are_titled_in_words_with_legends_outside_and_axes_on_the_values(outputs):
    jobs = load_runs(outputs)
    groups = group_jobs(jobs)
    figs = figures(groups, setting_of(jobs))
    knn = figs["knn_over_epochs"]
    title = knn._suptitle.get_text()
    assert title == "digits, 1 epoch; varies: experiment; 1-2 runs per variant\nkNN top-1 (%) per epoch: mean ± std over seeds"
    assert "=" not in title  # words, not a config dump
    ax = knn.axes[0]
    assert ax.get_legend() is None  # the legend is the figure's, outside the axes
    legend = knn.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["experiment=moco_v2 (n=2)", "experiment=paper_cifar10 (n=1)"]
    FigureCanvasAgg(knn).draw()
    box, axes_box = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= axes_box.x1  # right of the data, not over it
    assert ax.get_ylabel() == "kNN top-1 (%)" and ax.get_xlabel() == "epochs trained"
    assert ax.get_xlim() == (0.5, 1.5) and [t for t in ax.get_xticks()] == [1]  # counted from 1: one epoch trained
    curves = [line for line in ax.lines if not line.get_label().startswith("_")]  # not the error bars
    assert [c.get_ydata().tolist()[0] for c in curves] == pytest.approx([45.0, 61.25])  # percent
    assert curves[0].get_xdata()[0] != curves[1].get_xdata()[0]  # a little apart: equal curves stay visible
    acc = figs["accuracy"].axes[0]
    assert acc.get_title() == "kNN top-1 (%)" and acc.get_ylabel() == "top-1 accuracy (%)"
    assert [t.get_text() for t in acc.get_xticklabels()] == ["experiment=moco_v2", "experiment=paper_cifar10"]
    low, high = acc.get_ylim()
    assert 30 < low < 40 and 61.25 < high < 70  # spans the values (40 .. 61.25), not from 0
    panel = figs["diagnostics"].axes[0]
    assert panel.get_title() == "false negatives among kept (%)"


def test_title_labels_and_metrics_are_the_users(outputs, tmp_path):
    out = tmp_path / "styled"
    main(
        [
            str(outputs),
            "--out",
            str(out),
            "--title",
            "Digits, one epoch: MoCo v2 against the paper",
            "--labels",
            "experiment=moco_v2:MoCo v2",
            "experiment=paper_cifar10:mined samples",
            "--metrics",
            "val/knn_top1",
        ]
    )
    report = (out / "report.md").read_text()
    assert report.startswith("# Report: Digits, one epoch: MoCo v2 against the paper")
    assert "| variant | experiment | runs | kNN top-1 (%) |" in report and "| MoCo v2 | moco_v2 | 2/2 | 45.00 ± 7.07 |" in report
    assert "## Paired differences to MoCo v2" in report
    jobs = load_runs(outputs)
    groups = group_jobs(jobs, labels={"experiment=moco_v2": "MoCo v2"})
    fig = figures(groups, setting_of(jobs, title="My title"))["accuracy"]
    assert fig._suptitle.get_text().startswith("My title\n")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["MoCo v2", "experiment=paper_cifar10"]
    with pytest.raises(SystemExit):
        main([str(outputs), "--metrics", "val/nothing"])
    with pytest.raises(SystemExit):
        main([str(outputs), "--labels", "experiment=dino:DINO"])


def test_a_run_without_an_override_another_sets_reads_default(tmp_path):
    fake_run(tmp_path / "a", ["dataset=digits"], [0.5])
    fake_run(tmp_path / "b", ["dataset=digits", "model.temperature=0.1"], [0.6])
    groups = group_jobs(load_runs(tmp_path / "a", tmp_path / "b"))
    assert [g.values for g in groups] == [{"model.temperature": "default"}, {"model.temperature": "0.1"}]
    assert [g.label for g in groups] == ["temperature=default", "temperature=0.1"]


def test_one_precision_for_means_and_stds(tmp_path):
    for seed, sim in ((1, 0.9446), (2, 0.9427)):
        fake_run(tmp_path / f"r{seed}", ["dataset=digits", f"seed={seed}"], [0.5], extra={"mining/neg_sim_kept": sim})
    report = write_report(tmp_path).read_text()
    std = np.std([0.9446, 0.9427], ddof=1)
    assert f"| all runs | 2/2 | 10.00 ± 0.00 | 0.944 ± {std:.3f} |" in report.split("## Mining diagnostics", 1)[1]  # not 0.94365 ± 0.001344


# --- published figures -----------------------------------------------------------------------------
def test_the_published_table_ships_with_the_package_and_holds_the_labs_rows():
    table = published()
    assert table["sources"]["lab"]["commit"] == "80dd398" and table["sources"]["lab"]["epochs"] == 200
    rows = table["presets"]
    assert {"moco_v2", "simclr", "nnclr", "nnclr_k5", "snclr", "byol", "msf", "cmsf", "sce", "ressl", "unmix"} <= set(rows)
    assert rows["moco_v2"]["cifar10"] == {"knn200": 88.05, "linear": 89.70}
    assert rows["sce"]["tinyimagenet"] == {"knn200": 40.66, "linear": 48.63}
    assert rows["nnclr"]["cifar100"] == {"knn200": 50.99, "linear": 60.53} and rows["nnclr_k5"]["cifar100"]["knn200"] == 53.21
    assert [rows[f"paper_{d}"][d]["knn200"] for d in ("cifar10", "cifar100", "tinyimagenet")] == [88.57, 61.10, 36.69]
    for preset in rows:
        if not preset.startswith("paper") and preset != "nnclr_k5":
            assert (Path(__file__).resolve().parent.parent / "conf" / "experiment" / f"{preset}.yaml").exists() or preset in {
                "byol",
                "msf",
                "cmsf",
                "sce",
                "ressl",
                "unmix",
            }


def test_report_prints_the_published_figure_and_says_the_budget_differs(tmp_path):
    for seed, knn in ((1339, 0.31), (1340, 0.35)):
        fake_run(tmp_path / f"m{seed}", ["experiment=moco_v2", "dataset=cifar10", f"seed={seed}"], [0.2, 0.25, knn], dataset="cifar10")
    run = fake_run(tmp_path / "nn", ["experiment=nnclr", "dataset=cifar10", "seed=1339"], [0.2, 0.25, 0.30], dataset="cifar10")
    config = yaml.safe_load((run / "config_resolved.yaml").read_text())
    (run / "config_resolved.yaml").write_text(yaml.safe_dump({**config, "model": {"neighbours": {"topk": 5}}}))  # the lab's k=5 row
    config = yaml.safe_load((tmp_path / "m1339" / "config_resolved.yaml").read_text())
    (tmp_path / "m1339" / "config_resolved.yaml").write_text(yaml.safe_dump({**config, "backbone": {"width": 64}}))
    report = write_report(tmp_path).read_text()
    section = report.split("## Published figures", 1)[1].split("\n## ", 1)[0]
    assert (
        "| experiment=moco_v2 | MoCo v2 | cifar10 | 88.05 | 33.00 ± 2.83 (online) | −55.05 | 89.70 | - | - | **budget differs**: 3 vs 200 epochs |"
        in section
    )
    assert "| experiment=nnclr | NNCLR (k=5) | cifar10 | 86.78 | 30.00 (online) | −56.78 |" in section
    # 200 epochs of a width-8 network is no reproduction either
    long = fake_run(tmp_path / "long", ["experiment=moco_v2", "dataset=cifar10", "seed=1"], [0.5] * 200, dataset="cifar10")
    (long / "config_resolved.yaml").write_text(
        yaml.safe_dump({**yaml.safe_load((long / "config_resolved.yaml").read_text()), "backbone": {"width": 8}})
    )
    assert "**budget differs**: width 8 vs 64 |" in write_report(long).read_text()
    assert "they do not say whether mcl reproduces the published figure" in section
    assert "lab: the authors' lab benchmark, pc-cp/Benchmark-Methods-For-MNN" in section and "(commit 80dd398)" in section
    rows = json.loads((tmp_path / "report.json").read_text())["published"]
    assert rows[0]["knn200"]["difference"] == pytest.approx(33.0 - 88.05) and rows[0]["budget_differs"] is True


def test_offline_results_beside_the_checkpoint_reach_the_table_and_the_published_comparison(tmp_path):
    for seed, (knn, lin) in ((1339, (0.881, 0.90)), (1340, (0.879, 0.89))):
        run = fake_run(tmp_path / f"m{seed}", ["experiment=moco_v2", "dataset=cifar10", f"seed={seed}"], [0.8] * 200, dataset="cifar10")
        (run / "checkpoints").mkdir()
        grid = [{"k": 200, "t": 0.1, "top1": knn, "top5": 0.99}, {"k": 20, "t": 0.1, "top1": 0.95, "top5": 0.99}]
        (run / "checkpoints" / "last.knn.json").write_text(json.dumps({"grid": grid}))
        (run / "checkpoints" / "last.knn.2.json").write_text(json.dumps({"grid": [{**grid[0], "top1": knn + 0.001}]}))  # newer
        linear = {"top1": lin - 0.01, "final": {"epoch": 100, "top1": lin - 0.01}, "best": {"epoch": 90, "top1": lin, "top5": 1.0}}
        (run / "checkpoints" / "last.linear-lab.json").write_text(json.dumps(linear))
    report = write_report(tmp_path).read_text()
    head = report.split("## Results\n\n", 1)[1].splitlines()[0]
    assert (
        head
        == "| group | runs | kNN top-1 (%) | offline 200-NN top-1 (%) | linear (lab) top-1, best test epoch (%) | linear (lab) top-1, final epoch (%) |"
    )
    assert "| all runs | 2/2 | 80.00 ± 0.00 | 88.10 ± 0.14 | 89.50 ± 0.71 | 88.50 ± 0.71 |" in report
    assert (
        "| all runs | MoCo v2 | cifar10 | 88.05 | 88.10 ± 0.14 | +0.05 | 89.70 | 89.50 ± 0.71 | −0.20 | 200 epochs, as published |"
        in report
    )


# --- paired differences ------------------------------------------------------------------------------
def test_t_quantile_matches_the_table():
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 10: 2.228, 29: 2.045, 120: 1.980}  # two-sided 95 %
    for df, value in table.items():
        assert round(t_quantile(0.95, df), 3) == value
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 17, 60):
        assert t_quantile(0.95, df) == pytest.approx(float(scipy_stats.t.ppf(0.975, df)), abs=1e-9)


def test_paired_difference_and_its_interval_equal_a_hand_computed_one(tmp_path):
    base = {1339: 0.80, 1340: 0.82, 1341: 0.78}
    variant = {1339: 0.81, 1340: 0.832, 1341: 0.788}  # differences 1.0, 1.2, 0.8 points
    noisy = {1339: 0.79, 1340: 0.85, 1341: 0.78}  # -1, 3, 0
    for name, values in (("moco_v2", base), ("paper_cifar10", variant), ("snclr", noisy)):
        for seed, v in values.items():
            fake_run(tmp_path / f"{name}{seed}", [f"experiment={name}", "dataset=digits", f"seed={seed}"], [v])
    fake_run(tmp_path / "extra", ["experiment=paper_cifar10", "dataset=digits", "seed=7"], [0.99])  # no baseline run for seed 7: left out
    groups = group_jobs(load_runs(tmp_path))
    baseline = choose_baseline(groups)
    assert baseline.label == "experiment=moco_v2"
    d = paired_difference(groups[[g.label for g in groups].index("experiment=paper_cifar10")], baseline, "val/knn_top1")
    diffs = [1.0, 1.2, 0.8]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2)
    assert d["seeds"] == [1339, 1340, 1341] and d["n"] == 3
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((mean, mean - half, mean + half), abs=1e-9)
    assert d["within_noise"] is False  # [0.50, 1.50]
    report = write_report(tmp_path).read_text()
    rows = report.split("## Paired differences to experiment=moco_v2", 1)[1].split("\n## ", 1)[0]
    assert f"| paper_cifar10 | +1.00 [+{mean - half:.2f}, +{mean + half:.2f}] (3 seeds) |" in rows
    noisy_d = [-1.0, 3.0, 0.0]  # mean 0.67, sd 2.08: the interval holds 0
    m, s = sum(noisy_d) / 3, math.sqrt(sum((x - sum(noisy_d) / 3) ** 2 for x in noisy_d) / 2)
    h = 4.302652729911275 * s / math.sqrt(3)
    assert f"| snclr | +{m:.2f} [−{h - m:.2f}, +{m + h:.2f}] (3 seeds, within noise) |" in rows
    with pytest.raises(ValueError, match="names no group"):
        choose_baseline(groups, "dino")
    assert choose_baseline(groups, "snclr").label == "experiment=snclr"


def test_a_sweep_over_presets_and_datasets_pairs_each_variant_with_moco_v2_on_its_own_dataset(tmp_path):
    for dataset, shift in (("cifar10", 0.0), ("cifar100", -0.3)):
        for seed in (1, 2):
            for preset, gain in (("moco_v2", 0.0), ("paper_cifar10", 0.01 * seed)):
                overrides = [f"experiment={preset}", f"dataset={dataset}", f"seed={seed}"]
                fake_run(tmp_path / f"{dataset}-{preset}-{seed}", overrides, [0.5 + shift + gain + 0.02 * seed], dataset=dataset)
    rows = paired_rows(group_jobs(load_runs(tmp_path)), ["val/knn_top1"])
    assert [(r["group"], r["baseline"]) for r in rows] == [
        ("experiment=paper_cifar10, dataset=cifar10", "experiment=moco_v2, dataset=cifar10"),
        ("experiment=paper_cifar10, dataset=cifar100", "experiment=moco_v2, dataset=cifar100"),
    ]
    assert [r["mean"] for r in rows] == pytest.approx([1.5, 1.5])  # gains 1 and 2 points, never across datasets
    report = write_report(tmp_path).read_text()
    assert "## Paired differences to experiment=moco_v2\n" in report and "(the group with the variant's other values)" in report
