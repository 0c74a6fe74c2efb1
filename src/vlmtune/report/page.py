"""A run's report as one HTML page: no script, no web font, no link out; plots are
inline SVG and images data URLs, so the file opens anywhere and prints as it shows.

    header     run, method, model, status, steps, wall time, final numbers
    curves     ``plots.train_figures``
    eval       curves over evals, the last eval's numbers, its predictions (wrong, right)
    data       rows kept and dropped by reason, images dropped by the cap
    settings   vision defaults and hosted-key resolutions applied (key, old -> new, why)
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Sequence
from html import escape
from typing import Any

from vlmtune.report.plots import Figure, eval_figures, train_figures
from vlmtune.report.run_data import Predictions, RunData
from vlmtune.report.style import CSS
from vlmtune.report.svg import fmt

METHODS = {"sft": "SFT (supervised fine-tuning)", "dpo": "DPO (direct preference optimization)",
           "rl": "RL (GRPO-style, group-relative rewards)"}  # fmt: skip
# predictions shown per section (a note says how many more): the wrong ones teach more
MAX_CARDS = {"wrong": 60, "right": 24}
MAX_DROP_GROUPS = 20  # drop reasons listed per data file
SUMMARY_SKIP = {"final_dir", "step", "wall_s", "steps"}  # shown elsewhere in the header
# The summary's numbers the header shows first, per method; the rest fold away.
HEADLINE = {
    "sft": ("examples", "final_loss", "eval/loss", "eval/accuracy"),
    "dpo": ("pairs", "final_dpo_loss", "final_reward_accuracy", "eval/dpo_loss",
            "eval/reward_accuracy", "eval/accuracy"),
    "rl": ("prompts", "final_reward_mean", "eval/reward", "eval/accuracy", "reward_errors"),
}  # fmt: skip


# How the recipes' metric names read in a table ("eval/accuracy" -> "eval exact match").
LABELS = {"accuracy": "exact match", "n": "examples evaluated", "reward": "mean reward",
          "dpo_loss": "DPO loss", "wall_s": "wall time"}  # fmt: skip


def label_of(key: str) -> str:
    """``eval/accuracy`` -> ``eval exact match``; ``final_loss`` -> ``last step loss``."""
    prefix, _, name = key.rpartition("/")
    if not prefix and name.startswith("final_"):  # the summary's: the last step's value
        prefix, name = "last step", name.removeprefix("final_")
    words = LABELS.get(name, name.replace("_", " "))
    return f"{prefix} {words}" if prefix else words


def e(value: Any) -> str:
    return escape(str(value))


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return e(value if value is not None else "n/a")
    return f"{value:,}" if isinstance(value, int) else fmt(value)


def metric(key: str, value: Any) -> str:
    """A recorded number as read: a share (accuracy, frac_...) as a percentage."""
    share = key.endswith("accuracy") or key.rpartition("/")[2].startswith("frac_")
    if share and isinstance(value, float) and 0 <= value <= 1:
        return f"{value:.1%}"
    return number(value)


def fact(label: str, value: str, cls: str = "") -> str:
    return f'<div class="fact {cls}"><div class="label">{e(label)}</div><div>{value}</div></div>'


def header(run: RunData, status: str) -> str:
    total, last = run.total_steps, run.last_step
    steps = f"{last:,} of {total:,}" if total else f"{last:,}"
    wall = (run.summary or {}).get("wall_s")
    facts = [
        fact("method", e(METHODS.get(run.method or "", run.method or "unknown"))),
        fact("model", f"<code>{e(run.model or 'unknown')}</code>"),
        fact("status", f'<span class="status {e(status)}">{e(status)}</span>'),
        fact("steps", steps),
        fact("wall time", duration(wall) if isinstance(wall, int | float) else "not recorded"),
    ]
    numbers = {
        k: v
        for k, v in (run.summary or {}).items()
        if k not in SUMMARY_SKIP and not isinstance(v, dict | list)
    }
    headline = [k for k in HEADLINE.get(run.method or "", ()) if k in numbers] or list(numbers)
    out = [f"<header><h1>{e(run.name)}</h1>", f'<div class="facts">{"".join(facts)}</div>']
    if numbers:
        shown = "".join(fact(label_of(k), metric(k, numbers[k]), "num") for k in headline)
        out.append(f'<h3>Final numbers</h3><div class="facts">{shown}</div>')
        rest = [k for k in numbers if k not in headline]
        if rest:
            rows = "".join(
                f"<tr><td>{e(label_of(k))}</td><td class=num>{metric(k, numbers[k])}</td></tr>"
                for k in rest
            )
            out.append(f"<details><summary>{len(rest)} more in summary.json</summary>"
                       f"<table>{rows}</table></details>")  # fmt: skip
    elif run.client_loop:
        out.append(f'<p class="note">The server records each optimizer step your loop '
                   f"makes: {last:,} so far. It runs no evals and writes no summary.</p>")  # fmt: skip
    elif status != "finished":
        out.append(f'<p class="note">No summary.json yet: the run is {e(status)}; '
                   f"the curves show its {last:,} steps so far.</p>")  # fmt: skip
    out.append("</header>")
    return "\n".join(out)


def figures(items: Sequence[Figure]) -> str:
    return "\n".join(
        f"<figure><figcaption><b>{e(f.title)}.</b> {e(f.caption)}</figcaption>{f.svg}</figure>"
        for f in items
    )


def curves(run: RunData) -> str:
    items = train_figures(run)
    if not items:
        return (
            '<section><h2>Training curves</h2><p class="note">No step recorded yet.</p></section>'
        )
    return f'<section><h2>Training curves</h2><div class="grid">{figures(items)}</div></section>'


def evaluation(run: RunData) -> str:
    if not run.evals and run.predictions is None:
        return (
            '<section><h2>Evaluation</h2><p class="note">No eval: the job has no '
            "job.validation_data, or the run has not reached one.</p></section>"
        )
    out = ["<section><h2>Evaluation</h2>"]
    items = eval_figures(run)
    if items:
        out.append(f'<div class="grid">{figures(items)}</div>')
    if run.evals:
        last = run.evals[-1]
        rows = "".join(
            f"<tr><td>{e(label_of(k.removeprefix('eval/')))}</td>"
            f'<td class="num">{metric(k, v)}</td></tr>'
            for k, v in last.items()
            if k.startswith("eval/")
        )
        when = "at the end of training" if run.summary else f"at step {last.get('step')}"
        out.append(f"<h3>Last eval, {e(when)}</h3><table>{rows}</table>")
    if run.predictions is not None:
        out.append(predictions(run.predictions))
    out.append("</section>")
    return "\n".join(out)


def card(record: dict[str, Any], p: Predictions, right: bool) -> str:
    urls = [p.image(name) for name in record.get("images", []) if isinstance(name, str)]
    pictures = "".join(
        f'<img src="{url}" alt="line {e(record.get("line"))}">' for url in urls if url
    )
    prompt = str(record.get("prompt", ""))
    answer_cls = "right" if right else "wrong"
    reference = record.get("answer", "")
    reward = record.get("reward")
    return (
        f'<div class="card {answer_cls}">{pictures}'
        f'<div class="meta">line {e(record.get("line"))}</div>'
        f'<div class="prompt" title="{e(prompt)}">{e(prompt)}</div>'
        f'<div><span class="label">answer</span> <code class="{answer_cls}">'
        f"{e(record.get('prediction', '')) or '<i>(empty)</i>'}</code></div>"
        + (f'<div><span class="label">reference</span> <code>{e(reference)}</code></div>'
           if reference else "")
        + (f'<div><span class="label">reward</span> {number(reward)}</div>'
           if isinstance(reward, int | float) else "")
        + "</div>"
    )  # fmt: skip


def prediction_section(kind: str, title: str, records: list[dict[str, Any]], p: Predictions) -> str:
    shown = records[: MAX_CARDS[kind]]
    more = len(records) - len(shown)
    cards = "".join(card(r, p, kind == "right") for r in shown)
    note = f'<p class="note">and {more:,} more (evals/ in the run directory has all)</p>'
    return (
        f'<div class="predictions {kind}" data-count="{len(records)}">'
        f"<h4>{e(title)} ({len(records):,})</h4>"
        f'<div class="cards">{cards or "<p class=note>none</p>"}</div>'
        f"{note if more > 0 else ''}</div>"
    )


def predictions(p: Predictions) -> str:
    n, right = len(p.records), len(p.right)
    earlier = (
        f" Earlier evals: steps {', '.join(map(str, p.other_steps))} (evals/ in the run directory)."
        if p.other_steps
        else ""
    )
    if p.by_reward:  # no reference answers: the reward tells right from wrong
        heading = f"{right:,} of {n:,} rewarded"
        intro = "the reward it got (no reference answers); unrewarded first"
        titles = ("Not rewarded", "Rewarded")
    else:
        heading = f"{right:,} of {n:,} right"
        intro = "the reference; wrong answers first"
        titles = ("Wrong", "Right")
    return (
        f"<h3>Predictions at step {p.step:,}: {heading}</h3>"
        '<p class="note">Each validation prompt, its image, the model\'s greedy answer and '
        f"{intro}.{earlier}</p>"
        + prediction_section("wrong", titles[0], p.wrong, p)
        + prediction_section("right", titles[1], p.right, p)
    )


def _reason_group(reason: str) -> str:
    """Reasons that differ only in their numbers form one group."""
    return re.sub(r"\d[\d,.]*", "N", reason)


def data_file(role: str, report: dict[str, Any], cap: str) -> str:
    dropped = report.get("dropped", [])
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in dropped:
        groups[_reason_group(str(d.get("reason", "")))].append(d)
    counts = (
        f"<tr><td>rows read</td><td class=num>{number(report.get('total'))}</td></tr>"
        f"<tr><td>kept</td><td class=num>{number(report.get('valid'))}</td></tr>"
        f"<tr><td>dropped</td><td class=num>{len(dropped):,}</td></tr>"
        f"<tr><td>images kept</td><td class=num>{number(report.get('images'))}</td></tr>"
        f"<tr><td>images dropped by the cap{cap}</td>"
        f"<td class=num>{number(report.get('images_dropped'))}</td></tr>"
    )
    out = [f"<h3>{e(role)}: <code>{e(report.get('path', ''))}</code></h3>",
           f'<table class="counts">{counts}</table>']  # fmt: skip
    if groups:
        ranked = sorted(groups.values(), key=lambda items: -len(items))
        rows = "".join(
            f"<tr><td class=num>{len(items):,}</td><td>{e(items[0]['reason'])}</td>"
            f"<td>{e(_lines(items))}</td></tr>"
            for items in ranked[:MAX_DROP_GROUPS]
        )
        out.append(
            "<table><tr><th>rows</th><th>dropped because (e.g.)</th><th>lines</th></tr>"
            f"{rows}</table>"
        )
    warnings = report.get("warnings", [])
    if warnings:
        out.append(f'<p class="note">{len(warnings):,} warning(s), e.g. line '
                   f"{e(warnings[0].get('line'))}: {e(warnings[0].get('message'))}</p>")  # fmt: skip
    return "\n".join(out)


def _lines(items: list[dict[str, Any]], shown: int = 8) -> str:
    lines = ", ".join(str(d.get("line")) for d in items[:shown])
    return lines + (f", ... (+{len(items) - shown:,})" if len(items) > shown else "")


def data_section(run: RunData) -> str:
    if run.data_report is None:
        return '<section><h2>Data</h2><p class="note">No validation_report.json.</p></section>'
    cap = image_cap_text(run)
    parts = [
        data_file("Training data" if role == "train" else "Validation data", report, cap)
        for role, report in run.data_report.items()
        if isinstance(report, dict)
    ]
    return (
        '<section><h2>Data</h2><div class="grid">'
        + "".join(f"<div>{p}</div>" for p in parts)
        + "</div></section>"
    )


def image_cap_text(run: RunData) -> str:
    """`` (N per message)``: the cap the run applied, as training resolves it."""
    from vlmtune.defaults import image_cap

    configured = run.config.get("model", {}).get("max_images_per_message")
    try:
        cap = image_cap(str(run.model or ""), configured if isinstance(configured, int) else None)
    except ValueError:
        return ""
    return " (no cap)" if cap is None else f" ({cap} per message)"


def settings_section(run: RunData) -> str:
    if run.settings is None:
        return (
            '<section><h2>Settings applied</h2><p class="note">Not recorded: this run was '
            "made before vlmtune wrote applied_settings.json (its log lists them).</p></section>"
        )
    changes = [("vision default", c) for c in run.settings.get("vision_defaults", [])]
    changes += [("job file", c) for c in run.settings.get("job_file", [])]
    out = ["<section><h2>Settings applied</h2>"]
    if changes:
        rows = "".join(
            f"<tr><td>{e(source)}</td><td><code>{e(c.get('key'))}</code></td>"
            f"<td><code>{e(_toml(c.get('old')))}</code> &rarr; <code>{e(_toml(c.get('new')))}</code>"
            f"</td><td>{e(c.get('reason'))}</td></tr>"
            for source, c in changes
        )
        out.append(
            '<p class="note">What vlmtune changed in the job before training, and why '
            "(config.toml in the run directory is the job as it ran).</p>"
            "<table><tr><th>from</th><th>key</th><th>job said &rarr; ran with</th><th>why</th>"
            f"</tr>{rows}</table>"
        )
    else:
        out.append('<p class="note">None: the job ran exactly as written.</p>')
    ignored = run.settings.get("ignored_keys", [])
    if ignored:
        items = "".join(f"<li>{e(x)}</li>" for x in ignored)
        out.append(f"<h3>Hosted-trainer keys ignored</h3><ul>{items}</ul>")
    out.append("</section>")
    return "\n".join(out)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, str) else str(value)


def render_page(run: RunData, status: str | None = None) -> str:
    """The whole page. ``status``: as the caller knows it (a server's job state);
    default: ``run.status()`` from the files."""
    status = status or run.status()
    broken = (
        f" {len(run.broken_lines)} line(s) of metrics.jsonl were not JSON and are left out "
        f"(line {', '.join(map(str, run.broken_lines[:5]))})."
        if run.broken_lines
        else ""
    )
    made = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    sections = [header(run, status), curves(run)]
    if not run.client_loop:  # a job's: what a client's loop does not have
        sections += [evaluation(run), data_section(run), settings_section(run)]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(run.name)}: vlmtune report</title><style>{CSS}</style></head>"
        f"<body>{body}<footer>vlmtune report of <code>{e(run.path)}</code>, made {made}."
        f"{e(broken)}</footer></body></html>\n"
    )
