"""`vlmtune tasks`: the built-in task apps (list them, serve one over HTTP)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Annotated

import typer

app = typer.Typer(help="Task apps a collector plays: list them, serve one.", no_args_is_help=True)


@dataclass
class _Listed:
    name: str
    installed: bool
    install: str | None  # the pip command that installs a missing task's extra
    description: str = ""
    actions: int | None = None
    max_steps: int | None = None
    expert: bool | None = None


def _listed(name: str) -> _Listed:
    from vlmtune.tasks.registry import TASKS, installed, task_class

    if not installed(name):
        return _Listed(name, False, f"pip install 'vlmtune[{TASKS[name].extra}]'")
    info = task_class(name).info
    return _Listed(
        name, True, None, info.description, len(info.actions), info.max_steps, info.has_expert
    )


@app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="Print the tasks as JSON."),
) -> None:
    """The registered tasks: description, action count, and whether their extra is installed."""
    from vlmtune.tasks.registry import task_names

    rows = [_listed(name) for name in task_names()]
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="vlmtune tasks")
    for col in ("name", "installed", "actions", "max steps", "expert", "description"):
        table.add_column(col, no_wrap=col != "description")
    for r in rows:
        table.add_row(
            r.name,
            "yes" if r.installed else escape(f"no: {r.install}"),
            "" if r.actions is None else str(r.actions),
            "" if r.max_steps is None else str(r.max_steps),
            "" if r.expert is None else ("yes" if r.expert else "no"),
            escape(r.description),
        )
    Console().print(table)


@app.command("serve")
def serve_command(
    name: Annotated[str, typer.Argument(help="the task to serve (see `vlmtune tasks list`)")],
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8100,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="VLMTUNE_TASK_API_KEY",
            help="require Authorization: Bearer <key> on every route but /healthz",
        ),
    ] = None,
) -> None:
    """Serve one task's protocol routes (/info, /episodes, ...) at the root of HOST:PORT."""
    import uvicorn

    from vlmtune.tasks.http import task_app
    from vlmtune.tasks.registry import UnknownTask

    try:
        served = task_app(name, api_key=api_key)
    except UnknownTask as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None
    if not 1 <= port <= 65535:
        typer.echo(f"--port {port}: use 1-65535", err=True)
        raise typer.Exit(2)
    typer.echo(f"serving task {name!r} on http://{host}:{port} (Ctrl-C stops)", err=True)
    uvicorn.run(served, host=host, port=port, log_level="warning")
