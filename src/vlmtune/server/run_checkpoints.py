"""Finding a run's checkpoints by the names clients give them.

Tinker clients name a checkpoint by its ``tinker://<run>/weights/<name>`` path, or by
its bare name within their own run. The Fireworks clients add two: a bare name saved by
an earlier session (run) of the same trainer job, which a restarted recipe resumes by,
and ``cross_job://<job>/<name>``, another trainer job's checkpoint. A checkpoint whose
run the caller's tenant does not own is unknown, as is one whose files are gone.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.protocol.errors import BadRequest, NotFound, shown
from vlmtune.protocol.paths import is_tinker_path, parse_tinker_path
from vlmtune.server.store import Store

CROSS_JOB = "cross_job://"


def find_checkpoint(
    store: Store,
    ref: str,
    run_id: str | None,
    job_id: str | None,
    kind: str = "training",
    tenant: str | None = None,
) -> dict:
    """The checkpoint row ``ref`` names, seen from run ``run_id`` of trainer job ``job_id``
    (either may be None) by ``tenant`` (None: any).

    A bare name (or a path ending in one, like the Fireworks client's
    ``<account>/run-<hex>/<name>``) is the run's own checkpoint, else the newest of that
    name in any run of the job.
    """
    if ref.startswith(CROSS_JOB):
        source, _, name = ref.removeprefix(CROSS_JOB).partition("/")
        if not source or not name or store.job(source, tenant) is None:
            raise NotFound(f"no trainer job {shown(source)} (in {shown(ref)})")
        return _newest_in_job(store, source, kind, name, tenant, ref)
    if is_tinker_path(ref):
        run_id, kind, name = parse_tinker_path(ref)
    elif run_id is not None or job_id is not None:
        name = Path(ref).name
        own = _owned_row(store, run_id, kind, name, tenant) if run_id is not None else None
        if own is None and job_id is not None:
            return _newest_in_job(store, job_id, kind, name, tenant, ref)
    else:
        raise BadRequest(
            f"checkpoint {shown(ref)}: expected tinker://<run>/<weights|sampler_weights>/<name>"
        )
    row = _owned_row(store, run_id or "", kind, name, tenant)
    if row is None:
        raise NotFound(f"no {kind} checkpoint {name!r} in run {run_id!r}")
    return row


def checkpoint_names(store: Store, run_ids: list[str], kind: str = "training") -> list[str]:
    """The names of the runs' checkpoints of ``kind``, oldest first, each once."""
    rows = [r for run_id in run_ids for r in store.checkpoints(run_id, kind)]
    rows.sort(key=lambda r: r["created"])
    return list(dict.fromkeys(r["name"] for r in rows))


def _owned_row(store: Store, run_id: str, kind: str, name: str, tenant: str | None) -> dict | None:
    """The checkpoint, if its run is ``tenant``'s (None: any) and its files exist."""
    row = store.checkpoint(run_id, kind, name)
    if row is not None and tenant is not None:
        row = row if store.run(run_id, include_deleted=True, tenant=tenant) else None
    return row if row is not None and Path(row["path"]).exists() else None


def _newest_in_job(
    store: Store, job_id: str, kind: str, name: str, tenant: str | None, ref: str
) -> dict:
    rows = sorted(store.job_checkpoints(job_id, kind, name), key=lambda r: -r["created"])
    for row in rows:
        if _owned_row(store, row["run_id"], kind, name, tenant) is not None:
            return row
    raise NotFound(f"no {kind} checkpoint {shown(ref)} in any run of trainer job {job_id!r}")
