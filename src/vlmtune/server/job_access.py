"""A TOML job submitted to the server: validated, and confined to what it may read and
write, before it is queued.

Validation is `vlmtune train`'s: ``load_job`` (schema, the hosted trainer's keys, every
problem named by its TOML key) and the checks made before any work that need no model
weights (``job_checks.check_compute``: the model resolves, data files hold something,
LoRA targets exist, this machine can run it). All problems come back in one
``ConfigError``.

Reads. A job reads files uploaded to the server (``job.data = "file-<id>"``, replaced
here by the stored copy's path) and files under the folders the operator allows
(``vlmtune serve --allow-data-root DIR``). Every path it reads (``job.data``,
``job.validation_data``, ``job.image_root``, a local ``job.model`` directory and a local
adapter's base) must resolve, symlinks and ``..`` followed, under one of those folders.
A relative path has no folder to resolve from on the server and is refused. Model names
(built-in, registry, hub ids) are the server's to resolve, from its own cache. The
image paths inside a dataset are held by ``data/refs.py`` to the dataset's folder (an
upload's folder holds only that upload) or to ``job.image_root``.

Writes. A job writes only in its own folder, ``<data-dir>/jobs/<id>/``. The run
directory is always ``run/`` there (``--output``; ``job.output_dir`` is set to the job's
folder, so the stored config says so). A relative ``training.image_cache_dir`` lands in
the job's folder; an absolute one, or one whose ``..`` climbs out, is refused rather
than moved, so that nobody looks for files where the server never wrote them. So is
a ``logging.log_dir`` (TensorBoard) outside it, and an MLflow store on the server's
disk (``logging.mlflow_tracking_uri`` other than an http(s) server); a tracker not
installed on the server is refused at submission.

Code. ``rl.reward`` must be a built-in reward: ``module:function`` and
``file.py:function`` would run code the submitter chose inside the server's worker.
An RL loop with a custom reward runs from the client instead (the recipes work over
the SDK against this server).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vlmtune.config import ConfigError, JobFile, load_job
from vlmtune.protocol.errors import NotFound, shown
from vlmtune.protocol.files import is_file_id
from vlmtune.server.files import FileStore

SOURCE = "config_toml"  # what a problem list is about: the request's field
SUBMITTED_NAME = "submitted.toml"  # the TOML as sent, kept in the job's folder
# What to do instead, by key: a data file can be uploaded, a folder cannot.
UPLOAD_HINT = (
    'or upload it (POST /v1/files, as `vlmtune train --server` does) and write "file-<id>"'
)
HINTS = {
    "job.data": UPLOAD_HINT,
    "job.validation_data": UPLOAD_HINT,
    "job.image_root": "or put the images in the data as data URLs (`vlmtune data inline`)",
}
MODEL_HINT = "or name a model (built-in, registry name or hub id)"


def resolved_roots(roots: Iterable[Path], data_dir: Path) -> tuple[Path, ...]:
    """The folders jobs may read, resolved; ``ValueError`` naming one that is not a folder
    or overlaps the data dir (a job could then read the database and every upload)."""
    data = data_dir.expanduser().resolve()
    out: list[Path] = []
    for given in roots:
        root = Path(given).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"--allow-data-root {given}: not a folder")
        if data.is_relative_to(root) or root.is_relative_to(data):
            raise ValueError(
                f"--allow-data-root {given}: overlaps the server's data dir {data}; jobs "
                "could read its database and every tenant's uploads (allow a folder beside it)"
            )
        out.append(root)
    return tuple(out)


def _is_under(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


@dataclass(frozen=True)
class DataAccess:
    """The server's rule for what a job reads: its uploads and the allowed folders."""

    roots: tuple[Path, ...]  # resolved (``resolved_roots``)
    files: FileStore

    def _outside(self, key: str, value: str, job_dir: Path) -> str | None:
        """Why the job may not read ``value``, or None if it lies under an allowed folder."""
        hint = HINTS.get(key, MODEL_HINT)
        path = Path(value).expanduser()
        if path.is_relative_to(job_dir):  # load_job resolved a relative path from there
            return (
                f"{key}: {shown(path.relative_to(job_dir))} is a relative path, and a job "
                f"on the server has no folder of yours; give an absolute path under a "
                f"folder the server allows, {hint}"
            )
        resolved = path.resolve()  # every symlink and .. followed
        if any(_is_under(resolved, root) for root in self.roots):
            return None
        # Where a link leads is not shown: it is the server's business.
        how = "is" if resolved == path else "resolves (symlinks and .. followed)"
        allowed = (
            f"({', '.join(map(str, self.roots))})"
            if self.roots
            else "(none: the operator allows them with --allow-data-root)"
        )
        return f"{key}: {shown(value)} {how} outside the folders jobs may read {allowed}; {hint}"

    def _data_file(
        self, key: str, value: str, job_dir: Path, tenant: str | None
    ) -> tuple[str, str | None, str | None]:
        """(the path the worker reads, the upload's id if one, a problem)."""
        path = Path(value)
        if path.parent == job_dir and is_file_id(path.name):  # written as "file-<id>"
            try:
                row = self.files.get(path.name, tenant)
            except NotFound:
                unknown = f"{key}: no uploaded file {path.name!r} (GET /v1/files lists yours)"
                return value, None, unknown
            return row["path"], row["id"], None
        problem = self._outside(key, value, job_dir)
        return (str(path.resolve()) if problem is None else value), None, problem

    def confine(
        self, job: JobFile, job_dir: Path, tenant: str | None = None
    ) -> tuple[list[str], list[str]]:
        """Rewrite the job's paths for the server, in place: (problems, the ids of the
        uploads it reads). ``job_dir`` is resolved and held the submitted TOML, so
        load_job resolved relative paths under it. ``tenant``: whose uploads it may name
        (None: anyone's)."""
        unusable = _unusable_paths(job)
        if unusable:
            return unusable, []
        problems: list[str] = []
        file_ids: list[str] = []
        for attr in ("data", "validation_data"):
            value = getattr(job.job, attr)
            if value is None:
                continue
            path, file_id, problem = self._data_file(f"job.{attr}", value, job_dir, tenant)
            setattr(job.job, attr, path)
            problems += [problem] if problem else []
            file_ids += [file_id] if file_id and file_id not in file_ids else []
        if job.job.image_root is not None:
            problem = self._outside("job.image_root", job.job.image_root, job_dir)
            problems += [problem] if problem else []
            if problem is None:  # the folder checked is the folder read
                job.job.image_root = str(Path(job.job.image_root).expanduser().resolve())
        problems += self._model_problems(job.job.model, job_dir)
        problems += _write_problems(job, job_dir)
        if job.algorithm.method == "rl":
            problems += _reward_problems(job)
        return problems, file_ids

    def _model_problems(self, model: str, job_dir: Path) -> list[str]:
        from vlmtune.models.adapters import adapter_base_name

        path = Path(model).expanduser()
        if not path.is_absolute():
            if path.is_dir():  # a folder under the server's working directory, not a name
                return [
                    f"job.model: {shown(model)} is a relative folder on the server; give an "
                    "absolute path under a folder this server allows, or a model name"
                ]
            return []  # a built-in, registry or hosted name, or a hub id
        problem = self._outside("job.model", model, job_dir)
        if problem is not None:
            return [problem]
        if not (path / "adapter_config.json").is_file():
            return []
        try:
            base = adapter_base_name(path)
        except (ValueError, OSError):
            return []  # reported when the checks load it
        if not Path(base).expanduser().is_absolute():
            return []
        key = "job.model (its adapter_config.json's base_model_name_or_path)"
        problem = self._outside(key, base, job_dir)
        return [problem] if problem else []


def _unusable_paths(job: JobFile) -> list[str]:
    """Path values no file name can hold (NUL, an unpaired surrogate): the OS would
    raise on them, so they are refused before any path is looked at."""
    values = {
        "job.data": job.job.data,
        "job.validation_data": job.job.validation_data,
        "job.image_root": job.job.image_root,
        "job.model": job.job.model,
        "job.output_dir": job.job.output_dir,
        "training.image_cache_dir": job.training.image_cache_dir,
    }
    return [
        f"{key}: holds a character no file name can (NUL or a lone surrogate)"
        for key, value in values.items()
        if value is not None and ("\x00" in value or not _encodable(value))
    ]


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _write_problems(job: JobFile, job_dir: Path) -> list[str]:
    """Place what the job writes in its folder; refuse what asks to write elsewhere."""
    problems: list[str] = []
    out = Path(job.job.output_dir).expanduser()
    if out.is_absolute():
        problems.append(
            f"job.output_dir: {shown(job.job.output_dir)} asks the server to write elsewhere; every "
            "job's run is <data-dir>/jobs/<id>/run on the server (remove job.output_dir)"
        )
    else:
        job.job.output_dir = str(job_dir)  # what the run dir really is (--output)
    cache = job.training.image_cache_dir
    if cache is not None:
        placed = (job_dir / Path(cache).expanduser()).resolve()
        if Path(cache).expanduser().is_absolute() or not placed.is_relative_to(job_dir):
            problems.append(
                f"training.image_cache_dir: {shown(cache)} is outside the job's folder, where the "
                "server keeps everything a job writes; give a relative folder name"
            )
        else:
            job.training.image_cache_dir = str(placed)
    from vlmtune.recipes.trackers import server_job_problems  # [logging]'s writes, installs

    return problems + server_job_problems(job, job_dir)


def _reward_problems(job: JobFile) -> list[str]:
    from vlmtune.rewards import BUILTIN_REWARDS, RewardError, resolve_reward

    spec = job.rl.reward
    if spec not in BUILTIN_REWARDS:
        return [
            f"rl.reward: {shown(spec)} would run code of the submitter's choosing in the server's "
            f"worker; jobs on the server use a built-in reward ({', '.join(BUILTIN_REWARDS)}), "
            "and a custom one runs from your machine (the RL recipe over the SDK)"
        ]
    try:
        resolve_reward(spec, regex=job.rl.reward_regex)
    except RewardError as e:
        return [f"rl.reward: {e}"]
    return []


def validated_job(
    text: str,
    type_: str,
    overrides: list[str],
    job_dir: Path,
    access: DataAccess,
    tenant: str | None = None,
) -> tuple[JobFile, list[str]]:
    """The submitted job, validated as `vlmtune train` validates it and confined by
    ``access``: (the job with its paths rewritten, the uploads it reads). ``job_dir``
    exists and is the job's own (empty) folder. Raises ``ConfigError`` listing every
    problem."""
    from vlmtune.job_checks import check_compute  # the same checks as a local run

    job_dir = job_dir.resolve()
    staged = job_dir / SUBMITTED_NAME
    # surrogatepass: a lone surrogate (JSON allows one) is written as is and refused,
    # naming its byte, by load_job's UTF-8 check.
    staged.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        job = load_job(staged, overrides, method=type_)
        problems, file_ids = access.confine(job, job_dir, tenant)
        if not problems:  # only now may the checks open the files the job names
            problems = check_compute(job, None, download=False, machine=True)
    except ConfigError as e:
        raise ConfigError(SOURCE, e.problems) from None
    except OSError as e:  # a name the filesystem refuses (too long...), as a path is tried
        name = shown(e.filename) if e.filename else "a path in the job"
        raise ConfigError(SOURCE, [f"{name}: {e.strerror or e}"]) from None
    except ValueError as e:  # a path no file name can hold (NUL), as load_job resolves it
        raise ConfigError(SOURCE, [f"a path in the job cannot be a file name: {e}"]) from None
    if problems:
        raise ConfigError(SOURCE, problems)
    return job, file_ids
