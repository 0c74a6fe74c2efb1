"""Checks of a job's data made before the model loads, when they need a renderer.

A ``sequence_length`` shorter than every example would otherwise be found only after
the model loaded (minutes for a large one) and be reported as an empty dataset. The
renderer comes from the model's processor files alone (``build_renderer``, as
``vlmtune data validate --config`` builds it) and renders rows only until one fits:
on a good job that is the first row.
"""

from __future__ import annotations

from collections.abc import Iterable

from vlmtune.config import ConfigError, JobFile
from vlmtune.data.schema import RLRow, Row
from vlmtune.render import Renderer
from vlmtune.render_rows import TOO_LONG, RenderedRow, RenderLimits, render_row

# What a recipe trains on, per method: the word its messages use.
_ITEMS = {"sft": "examples", "dpo": "pairs", "rl": "prompts"}


def check_rows_fit(
    job: JobFile, method: str, rows: Iterable[Row], renderer: Renderer | None = None
) -> None:
    """Raise a ``ConfigError`` naming ``hyperparameters.sequence_length`` when no row of
    ``rows`` fits it because every one that renders is too long. Rows dropped for other
    reasons are left to the data report. ``renderer``: built from the model's files
    when None; when those cannot be read here, nothing is checked (training reports it)."""
    if renderer is None:
        renderer = _file_renderer(job)
        if renderer is None:
            return
    problem = sequence_length_problem(rows, renderer, RenderLimits.for_job(job), method)
    if problem is not None:
        raise ConfigError("job file", [problem])


def sequence_length_problem(
    rows: Iterable[Row], renderer: Renderer, limits: RenderLimits, method: str = "sft"
) -> str | None:
    """None as soon as one row fits ``limits``; else, when rows were too long, what
    ``sequence_length`` would keep the shortest (None when none was too long)."""
    shortest: RenderedRow | None = None
    for row in rows:
        result = render_row(row, renderer, limits)
        if result.problem is None:
            return None
        if result.problem.category == TOO_LONG and (
            shortest is None or result.length < shortest.length
        ):
            shortest = result
    if shortest is None:
        return None
    items = _ITEMS.get(method, "examples")
    # A datum's input is the rendered sequence minus its last token (render_rows._problem).
    if isinstance(shortest.row, RLRow):
        needed = shortest.length + limits.max_tokens - 1
        size = f"{shortest.length} tokens + rl.max_tokens {limits.max_tokens}"
    else:
        needed = shortest.length - 1
        size = f"{shortest.length} tokens"
    return (
        f"hyperparameters.sequence_length: {limits.sequence_length} keeps none of the "
        f"{items}: the shortest (line {shortest.row.line}) is {size} and needs "
        f"sequence_length >= {needed} (rows are dropped, never truncated)"
    )


def _file_renderer(job: JobFile) -> Renderer | None:
    from vlmtune.render_rows import build_renderer

    m = job.model
    try:
        return build_renderer(
            job.job.model,
            min_pixels=m.min_pixels,
            max_pixels=m.max_pixels,
            max_images_per_message=m.max_images_per_message,
        )
    except (OSError, KeyError, ValueError):  # not local (a server's model), unreadable
        return None
