"""What a run records for its report beyond ``metrics.jsonl``: each eval's predictions,
the images they were made on (small copies) and the settings the run changed.

    evals/step-N.jsonl          one line per evaluated row: its line in validation_data,
                                prompt text, the model's answer, the reference, correct
                                (exact match), and in RL the answer's reward
    evals/images/line-L-K.png   the K-th image of that row's prompt, at most
                                ``THUMBNAIL_PX`` a side (written once per row)
    applied_settings.json       the method, and every setting changed before the run:
                                vision defaults and hosted-key resolutions (key, old ->
                                new, why), and the hosted keys ignored

Images are copied small, not referred to by path: a report then opens without the
data file (an upload a server job read may be gone, a path may have moved), and the
copies of a 50-row eval weigh a few hundred kB at most.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from vlmtune.atomic import atomic_path, explain_refused_writes
from vlmtune.config import JobFile
from vlmtune.data.images import decode_image
from vlmtune.data.schema import ImagePart, SFTRow
from vlmtune.evaluation import EvalResult
from vlmtune.recipes.run_dir import RunDir, strict_json
from vlmtune.recipes.run_files import EVALS_DIR, IMAGES_DIR, SETTINGS_FILE
from vlmtune.render import split_prompt_and_answer
from vlmtune.settings import SettingChange

THUMBNAIL_PX = 192  # the longest side of an image copy
PNG_MAX_PIXELS = 128 * 128  # smaller copies stay lossless; larger ones become JPEG
MAX_PROMPT_CHARS = 1000  # a prompt's text as recorded (a report shows a few lines)


def predictions_file(step: int) -> str:
    return f"{EVALS_DIR}/step-{step}.jsonl"


def prompt_text(row: SFTRow) -> str:
    """The text a reader needs to know what was asked: the last user turn's, or, when
    that turn is only images, the last prompt message that has text (a system prompt)."""
    prompt, _ = split_prompt_and_answer(row.messages)
    users = [m for m in prompt if m.role == "user"]
    if users and users[-1].text.strip():
        return users[-1].text.strip()[:MAX_PROMPT_CHARS]
    with_text = [m for m in prompt if m.text.strip()]
    return with_text[-1].text.strip()[:MAX_PROMPT_CHARS] if with_text else ""


def prompt_images(row: SFTRow) -> list[ImagePart]:
    prompt, _ = split_prompt_and_answer(row.messages)
    return [image for m in prompt for image in m.images]


def thumbnail(image: ImagePart) -> tuple[bytes, str]:
    """(encoded bytes, file extension) of a copy at most ``THUMBNAIL_PX`` a side."""
    img = decode_image(image.data)
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    if img.width * img.height <= PNG_MAX_PIXELS:
        img.save(out, format="PNG", optimize=True)
        return out.getvalue(), "png"
    img.save(out, format="JPEG", quality=85)
    return out.getvalue(), "jpg"


def image_names(run: RunDir, row: SFTRow) -> list[str]:
    """The row's prompt images as files under ``evals/images`` (written the first time
    the row is evaluated), relative to the run directory."""
    names = []
    for k, image in enumerate(prompt_images(row)):
        stem = f"{IMAGES_DIR}/line-{row.line}-{k}"
        existing = sorted(run.path.glob(f"{stem}.*"))
        if existing:
            names.append(existing[0].relative_to(run.path).as_posix())
            continue
        try:
            data, ext = thumbnail(image)
        except ValueError:  # validated when loaded; a failure here only loses the copy
            continue
        target = run.path / f"{stem}.{ext}"
        with explain_refused_writes(target, "an eval image"):
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
        names.append(f"{stem}.{ext}")
    return names


def prediction_records(
    run: RunDir,
    rows: Sequence[SFTRow],
    result: EvalResult,
    rewards: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """One record per prediction of ``result``, made on ``rows`` (matched by line);
    ``rewards``: RL's reward of each prediction, recorded beside it."""
    by_line = {row.line: row for row in rows}
    records = []
    for i, p in enumerate(result.predictions):
        row = by_line[p["line"]]
        record = {
            "line": p["line"],
            "prompt": prompt_text(row),
            "images": image_names(run, row),
            "prediction": p["prediction"],
            "answer": p["answer"],
            "correct": bool(p["correct"]),
        }
        if rewards is not None:
            record["reward"] = rewards[i]
        records.append(record)
    return records


def write_eval_predictions(
    run: RunDir,
    step: int,
    rows: Sequence[SFTRow],
    result: EvalResult,
    rewards: Sequence[float] | None = None,
) -> None:
    """``evals/step-<step>.jsonl`` and the images it names (rank 0 only)."""
    if not run.main:
        return
    lines = [strict_json(r) for r in prediction_records(run, rows, result, rewards)]
    run.write_text(predictions_file(step), "".join(f"{line}\n" for line in lines))


def change_json(change: SettingChange) -> dict[str, Any]:
    return {"key": change.key, "old": change.old, "new": change.new, "reason": change.reason}


def write_applied_settings(
    run: RunDir, job: JobFile, method: str, vision: Sequence[SettingChange]
) -> None:
    """``applied_settings.json``: what the run changed before it began, for its report."""
    run.write_json(
        SETTINGS_FILE,
        {
            "method": method,
            "vision_defaults": [change_json(c) for c in vision],
            "job_file": [change_json(c) for c in job.resolved_settings],
            "ignored_keys": job.ignored_keys,
        },
    )
