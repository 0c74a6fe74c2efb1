"""Reading a TOML job: parse, override, translate the hosted trainer's keys, validate.

Every problem is collected and raised as one ``ConfigError`` naming each TOML key,
before any work starts.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vlmtune.config.schema import ConfigError, JobFile
from vlmtune.hosted_keys import MISSING_KEY_HINTS


def _format_pydantic(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            out.append(f"{key}: unknown key")
        elif e["type"] == "missing":
            out.append(f"{key}: required key is missing{MISSING_KEY_HINTS.get(key, '')}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {_short_repr(got)})"
            message = e["msg"].removeprefix("Value error, ")  # pydantic's, not the user's
            out.append(f"{key}: {message}{shown}")
    return out


def _short_repr(value: Any, limit: int = 80) -> str:
    # A pasted blob (or a 100 000-digit number) should not bury the message naming the key.
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit else "a huge int"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _contradictions(job: JobFile, method: str | None) -> list[str]:
    problems = []
    variety, t = job.algorithm.variety, job.training
    expected_mode = job.finetune_mode
    if t.mode is not None and t.mode != expected_mode:
        problems.append(
            f"training.mode: {t.mode!r} contradicts algorithm.variety = {variety!r} (which means {expected_mode!r})"
        )
    if t.use_qlora and variety != "qlora":
        problems.append(f"training.use_qlora: true contradicts algorithm.variety = {variety!r}")
    several = job.compute.gpu_count * job.compute.nodes > 1
    if variety == "qlora" and several and job.compute.sharding != "replicate":
        problems.append(
            f"compute.sharding: {job.compute.sharding!r} shards weights with FSDP2, which "
            '4-bit weights cannot be; qlora trains data-parallel (sharding = "replicate")'
        )
    if method is not None and method != job.algorithm.method:
        problems.append(
            f"algorithm.method: {job.algorithm.method!r} but the command asks for --type {method}"
        )
    if job.algorithm.method == "rl" and job.algorithm.type != "online":
        problems.append('algorithm.type: RL is online training; set type = "online"')
    if job.algorithm.method in ("sft", "dpo") and job.algorithm.type != "offline":
        problems.append(
            f'algorithm.type: {job.algorithm.method} is offline training; set type = "offline"'
        )
    m = job.model
    if m.min_pixels is not None and m.max_pixels is not None and m.min_pixels > m.max_pixels:
        problems.append(
            f"model.min_pixels: {m.min_pixels} is larger than model.max_pixels = {m.max_pixels}"
        )
    if job.compute.shape_name is not None:
        from vlmtune.planning.shapes import get_shape

        shape = get_shape(job.compute.shape_name)
        if expected_mode not in shape.modes:
            problems.append(
                f"algorithm.variety: {variety!r} is not validated on training shape "
                f"{shape.name!r} (it supports {', '.join(shape.modes)})"
            )
    return problems


def parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value`` with a TOML value (bare words are strings)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except ValueError:  # not TOML (or an int past Python's digit limit): a bare string
        value = raw
    return key.strip().split("."), value


def _read_toml(path: Path) -> dict[str, Any]:
    """The parsed file, or a ConfigError that says why it cannot be read as a job."""
    source = str(path)
    if path.is_dir():
        raise ConfigError(source, ["is a folder, not a TOML job file"])
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(source, ["file not found"]) from None
    except PermissionError:
        raise ConfigError(source, ["cannot be read (permission denied)"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, [f"not a text file (byte {e.start} is not UTF-8)"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"not valid TOML: {e}"]) from None
    except ValueError as e:  # e.g. an integer past Python's 4300-digit limit
        raise ConfigError(source, [f"not a usable TOML job: {str(e)[:200]}"]) from None


def _set_override(raw: dict[str, Any], keys: list[str], value: Any) -> list[str]:
    """Apply one ``a.b.c=value`` override; a path through a non-table is a problem."""
    node = raw
    for depth, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            where = ".".join(keys[: depth + 1])
            return [f"{'.'.join(keys)}: {where} is a value ({node!r}), not a section"]
    node[keys[-1]] = value
    return []


def load_job(
    path: str | Path, overrides: list[str] | None = None, method: str | None = None
) -> JobFile:
    """Read, override and validate a job file; raise ``ConfigError`` listing every problem."""
    path = Path(path)
    source = str(path)
    raw = _read_toml(path)
    problems: list[str] = []
    for item in overrides or []:
        try:
            keys, value = parse_override(item)
        except ValueError as e:
            problems.append(str(e))
            continue
        problems += _set_override(raw, keys, value)
    from vlmtune.job_dialect import get_dotted, translate, unserved_model
    from vlmtune.planning.shapes import apply_shape

    dialect = translate(raw)  # the hosted trainer's keys, before validation
    unserved = unserved_model(get_dotted(raw, "job.model")[1], path.parent)
    if unserved is not None:  # the one thing to say: no other key matters for it
        raise ConfigError(source, [unserved])
    problems += dialect.problems
    shape_problems = apply_shape(raw)  # before validation: a shape may supply job.model
    if shape_problems:
        raise ConfigError(source, problems + shape_problems)
    try:
        job = JobFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(source, problems + _format_pydantic(e)) from None
    problems += _contradictions(job, method)
    if problems:
        raise ConfigError(source, problems)
    job._resolved = [*dialect.changes]
    job._ignored = [str(i) for i in dialect.ignored]
    # A NUL byte is valid TOML but no path can hold one (the OS refuses it).
    nul = [
        f"job.{attr}: contains a NUL byte (\\x00), which no file path can hold"
        for attr in ("model", "data", "validation_data", "image_root")
        if "\x00" in (getattr(job.job, attr) or "")
    ]
    if nul:
        raise ConfigError(source, nul)
    base = path.parent
    for attr in ("data", "validation_data", "image_root"):
        value = getattr(job.job, attr)
        if value is not None and not Path(value).is_absolute():
            setattr(job.job, attr, str((base / value).resolve()))
    job.job.model = _model_from_toml_dir(job.job.model, base)
    return job


def _model_from_toml_dir(model: str, toml_dir: Path) -> str:
    """A relative model directory, as the TOML's folder sees it; names and hub ids as given.

    ``./x`` and ``../x`` are paths whether or not they exist (so an error names the
    directory tried); another relative name is a path only if that directory exists.
    """
    path = Path(model).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = toml_dir / path
    if model.startswith(("./", "../", ".\\", "..\\")) or candidate.is_dir():
        return str(candidate.resolve())
    return model


def dump_toml(job: JobFile) -> str:
    """The resolved job as TOML (written next to every run).

    Keys a training shape owns are written as comments: the file stays loadable
    (setting them as well as the shape is an error) and still shows their values.
    """
    owned: set[str] = set()
    if job.compute.shape_name is not None:
        from vlmtune.planning.shapes import get_shape

        owned = set(get_shape(job.compute.shape_name).owned_keys())
    lines: list[str] = []
    for section, model in job.model_dump().items():
        lines.append(f"[{section}]")
        for key, value in model.items():
            if value is not None:
                prefix = "# (from the shape) " if f"{section}.{key}" in owned else ""
                lines.append(f"{prefix}{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    import json

    return json.dumps(str(v))
