"""``vlmtune.atomic``: a reader sees the previous version or the whole new one, whether
the writer fails, is killed mid-write, or is one of several ranks."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlmtune.atomic import atomic_dir, atomic_path, atomic_write


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _killed_mid_write(code: str) -> None:
    """Run ``code`` in a process that SIGKILLs itself inside it."""
    script = "import os, signal\nfrom vlmtune.atomic import atomic_dir, atomic_write\n" + code
    done = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert done.returncode == -9


def test_atomic_write_replaces_the_file_and_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    with atomic_write(path) as f:
        f.write("one\n")
    assert path.read_text() == "one\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
    path.chmod(0o640)
    with atomic_write(path) as f:
        f.write("two\n")
    assert path.read_text() == "two\n" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_failed_write_leaves_the_previous_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"), atomic_write(path) as f:
        f.write("half of the new")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_a_killed_file_writer_leaves_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("old\n")
    _killed_mid_write(
        f"with atomic_write({str(path)!r}) as f:\n"
        "    f.write('half of the new'); f.flush(); os.fsync(f.fileno())\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert path.read_text() == "old\n"
    assert _visible(tmp_path) == ["data.jsonl"]  # the dead writer's temp file is hidden


def test_a_killed_dir_writer_leaves_the_previous_version(tmp_path: Path) -> None:
    path = tmp_path / "step-2"
    with atomic_dir(path) as tmp:
        (tmp / "weights").write_text("old")
    _killed_mid_write(
        f"with atomic_dir({str(path)!r}) as tmp:\n"
        "    (tmp / 'weights').write_text('new')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert (path / "weights").read_text() == "old"
    assert _visible(tmp_path) == ["step-2"]


def test_atomic_dir_replaces_a_previous_version_or_keeps_it_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "final"
    with atomic_dir(path) as tmp:
        (tmp / "a").write_text("1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # not mkdtemp's private 0700
    with atomic_dir(path) as tmp:
        (tmp / "b").write_text("2")
    assert _visible(path) == ["b"]
    with pytest.raises(OSError), atomic_dir(path) as tmp:
        (tmp / "c").write_text("3")
        raise OSError("disk full")
    assert _visible(path) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temp or old dir left


class _ThreadRanks:
    """``Ranks`` for threads standing in for torchrun processes."""

    def __init__(self, rank: int, shared: dict, barrier: threading.Barrier) -> None:
        self.rank, self.shared, self._barrier = rank, shared, barrier

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, value: str | None) -> str:
        if self.is_main:
            self.shared["name"] = value
        self._barrier.wait()
        return self.shared["name"]

    def all_succeeded(self, ok: bool) -> bool:
        self.shared[f"ok-{self.rank}"] = ok
        self._barrier.wait()
        everyone = all(self.shared[f"ok-{r}"] for r in range(self._barrier.parties))
        self._barrier.wait()  # every rank has read before anyone writes again
        return everyone

    def barrier(self) -> None:
        self._barrier.wait()


def _run_ranks(path: Path, write, world: int = 2) -> list[BaseException | None]:
    """``write(rank, tmp)`` on ``world`` thread-ranks inside one ``atomic_dir``."""
    shared: dict = {}
    barrier = threading.Barrier(world, timeout=30)
    errors: list[BaseException | None] = [None] * world

    def rank_main(rank: int) -> None:
        try:
            with atomic_dir(path, _ThreadRanks(rank, shared, barrier)) as tmp:
                write(rank, tmp)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors[rank] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_rank_0_publishes_only_after_every_rank_wrote(tmp_path: Path) -> None:
    path = tmp_path / "step-4"
    rank_1_may_finish = threading.Event()
    seen_while_writing: list[bool] = []

    def write(rank: int, tmp: Path) -> None:
        if rank == 0:
            (tmp / "shard-0").write_text("0")
            rank_1_may_finish.set()  # rank 0 is done and now waits for rank 1
        else:
            rank_1_may_finish.wait(10)
            time.sleep(0.2)  # time enough for a rank 0 that does not wait to publish
            seen_while_writing.append(path.exists())
            (tmp / "shard-1").write_text("1")

    assert _run_ranks(path, write) == [None, None]
    assert seen_while_writing == [False]  # rank 0 finished first, yet did not publish
    assert _visible(path) == ["shard-0", "shard-1"]
    assert _visible(tmp_path) == ["step-4"]


def test_a_failed_rank_keeps_the_previous_version_on_every_rank(tmp_path: Path) -> None:
    path = tmp_path / "step-4"
    with atomic_dir(path) as tmp:
        (tmp / "shard-0").write_text("old")

    def write(rank: int, tmp: Path) -> None:
        if rank == 1:
            raise OSError("rank 1: disk full")
        (tmp / "shard-0").write_text("new")

    errors = _run_ranks(path, write)
    assert isinstance(errors[1], OSError)
    assert isinstance(errors[0], RuntimeError) and "another rank failed" in str(errors[0])
    assert (path / "shard-0").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["step-4"]
