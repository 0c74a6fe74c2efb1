"""The server database's tables: created when missing, and columns added since migrated in."""

from __future__ import annotations

from vlmtune.server.store.db import Db

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    kid TEXT PRIMARY KEY, salt BLOB NOT NULL, digest BLOB NOT NULL,
    label TEXT, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, created REAL NOT NULL, last_seen REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'active', meta TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, session_id TEXT, job_id TEXT, base_model TEXT NOT NULL,
    lora_rank INTEGER NOT NULL, config TEXT NOT NULL, dir TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, last_request REAL NOT NULL,
    user_metadata TEXT NOT NULL DEFAULT '{}', deleted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, path TEXT NOT NULL,
    checkpoint_type TEXT NOT NULL DEFAULT 'state', step INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, user_metadata TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, kind, name));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
    config TEXT NOT NULL, run_dir TEXT, model_id TEXT, error TEXT, exit_code INTEGER,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, type TEXT NOT NULL,
    message TEXT NOT NULL, data TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (job_id, seq));
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, path TEXT NOT NULL, base_model TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sampling_sessions (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, run_id TEXT, path TEXT,
    base_model TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, path TEXT NOT NULL, created REAL NOT NULL,
    tenant TEXT NOT NULL DEFAULT 'default');
CREATE TABLE IF NOT EXISTS deployments (
    tenant TEXT NOT NULL, id TEXT NOT NULL, base_model TEXT NOT NULL, config TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0, loaded_identity TEXT, loaded_run TEXT,
    loaded_path TEXT, load_target TEXT, load_error TEXT, created REAL NOT NULL,
    updated REAL NOT NULL, PRIMARY KEY (tenant, id));
"""

# Columns added after the first release: ``CREATE TABLE IF NOT EXISTS`` leaves an existing
# database's tables as they were, so ``create`` adds each one that is missing.
# Every tenant-owned table carries its owner; a checkpoint belongs to its run's tenant.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("api_keys", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("api_keys", "operator", "INTEGER NOT NULL DEFAULT 0"),
    ("sessions", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("runs", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("jobs", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("models", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
    ("sampling_sessions", "tenant", "TEXT NOT NULL DEFAULT 'default'"),
)


def create(db: Db) -> None:
    """Every table, then each added column an older database lacks."""
    db.script(SCHEMA)
    for table, column, declaration in ADDED_COLUMNS:
        have = {r["name"] for r in db.all(f"PRAGMA table_info({table})")}
        if have and column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
