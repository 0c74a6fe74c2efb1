"""Writes that a reader sees whole or not at all: files, and directories that several
processes fill together.

Everything is written beside its target (``os.replace`` is atomic only within one
filesystem) and renamed into place on success. A failure, Ctrl-C or a killed process
leaves the target as it was; a killed process also leaves a hidden ``.<name>.*``
entry beside it, which nothing reads.

Plain data layer: ``data/``, ``models/`` and ``engine/`` all write through this module,
so it imports nothing of theirs. Rank awareness comes in as a ``Ranks`` object.
"""

from __future__ import annotations

import os
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
