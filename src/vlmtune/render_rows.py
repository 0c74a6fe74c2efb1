"""Parsed rows -> rendered training items, or the reason a row cannot be trained on.

The one place a row is dropped after parsing. The SFT, DPO and RL recipes and
``vlmtune data validate --config`` all call ``render_row`` with a renderer built from
the same settings and the same ``RenderLimits``, so validation and training drop the
same rows for the same reasons: a chat control token in the text, an image the
processor refuses (its aspect ratio), too long for ``sequence_length``, or nothing to
train on. Images over the per-message cap cost the image, never the row.

``build_sft_datums`` applies the same checks to SFT rows straight to Datums, with a
``RenderReport`` of what it kept and dropped by line (benchmarks and tests use it).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlmtune.data.errors import RowError
from vlmtune.data.report import ValidationReport
from vlmtune.data.schema import PreferenceRow, RLRow, Row, RowKind, SFTRow, row_images
from vlmtune.render import Rendered, Renderer, TrainOn, datum_from_rendered
from vlmtune.types import Datum

if TYPE_CHECKING:
    from vlmtune.config import JobFile

# Categories of the drops decided here (the renderer's own are in render.py).
TOO_LONG = "too long for sequence_length"
NO_WEIGHT = "no trained tokens"
RENDER_FAILED = "cannot be rendered"

METHOD_KIND: dict[str, RowKind] = {"sft": "sft", "dpo": "preference", "rl": "rl"}


@dataclass(frozen=True)
class RenderLimits:
    """The job settings that decide whether a rendered row can be trained on."""

    sequence_length: int
    train_on: TrainOn = "all_assistant"
    max_tokens: int = 0  # RL: the tokens sampled per completion must fit as well

    @classmethod
    def for_job(cls, job: JobFile) -> RenderLimits:
        hp = job.hyperparameters
        rl = job.algorithm.method == "rl"
        return cls(hp.sequence_length, hp.train_on, job.rl.max_tokens if rl else 0)


@dataclass
class RenderedRow:
    """A row and its rendering: one conversation (SFT, RL prompt) or (chosen, rejected)."""

    row: Row
    sides: tuple[Rendered, ...] = ()  # empty when the row could not be rendered
    problem: RowError | None = None  # why the row cannot be trained on; None: keep it

    @property
    def length(self) -> int:
        return max((r.length for r in self.sides), default=0)

    @property
    def images_dropped(self) -> int:
        # A pair's sides share their prompt (and its images): count the chosen side.
        return self.sides[0].images_dropped if self.sides else 0


def render_row(row: Row, renderer: Renderer, limits: RenderLimits) -> RenderedRow:
    """Render a row as its recipe does and check it fits; never raises for a bad row."""
    try:
        sides = _render(row, renderer, limits)
    except RowError as e:
        return RenderedRow(row, problem=e)
    except ValueError as e:  # the renderer refusing something not foreseen here
        return RenderedRow(row, problem=RowError(str(e), category=RENDER_FAILED))
    return RenderedRow(row, sides, _problem(row, sides, limits))


def _render(row: Row, renderer: Renderer, limits: RenderLimits) -> tuple[Rendered, ...]:
    if isinstance(row, PreferenceRow):
        # Each side on its own, weights on its final assistant turn: the DPO response.
        sides = []
        for name, messages in (("chosen", row.chosen), ("rejected", row.rejected)):
            try:
                sides.append(renderer.render(messages, "last_assistant", row.tools))
            except RowError as e:
                raise e.at(name) from None
        return tuple(sides)
    if isinstance(row, RLRow):
        return (renderer.render_prompt(row.messages, row.tools),)
    return (renderer.render(row.messages, limits.train_on, row.tools),)


def _problem(row: Row, sides: tuple[Rendered, ...], limits: RenderLimits) -> RowError | None:
    longest = max(r.length for r in sides)
    if isinstance(row, RLRow):
        if longest + limits.max_tokens - 1 > limits.sequence_length:
            return RowError(
                f"prompt of {longest} tokens + rl.max_tokens {limits.max_tokens} > "
                f"sequence_length {limits.sequence_length}",
                category=TOO_LONG,
            )
        return None
    # A datum's input is the rendered sequence minus its last token.
    if longest - 1 > limits.sequence_length:
        return RowError(
            f"{longest} tokens > sequence_length {limits.sequence_length} (rows are dropped, "
            "never truncated)",
            category=TOO_LONG,
        )
    if not all(any(w > 0 for w in r.weights[1:]) for r in sides):
        what = "a side has no response tokens" if len(sides) > 1 else "no trained tokens"
        return RowError(f"{what} (final assistant turn weight 0?)", category=NO_WEIGHT)
    return None


def record_render(result: RenderedRow, report: ValidationReport) -> bool:
    """Count in ``report`` the images the renderer left out and, for a row that cannot be
    trained on, move it from valid to dropped. True when the row is kept."""
    row = result.row
    if result.images_dropped:
        report.images_dropped += result.images_dropped
        report.warn(
            row.line,
            f"{result.images_dropped} image(s) not shown to the model (in a system turn, "
            "or over the per-message cap)",
            category="images the chat template leaves out (dropped)",
        )
    if result.problem is None:
        return True
    report.reject(row.line, str(result.problem), result.problem.category, row_images(row))
    return False


def iter_rendered(
    rows: Iterable[Row], renderer: Renderer, limits: RenderLimits, report: ValidationReport
) -> Iterator[RenderedRow]:
    """Yield the rows that can be trained on, rendered, recording the rest in ``report``
    (``record_render``): streaming, so ``validate`` holds one row at a time."""
    for row in rows:
        result = render_row(row, renderer, limits)
        if record_render(result, report):
            yield result


def render_rows(
    rows: Iterable[Row], renderer: Renderer, limits: RenderLimits, report: ValidationReport
) -> list[RenderedRow]:
    return list(iter_rendered(rows, renderer, limits, report))


@dataclass
class RenderReport:
    """What ``build_sft_datums`` kept and dropped, by source line number."""

    total: int = 0
    kept: int = 0
    dropped_too_long: list[tuple[int, int]] = field(default_factory=list)  # (line, tokens)
    dropped_no_weight: list[int] = field(default_factory=list)
    dropped_invalid: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    images_dropped: int = 0
    images_dropped_lines: list[int] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return len(self.dropped_too_long) + len(self.dropped_no_weight) + len(self.dropped_invalid)

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "kept": self.kept,
            "dropped_too_long": [{"line": ln, "tokens": n} for ln, n in self.dropped_too_long],
            "dropped_no_weight": list(self.dropped_no_weight),
            "dropped_invalid": [{"line": ln, "reason": r} for ln, r in self.dropped_invalid],
            "images_dropped": self.images_dropped,
            "images_dropped_lines": list(self.images_dropped_lines),
        }

    def summary(self) -> str:
        return (
            f"{self.kept}/{self.total} examples kept; dropped {len(self.dropped_too_long)} too long, "
            f"{len(self.dropped_no_weight)} with no trained tokens, {len(self.dropped_invalid)} "
            f"invalid; {self.images_dropped} images dropped in {len(self.images_dropped_lines)} rows"
        )


def build_sft_datums(
    rows: Iterable[SFTRow],
    renderer: Renderer,
    *,
    sequence_length: int,
    train_on: TrainOn = "all_assistant",
) -> tuple[list[Datum], RenderReport]:
    """Render rows into Datums. A row whose Datum input would exceed ``sequence_length``
    tokens (rendered length - 1) is dropped and reported, never truncated.

    The checks are ``render_row``'s, the ones training and ``vlmtune data validate
    --config`` apply.
    """
    limits = RenderLimits(sequence_length=sequence_length, train_on=train_on)
    datums: list[Datum] = []
    report = RenderReport()
    for row in rows:
        report.total += 1
        result = render_row(row, renderer, limits)
        if result.images_dropped:
            report.images_dropped += result.images_dropped
            report.images_dropped_lines.append(row.line)
        problem = result.problem
        if problem is None:
            datums.append(datum_from_rendered(result.sides[0], renderer.image_token_id))
            report.kept += 1
        elif problem.category == TOO_LONG:
            report.dropped_too_long.append((row.line, result.length))
        elif problem.category == NO_WEIGHT:
            report.dropped_no_weight.append(row.line)
        else:
            report.dropped_invalid.append((row.line, str(problem)))
    return datums, report


def build_renderer(
    model: str,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    max_images_per_message: int | None = None,
) -> Renderer:
    """The renderer a training engine on ``model`` uses, from its processor files alone
    (no weights). ``max_images_per_message`` as configured (``defaults.image_cap``)."""
    from vlmtune.defaults import image_cap
    from vlmtune.models.loading import resolve_model_files
    from vlmtune.models.vision import ImagePreprocessor

    processor = resolve_model_files(model, min_pixels, max_pixels).processor
    preprocessor = ImagePreprocessor(processor.image_processor, min_pixels, max_pixels)
    return Renderer(processor.tokenizer, preprocessor, image_cap(model, max_images_per_message))
