"""The paper's Table 1 and its analyses on a suite (`launch/report.py`): `run` finds and evaluates
every partition, `analysis` turns the numbers into findings, `render` writes results.md, the PNGs
and results.json."""

from experiments.report.analysis import ari, table1_rows
from experiments.report.render import write_report
from experiments.report.run import ReportConfig, ReportResult, resolve_suite, run_report

__all__ = ["ReportConfig", "ReportResult", "ari", "resolve_suite", "run_report", "table1_rows", "write_report"]
