"""Futures for training calls: ``.result()`` blocks, calls on one client run in order."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class APIFuture(Generic[T]):
    """A pending result. Submit several calls, then wait on each (they run in order)."""

    def __init__(self, inner: concurrent.futures.Future[T]) -> None:
        self._inner = inner

    def result(self, timeout: float | None = None) -> T:
        return self._inner.result(timeout)

    def done(self) -> bool:
        return self._inner.done()

    async def result_async(self) -> T:
        import asyncio

        return await asyncio.wrap_future(self._inner)


class OrderedExecutor:
    """One worker thread: requests on one training run execute in submission order."""

    def __init__(self, name: str) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def submit(self, fn: Callable[..., T], *args: object, **kwargs: object) -> APIFuture[T]:
        return APIFuture(self._pool.submit(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
