"""`vlmtune data ...` (validate, inline)."""

import typer

app = typer.Typer(help="Validate, normalise and inline datasets.", no_args_is_help=True)
