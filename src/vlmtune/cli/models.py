"""`vlmtune models`: the supported model SKUs."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer


def _human(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:.1f}B"
    if n >= 10**6:
        return f"{n / 1e6:.1f}M"
    return str(n)


def models_command(
    as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON."),
) -> None:
    """List the supported models: parameters, vision support, image cap, GPUs needed."""
    from vlmtune.models.registry import list_models

    specs = list_models()
    if as_json:
        typer.echo(json.dumps([asdict(s) for s in specs], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="vlmtune models",
        caption="min GPUs: 80 GB GPUs for LoRA in bf16 (0: runs on the CPU)",
    )
    table.add_column("name", no_wrap=True)
    for col in ("params", "active", "vision", "images/msg", "min GPUs"):
        table.add_column(col, justify="right")
    for s in specs:
        table.add_row(
            s.name,
            _human(s.params),
            _human(s.active_params),
            "yes" if s.supports_vision else "no",
            "any" if s.max_images_per_message is None else str(s.max_images_per_message),
            str(s.min_gpus),
        )
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models_command)
