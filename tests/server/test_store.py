"""The ``server/store/`` package is the only SQL, and ``Store``'s named methods answer what
the server asks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import vlmtune
from vlmtune.server.store import Store

PACKAGE = Path(vlmtune.__file__).parent
STORE = PACKAGE / "server" / "store"
# The trace store (``vlmtune collect``/``filter``) is its own SQLite file, with its own SQL.
TRACE_STORE = PACKAGE / "traces" / "store"
# SQL statements, and the calls that run them or reach past the named methods (into the
# store's connection, or its SQL modules).
SQL = re.compile(
    r"\bSELECT\s|\bINSERT\s+(OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\bCREATE\s+TABLE\b|\bPRAGMA\b|\.execute(script|many)?\(|\bimport sqlite3\b"
    r"|\._db\b|\bserver\.store\.\w+\s+import\b|\bserver\.store\s+import\s+(?!Store\b)"
)


def test_sql_is_written_only_in_the_store_package():
    store_sql = sum(len(SQL.findall(p.read_text())) for p in STORE.glob("*.py"))
    assert store_sql > 20  # the pattern does find SQL
    found = [
        f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.parent not in (STORE, TRACE_STORE)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if SQL.search(line)
    ]
    assert not found, "SQL outside server/store/ (add a named Store method):\n" + "\n".join(found)


def test_named_methods_round_trip(tmp_path):
    store = Store(tmp_path / "server.db")
    store.add_run("r1", session_id="s", job_id="job-1", base_model="m", lora_rank=4,
                  config={"lr": 1}, run_dir="/d", user_metadata=None)  # fmt: skip
    store.add_run("r2", session_id="s", job_id="job-1", base_model="m", lora_rank=0,
                  config={}, run_dir="/e", user_metadata={"k": "v"})  # fmt: skip
    store.touch_run("r1", step=3)
    assert store.run("r1")["step"] == 3 and store.run("r1")["config"] == {"lr": 1}
    store.add_checkpoint("r2", "sampler", "final", "/e/final")
    assert [c["run_id"] for c in store.job_checkpoints("job-1", "sampler", "final")] == ["r2"]

    store.delete_job_runs("job-1")
    assert store.run("r1") is None  # a deleted run is gone from the live view...
    assert store.run("r1", include_deleted=True)["base_model"] == "m"  # ...not from the rows
    assert store.runs_page(10, 0) == ([], 0)
    assert sorted(store.job_run_ids("job-1")) == ["r1", "r2"]

    store.add_job("job-2", "toml", "a", "queued", {"type": "sft"})
    store.add_job("job-3", "toml", "b", "running", {"type": "sft"})
    assert store.next_queued_job()["id"] == "job-2"
    assert [j["id"] for j in store.jobs(kind="toml", state="running")] == ["job-3"]
    store.update_job("job-2", state="running", config={"type": "sft", "resume": True})
    assert store.job("job-2")["config"]["resume"] is True
    with pytest.raises(ValueError, match="no columns"):
        store.update_job("job-2", id="job-9")  # a job's id never changes
    store.close()
