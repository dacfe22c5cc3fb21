"""`python -m mcl.report DIR [DIR ...]`: one table and three plots from sweeps and runs.

The command line (mcl/report/__init__.py says what the report holds): its options, and an error in
mcl's words for a missing dir, an unknown metric, label or baseline.
"""

from __future__ import annotations

import argparse

from mcl.report.write import write_report


def parse_labels(pairs: list[str]) -> dict[str, str]:
    """`--labels 'negative=all:MoCo v2' ...`: automatic label, a colon, the name to show."""
    out = {}
    for pair in pairs:
        old, sep, new = pair.partition(":")
        if not sep or not old or not new:
            raise ValueError(f"--labels {pair!r}: write LABEL:NAME, e.g. 'negative=gradient:gradient band' (LABEL as the report shows it)")
        out[old] = new
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mcl.report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "dirs", nargs="+", help="sweep dirs (multirun/<task>/<date_time>), run dirs (outputs/<task>/<date_time>) or folders of them"
    )
    parser.add_argument("--out", default=None, help="write the report here (default: the one dir given; with several, reports/<date_time>)")
    parser.add_argument("--average-over", nargs="*", default=["seed"], help="override keys averaged over (default: seed)")
    parser.add_argument("--title", default=None, help="the figures' and the report's title (default: dataset, budget and what varies)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="metrics of the results table, accuracy plot and paired differences, e.g. eval/knn200_top1 val/knn_top1",
    )
    parser.add_argument("--labels", nargs="+", default=[], help="rename groups: 'LABEL:NAME', e.g. 'negative=gradient:gradient band'")
    parser.add_argument(
        "--baseline", default=None, help="the group the paired differences are taken to (default: moco_v2 where present, else the first)"
    )
    args = parser.parse_args(argv)
    try:
        path = write_report(
            args.dirs, args.out, tuple(args.average_over), args.title, args.metrics, parse_labels(args.labels), args.baseline
        )
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"mcl.report: {err}\n")
    print(path.read_text())
    print(f"written: {path} (and report.json, plots as PNG, SVG and PDF) in {path.parent}")
