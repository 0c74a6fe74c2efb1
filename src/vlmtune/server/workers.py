"""One ordered worker per training run, and the table of futures clients poll.

Clients number their requests on a run (``seq_id`` 1, 2, ...) and may send them over
several connections at once (the ``tinker`` client posts chunk 1 of a batch last), so
arrival order is not submission order. ``SeqWorker`` holds a request that arrives
early until its predecessors are in, then runs everything on one thread: requests on
a run execute exactly in the order they were submitted. A gap that never fills (a
client that died between reserving and sending) is given up on after ``gap_timeout``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("vlmtune.server")


class SeqWorker:
    """Runs submitted callables on one thread in ``seq_id`` order (unnumbered: on arrival)."""

    def __init__(self, name: str, next_seq: int | None = 1, gap_timeout: float = 10.0) -> None:
        self.name = name
        self.gap_timeout = gap_timeout
        self._next = next_seq  # None: accept whatever number comes first
        self._ready: deque[tuple[concurrent.futures.Future, Callable[[], Any]]] = deque()
        self._held: dict[int, tuple[float, concurrent.futures.Future, Callable[[], Any]]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"run-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], seq: int | None = None) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                fut.set_exception(RuntimeError("the server is shutting down"))
                return fut
            if seq is None:
                self._ready.append((fut, fn))
            else:
                self._held[seq] = (time.monotonic(), fut, fn)
                self._release()
            self._cond.notify_all()
        return fut

    def skip(self, seq: int | None) -> None:
        """A numbered request that was rejected: do not wait for it."""
        if seq is not None:
            self.submit(lambda: None, seq)

    def _release(self) -> None:
        # Called with the lock held: move every in-order request to the ready queue.
        while self._held:
            lowest = min(self._held)
            if self._next is None or lowest <= self._next:
                _, fut, fn = self._held.pop(lowest)
                self._ready.append((fut, fn))
                self._next = lowest + 1
            else:
                return

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._ready:
                    if self._closed:
                        return
                    if self._held:
                        lowest = min(self._held)
                        waited = time.monotonic() - self._held[lowest][0]
                        if waited >= self.gap_timeout:
                            log.warning(
                                "run %s: requests before seq %d never arrived; going on",
                                self.name,
                                lowest,
                            )
                            self._next = lowest
                            self._release()
                            continue
                        self._cond.wait(self.gap_timeout - waited)
                    else:
                        self._cond.wait()
                fut, fn = self._ready.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # delivered to the client through the future
                    fut.set_exception(e)

    def close(self, wait: bool = True) -> None:
        with self._cond:
            self._closed = True
            pending = list(self._ready) + [(f, fn) for _, f, fn in self._held.values()]
            self._ready.clear()
            self._held.clear()
            self._cond.notify_all()
        for fut, _ in pending:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("the server is shutting down"))
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)


@dataclass
class Pending:
    future: concurrent.futures.Future
    kind: str
    model_id: str | None
    tenant: str = "default"  # whose request: another tenant's retrieve answers as unknown
    created: float = field(default_factory=time.monotonic)
    retrieved: float | None = None


class FutureRegistry:
    """``request_id`` -> the work's future; results are kept until retrieved (then briefly)."""

    KEEP_RETRIEVED_S = 120.0  # a client may re-fetch after a dropped connection
    KEEP_UNRETRIEVED_S = 3600.0

    def __init__(self) -> None:
        self._items: dict[str, Pending] = {}
        self._lock = threading.Lock()

    def add(
        self,
        future: concurrent.futures.Future,
        kind: str,
        model_id: str | None,
        tenant: str = "default",
    ) -> str:
        request_id = f"req-{uuid.uuid4().hex}"
        now = time.monotonic()
        with self._lock:
            self._items[request_id] = Pending(future, kind, model_id, tenant)
            stale = [
                rid
                for rid, p in self._items.items()
                if p.future.done()
                and (
                    (p.retrieved is not None and now - p.retrieved > self.KEEP_RETRIEVED_S)
                    or now - p.created > self.KEEP_UNRETRIEVED_S
                )
            ]
            for rid in stale:
                del self._items[rid]
        return request_id

    def get(self, request_id: str, tenant: str | None = None) -> Pending | None:
        """The request, if ``tenant`` (None: any) made it."""
        with self._lock:
            pending = self._items.get(request_id)
        if pending is None or tenant not in (None, pending.tenant):
            return None
        return pending

    def mark_retrieved(self, request_id: str) -> None:
        with self._lock:
            p = self._items.get(request_id)
            if p is not None and p.retrieved is None:
                p.retrieved = time.monotonic()

    def __len__(self) -> int:
        return len(self._items)
