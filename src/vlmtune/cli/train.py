"""`vlmtune train`, `eval`, `export`."""

import typer


def register(app: typer.Typer) -> None:
    pass
