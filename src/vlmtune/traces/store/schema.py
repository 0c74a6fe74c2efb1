"""The trace store's tables, created when missing, and the version that guards them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from vlmtune.traces.store.records import TraceStoreError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (name TEXT PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, split TEXT NOT NULL, seed INTEGER NOT NULL,
    policy TEXT NOT NULL, model TEXT, image_only INTEGER NOT NULL,
    started REAL NOT NULL, ended REAL, episode_return REAL, steps INTEGER NOT NULL DEFAULT 0,
    success INTEGER, achievements TEXT NOT NULL DEFAULT '[]', error TEXT);
CREATE TABLE IF NOT EXISTS steps (
    rollout_id TEXT NOT NULL REFERENCES rollouts(id), idx INTEGER NOT NULL,
    prompt TEXT NOT NULL, prompt_hash TEXT NOT NULL, completion TEXT, action TEXT,
    valid_action INTEGER NOT NULL, reward REAL NOT NULL, done INTEGER NOT NULL,
    expert_action TEXT, info TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (rollout_id, idx));
CREATE TABLE IF NOT EXISTS images (sha256 TEXT PRIMARY KEY, mime TEXT NOT NULL, bytes BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS rollouts_by_task ON rollouts (task, split, policy);
CREATE INDEX IF NOT EXISTS steps_by_prompt ON steps (prompt_hash);
"""


def create(db: sqlite3.Connection, path: Path) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        # Statement by statement: ``executescript`` would commit the transaction first.
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        row = db.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] != SCHEMA_VERSION:
            raise TraceStoreError(
                f"{path}: trace store schema version {row[0]}; this vlmtune reads "
                f"version {SCHEMA_VERSION}"
            )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
