"""A run's report: one self-contained HTML page (``vlmtune report RUN_DIR``, and the
server's ``/v1/jobs/{id}/report``).

``read_run`` reads a run directory (``run_data``), ``render_page`` draws it (``page``,
with plots from ``plots`` drawn by ``svg``). Nothing here writes into the run.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.report.page import render_page
from vlmtune.report.run_data import ReportError, RunData, read_run

REPORT_FILE = "report.html"


def build_report(run_dir: str | Path, status: str | None = None) -> str:
    """The report of ``run_dir`` as HTML; ``ReportError`` if it is not a run directory.
    ``status``: the run's state as the caller knows it (a server's job state)."""
    return render_page(read_run(run_dir), status)


__all__ = ["REPORT_FILE", "ReportError", "RunData", "build_report", "read_run", "render_page"]
