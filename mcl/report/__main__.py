"""`python -m mcl.report DIR [DIR ...]` (the options: mcl/report/cli.py)."""

from mcl.report.cli import main

main()
