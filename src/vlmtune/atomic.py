"""Writes that a reader sees whole or not at all: files, and directories that several
processes fill together.

Everything is written beside its target (``os.replace`` is atomic only within one
filesystem) and renamed into place on success. A failure, Ctrl-C or a killed process
leaves the target as it was; a killed process also leaves a hidden ``.<name>.*``
entry beside it, which nothing reads and ``clean_leftovers`` removes. A write the disk
refuses (full, read-only) becomes one ``WriteRefused`` naming the path and the free
space there (``explain_refused_writes``).

Plain data layer: ``data/``, ``models/`` and ``engine/`` all write through this module,
so it imports nothing of theirs. Rank awareness comes in as a ``Ranks`` object.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TextIO


class Ranks(Protocol):
    """The processes that fill one directory together (torchrun ranks, or one process)."""

    @property
    def is_main(self) -> bool:
        """Whether this process creates and publishes the directory (rank 0)."""
        ...

    def share(self, value: str | None) -> str:
        """The main process's ``value`` on every process (the others pass None)."""
        ...

    def all_succeeded(self, ok: bool) -> bool:
        """True on every process when every process passed True (a barrier too)."""
        ...

    def barrier(self) -> None:
        """Wait until every process gets here."""
        ...


class OneProcess:
    """``Ranks`` for a plain run: this process alone writes and publishes."""

    is_main = True

    def share(self, value: str | None) -> str:
        assert value is not None, "the main process names the directory"
        return value

    def all_succeeded(self, ok: bool) -> bool:
        return ok

    def barrier(self) -> None:
        pass


ONE_PROCESS = OneProcess()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp file name beside ``path``, for writers that take a file name
    (safetensors, ``torch.save``); on success it replaces ``path`` in one rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600 files; keep the old file's mode, or the usual 0644.
        os.fchmod(fd, _mode_or(path, 0o644))
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path: str | Path) -> Iterator[TextIO]:
    """Yield a UTF-8 text file beside ``path``; on success it replaces ``path``.

    The data reaches the disk before the rename, so after a crash ``path`` holds the
    old text or the whole new one.
    """
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_dir(path: str | Path, ranks: Ranks = ONE_PROCESS) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; it replaces ``path`` once every rank
    has written into it without an error.

    Under torchrun, rank 0 makes the directory and tells the others its name; every
    rank writes its part (on a filesystem all of them see), and rank 0 publishes it
    only after all ranks succeeded. If any rank fails, the directory is removed on
    every rank's behalf and ``path`` keeps its previous version.
    """
    path = Path(path)
    name: str | None = None
    if ranks.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        name = tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        os.chmod(name, 0o755)  # mkdtemp makes it private; other ranks and readers need it
    tmp = Path(ranks.share(name))
    ok = False
    try:
        yield tmp
        ok = True
    finally:
        # Also collective when this rank raised, so that no other rank waits forever.
        everyone_ok = ranks.all_succeeded(ok)
        try:
            if ranks.is_main:
                if everyone_ok:
                    _publish(tmp, path)
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            ranks.barrier()  # the directory is in place before any rank reads it
    if not everyone_ok:  # this rank succeeded but another did not
        raise RuntimeError(f"{path}: another rank failed while writing it; not published")


def _publish(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``, replacing a previous version (a directory cannot
    be swapped in one rename, so the old one steps aside first)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _mode_or(path: Path, default: int) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return default


# -- what an interrupted write leaves behind -------------------------------------------

# The names the writers above give their temporary entries (``tempfile`` draws 8
# characters of a-z, 0-9 and _): ``atomic_path``'s files, ``atomic_dir``'s folders, and
# ``_publish``'s previous version, set aside for the instant of the swap.
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
_TEMP_DIR = re.compile(r"^\.(?P<name>.+)\.tmp-[a-z0-9_]{8}$")
_SET_ASIDE = re.compile(r"^\.(?P<name>.+)\.old-\d+$")


def clean_leftovers(folder: str | Path) -> list[str]:
    """Remove from ``folder`` what writes killed midway left there; one phrase each.

    A version set aside by ``_publish`` whose replacement never arrived (killed between
    its two renames) is put back, since it is then the only whole copy. Call it only
    while nothing else writes into ``folder`` (a run at its start): a live writer's
    temporary entry looks the same as a dead one's.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done: list[str] = []
    for entry in sorted(folder.iterdir()):
        aside = _SET_ASIDE.match(entry.name)
        if aside and entry.is_dir() and not (folder / aside["name"]).exists():
            os.replace(entry, folder / aside["name"])
            done.append(f"restored {folder / aside['name']} (its replacement was never written)")
        elif aside or _TEMP_DIR.match(entry.name) or _TEMP_FILE.match(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            done.append(f"removed {entry}")
    return done


# -- writes the disk refuses ------------------------------------------------------------

# errno values meaning the filesystem refused the write, not that the data was wrong.
_REFUSED_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)
# The same refusal from writers that drop the errno: torch.save on a full disk raises
# "RuntimeError: [enforce fail at inline_container.cc:...] . PytorchStreamWriter failed
# writing file data/0: file write failed"; safetensors "IoError(Os { code: 28, kind:
# StorageFull, ... })".
_REFUSED_TEXTS = (
    "inline_container.cc",
    "PytorchStreamWriter failed",
    "No space left on device",
    "StorageFull",
    "Disk quota exceeded",
    "Read-only file system",
)


class WriteRefused(Exception):
    """The disk refused to write ``path`` (full, over quota, read-only, no permission)."""

    def __init__(self, path: str | Path, what: str, cause: str) -> None:
        self.path, self.what, self.cause = Path(path), what, cause
        super().__init__(
            f"{path}: could not write {what}: {cause}; {free_space_text(path)} (free some "
            "space or make it writable, or write the run elsewhere with --output)"
        )


def refused_write_cause(exc: BaseException) -> str | None:
    """Why ``exc`` is the disk refusing a write ("No space left on device"), or None when
    it is some other error. Looks inside the ``CheckpointException`` that
    ``torch.distributed.checkpoint`` wraps each rank's error in."""
    if isinstance(exc, WriteRefused):
        return exc.cause
    if isinstance(exc, OSError) and exc.errno in _REFUSED_ERRNOS:
        return os.strerror(exc.errno)
    failures = getattr(exc, "failures", None)  # DCP: {rank: (exception, traceback)}
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException) and (cause := refused_write_cause(inner)):
                return cause
    text = str(exc)
    if any(marker in text for marker in _REFUSED_TEXTS):
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return f"the disk refused the write ({first[:300]})"
    return None


@contextmanager
def explain_refused_writes(path: str | Path, what: str) -> Iterator[None]:
    """Inside, a write the disk refuses comes out as ``WriteRefused`` naming ``path``,
    ``what`` it held and the free space there; any other error passes unchanged."""
    try:
        yield
    except WriteRefused:
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        cause = refused_write_cause(e)
        if cause is None:
            raise
        raise WriteRefused(path, what, cause) from e


def free_space_text(path: str | Path) -> str:
    """For the filesystem ``path`` is (to be) on: "its filesystem has 12.0 GiB free of
    100.0 GiB"."""
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
    except OSError as e:
        return f"the free space of its filesystem is unknown ({e.strerror})"
    return f"its filesystem has {_size(usage.free)} free of {_size(usage.total)}"


def _size(n_bytes: int) -> str:
    if n_bytes < 1024:
        return f"{n_bytes} B"
    size = float(n_bytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"
