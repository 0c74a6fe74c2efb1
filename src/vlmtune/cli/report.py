"""`vlmtune report RUN_DIR`: the run's report as one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (vlmtune train --output)")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="the HTML file to write (default: RUN_DIR/report.html)"
        ),
    ] = None,
    open_: Annotated[
        bool, typer.Option("--open", help="open the report in the default browser")
    ] = False,
) -> None:
    """Write the run's report: curves, data report, applied settings, eval predictions.

    One HTML file that needs no network to open (plots are inline SVG, images are
    embedded). A run still training gets the report of its steps so far."""
    from vlmtune.atomic import WriteRefused, atomic_write, explain_refused_writes
    from vlmtune.report import REPORT_FILE, ReportError, build_report

    try:
        html = build_report(run_dir)
    except ReportError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    target = output or run_dir / REPORT_FILE
    if target.is_dir():
        typer.echo(f"--output: {target} is a folder; name a file (e.g. {target / REPORT_FILE})",
                   err=True)  # fmt: skip
        raise typer.Exit(2)
    try:
        with explain_refused_writes(target, "the report"):
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(target) as f:
                f.write(html)
    except WriteRefused as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    typer.echo(str(target))
    if open_:
        import webbrowser

        if not webbrowser.open(target.resolve().as_uri()):
            typer.echo(f"no browser to open it here: open {target} yourself", err=True)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
