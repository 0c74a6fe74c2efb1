"""`vlmtune runs report RUN_ID`: the URL of a server run's report page.

A run here is a Tinker-protocol training run on `vlmtune serve` (`create_model`, driven
by a client's own loop); `vlmtune jobs report` is the same for a job.
"""

from __future__ import annotations

from typing import Annotated

import typer

from vlmtune.cli.serve import KeyOpt, ServerOpt, _err

runs_app = typer.Typer(help="Training runs on a server (Tinker protocol).", no_args_is_help=True)


@runs_app.command("report")
def runs_report(
    run_id: Annotated[str, typer.Argument(help="a training run id (session:train:N)")],
    server: ServerOpt = "http://127.0.0.1:8000",
    api_key: KeyOpt = None,
    open_: Annotated[bool, typer.Option("--open", help="open it in the browser")] = False,
) -> None:
    """Print the URL of the run's report page (it opens without a key, for a day)."""
    import httpx

    from vlmtune.sdk.http import HttpTransport, RemoteError, run_report_link

    try:
        url = run_report_link(HttpTransport(server, api_key), run_id)["url"]
    except RemoteError as e:
        _err(f"{server}: {e}")
        raise typer.Exit(1) from None
    except httpx.HTTPError as e:
        _err(f"{server}: cannot reach the server ({type(e).__name__}: {e})")
        raise typer.Exit(1) from None
    typer.echo(url)
    if open_:
        import webbrowser

        webbrowser.open(url)


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
