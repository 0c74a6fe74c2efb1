"""Requests on a run execute in submission (seq_id) order, whatever their arrival order."""

from __future__ import annotations

import threading
import time

import pytest

from vlmtune.server.workers import FutureRegistry, SeqWorker


def test_out_of_order_arrivals_run_in_seq_order():
    worker = SeqWorker("t", next_seq=1, gap_timeout=5.0)
    order: list[int] = []
    gate = threading.Event()
    futures = [worker.submit(lambda: gate.wait(5) and order.append(0), None)]
    for seq in (3, 2, 5, 1, 4):  # the client sent 1..5; the network delivered them shuffled
        futures.append(worker.submit(lambda seq=seq: order.append(seq), seq))
    gate.set()
    for f in futures:
        f.result(timeout=5)
    assert order == [0, 1, 2, 3, 4, 5]
    worker.close()


def test_a_rejected_seq_is_skipped_and_a_lost_one_times_out():
    worker = SeqWorker("t", next_seq=1, gap_timeout=0.3)
    worker.skip(1)  # seq 1 failed validation: seq 2 must not wait for it
    assert worker.submit(lambda: "two", 2).result(timeout=1) == "two"
    t0 = time.monotonic()
    assert worker.submit(lambda: "four", 4).result(timeout=5) == "four"  # 3 never comes
    assert time.monotonic() - t0 >= 0.25
    worker.close()
    assert "shutting down" in str(worker.submit(lambda: 1, None).exception())


def test_registry_keeps_results_until_retrieved():
    registry = FutureRegistry()
    worker = SeqWorker("t")
    rid = registry.add(worker.submit(lambda: 42), "x", "model")
    pending = registry.get(rid)
    assert pending is not None and pending.future.result(timeout=5) == 42
    registry.mark_retrieved(rid)
    assert registry.get(rid) is not None  # still there for a re-fetch
    assert registry.get("req-nope") is None
    worker.close()


def test_submit_runs_each_seq_once_and_skips_a_rejected_one(tmp_path):
    from vlmtune.engine.engine import EngineConfig
    from vlmtune.protocol.errors import BadRequest
    from vlmtune.server.runs import Run, RunManager
    from vlmtune.server.store import Store

    registry = FutureRegistry()
    manager = RunManager(Store(tmp_path / "db"), tmp_path, registry)
    run = Run("r", EngineConfig(base_model="m"), tmp_path, None, SeqWorker("r", 1, 30.0))
    ran: list[int] = []

    def prepare(seq: int):
        ran.append(seq)
        return lambda: seq * 10

    def rejected():
        raise BadRequest("seq 2 fails its checks")

    first = manager.submit(run, 1, "x", lambda: prepare(1))
    assert manager.submit(run, 1, "x", lambda: prepare(1)) == first  # a retry: same request
    with pytest.raises(BadRequest):
        manager.submit(run, 2, "x", rejected)
    third = manager.submit(run, 3, "x", lambda: prepare(3))
    # seq 3 does not wait out the 30 s gap for the rejected seq 2.
    assert registry.get(third).future.result(timeout=5) == 30
    assert registry.get(first).future.result(timeout=5) == 10 and ran == [1, 3]
    run.worker.close()
