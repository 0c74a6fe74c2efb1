"""What a training loop shows while it runs: a rich bar on a terminal, plain lines in a
log (piped, a server job's worker, CI), both with the time left.

The time left is the mean step time of *this process* times the steps still to run.
The mean starts at the end of the process's first step: that step pays for warm-up
(kernel compilation, allocator growth, caches) and would make the estimate of a long
run far too high. Until a second step ends the time left is unknown ("?"). The mean
includes what happens between steps (checkpoints, evals), as the rest of the run
will. A resumed run counts only its remaining steps, at its own pace.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TextIO

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
)
from rich.text import Text

from vlmtune.engine.distributed import is_main_process

# A plain line at most this often (plus the process's first step and the last step):
# enough to see a job is alive, few enough to keep a day-long run's log readable.
PLAIN_LINE_EVERY_S = 10.0
UNKNOWN = "?"


def format_eta(seconds: float | None) -> str:
    """``45s``, ``3m 05s``, ``2h 03m`` (whole seconds, rounded up so that "0s" means
    done); ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:  # None, NaN, a clock jump
        return UNKNOWN
    s = int(-(-seconds // 1))  # ceil
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def eta_seconds(first_step: int, first_t: float, step: int, now: float, total: int) -> float | None:
    """Time left after ``step`` of ``total`` at ``now``: the mean time of the steps
    since ``first_step`` ended (at ``first_t``), times the steps left. None with no
    step since (the first one's time includes warm-up); 0 once every step is done."""
    if step >= total:
        return 0.0
    if step <= first_step:
        return None
    return (now - first_t) / (step - first_step) * (total - step)


class MovingAverage:
    """``sum(totals) / sum(counts)`` over the last ``window`` adds: per-step sums
    weigh each step by its size (a short last batch counts for less)."""

    def __init__(self, window: int) -> None:
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, total: float, count: float = 1.0) -> float:
        self.recent.append((total, count))
        return self.value

    @property
    def value(self) -> float:
        counts = sum(c for _, c in self.recent)
        return sum(t for t, _ in self.recent) / counts if counts else float("nan")

    def __len__(self) -> int:
        return len(self.recent)


def plain_line(step: int, total: int, fields: Sequence[str], eta: float | None) -> str:
    """One progress line of a log: ``step 3/10  loss 1.2345  8.0 ex/s  time left 42s``."""
    return "  ".join([f"step {step}/{total}", *fields, f"time left {format_eta(eta)}"])


class ElapsedColumn(ProgressColumn):
    """``elapsed 1m 05s``, in the plain lines' format; rich redraws it every second, so
    a long step or eval shows a live bar rather than a frozen one."""

    def render(self, task: Task) -> Text:
        return Text(f"elapsed {format_eta(task.elapsed)}", style="progress.elapsed")


class BarAndFields(Progress):
    """The bar, step count and times on one line, the recipe's fields on the next, cut
    to the terminal's width: a narrow terminal loses the end of the fields rather than
    the step count or the time left (one line would squeeze or wrap them all)."""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            fields = Text("   " + task.fields["shown"], no_wrap=True)
            fields.truncate(self.console.width, overflow="ellipsis")
            yield fields


class ProgressBar:
    """A rich bar on a terminal (``BarAndFields``); plain lines (``plain_line``)
    otherwise, after the process's first step, then at most every ``every_s`` seconds,
    and after the last.

    ``update(step, fields)``: ``step`` optimizer steps are done; ``fields`` are what
    the recipe shows of it ("loss 1.2345", "8.0 ex/s"), in order.
    """

    def __init__(
        self,
        total: int,
        start: int,
        description: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = PLAIN_LINE_EVERY_S,
    ) -> None:
        self.stream = stream or sys.stderr  # looked up per bar: tests and notebooks swap it
        self.total, self.clock, self.every_s = total, clock, every_s
        self.enabled = is_main_process()
        self.interactive = self.enabled and self.stream.isatty()
        self.first: tuple[int, float] | None = None  # (step, time) of this process's first
        self.last_print: float | None = None
        self.progress = BarAndFields(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=30),  # the line fits 80 columns
            MofNCompleteColumn(),
            ElapsedColumn(),
            TextColumn("time left {task.fields[left]}"),
            console=Console(file=self.stream),
            disable=not self.interactive,
        )
        self.task = self.progress.add_task(
            description,
            total=total,
            completed=start,
            shown=f"running step {start + 1} ...",  # the recipe's fields once it is done
            left=UNKNOWN,
        )

    def __enter__(self) -> ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def eta(self, step: int, now: float) -> float | None:
        if self.first is None:
            self.first = (step, now)
        return eta_seconds(*self.first, step, now, self.total)

    def update(self, step: int, fields: Sequence[str]) -> None:
        if not self.enabled:
            return
        now = self.clock()
        eta = self.eta(step, now)
        if self.interactive:
            shown = "  ".join(fields)
            self.progress.update(self.task, completed=step, shown=shown, left=format_eta(eta))
            return
        due = self.last_print is None or now - self.last_print >= self.every_s
        if due or step >= self.total:
            self.last_print = now
            print(plain_line(step, self.total, fields, eta), file=self.stream, flush=True)


# -- what each recipe shows of a step -------------------------------------------------


def sft_fields(loss: float, n_examples: int, n_tokens: int, seconds: float) -> list[str]:
    """An SFT step: its loss and throughput (tokens: every position of the step's
    sequences, the prompt and image tokens included)."""
    return [
        f"loss {loss:.4f}",
        f"{n_examples / seconds:.1f} ex/s",
        f"{n_tokens / seconds:,.0f} tok/s",
    ]


def dpo_fields(loss: float, reward_accuracy: float, n_pairs: int, seconds: float) -> list[str]:
    """A DPO step. Its throughput counts pairs, the unit of the data and of the batch
    size, not the two sequences each pair trains."""
    return [
        f"loss {loss:.4f}",
        f"reward accuracy {reward_accuracy:.2f}",
        f"{n_pairs / seconds:.1f} pairs/s",
    ]


def rl_fields(
    reward_mean: float, skipped_share: float, n_steps: int, n_samples: int, seconds: float
) -> list[str]:
    """An RL step: the mean reward (per sample) and the share of skipped groups over the
    last ``n_steps`` steps (one step's few groups are noisy), and the step's completions
    per second."""
    last = "last step" if n_steps == 1 else f"last {n_steps} steps"
    return [
        f"reward {reward_mean:.3f}, {skipped_share:.0%} groups skipped ({last})",
        f"{n_samples / seconds:.1f} samples/s",
    ]
