"""The `vlmtune` command: one surface, thin. Each group lives in its own module."""

from __future__ import annotations

import typer

from vlmtune.cli import agent as agent_cli
from vlmtune.cli import data as data_cli
from vlmtune.cli import models as models_cli
from vlmtune.cli import plan as plan_cli
from vlmtune.cli import report as report_cli
from vlmtune.cli import runs as runs_cli
from vlmtune.cli import serve as serve_cli
from vlmtune.cli import tasks as tasks_cli
from vlmtune.cli import train as train_cli

app = typer.Typer(
    name="vlmtune",
    help="Fine-tune vision-language models (Qwen3-VL) with SFT, DPO and RL on your own GPUs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_cli.app, name="data")
app.add_typer(tasks_cli.app, name="tasks")
models_cli.register(app)
train_cli.register(app)
plan_cli.register(app)
serve_cli.register(app)
report_cli.register(app)
runs_cli.register(app)
agent_cli.register(app)


def main() -> None:
    app()
