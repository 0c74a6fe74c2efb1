"""Decode and preprocess every image of a dataset once, up front, in worker processes.

The training loop then finds each image in the ``ImagePreprocessor``'s memory cache
and never decodes (and, with a ``cache_dir``, a second run never decodes either).
Worker *processes*, not threads: decoding holds the GIL for much of its time and
``vlmtune.data.images.decode_image`` uses ``warnings.catch_warnings``, which mutates
process-global state and is not thread-safe.

Processes cost something to start and to ship tensors back, which small images do
not repay (a 32x32 PNG decodes and preprocesses in under a millisecond). So by default
the first few images are timed in this process and workers start only if the rest
would take longer than ``PARALLEL_MIN_SECONDS`` here and other processes leave at
least two cores idle; disk-cache hits are always read in this process (a file read is
cheaper than a round-trip through a worker).

    stats = prefetch_images(datums, engine.image_preprocessor)
    print(stats.summary())
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset

from vlmtune.models.vision import CacheSource, ImagePreprocessor
from vlmtune.types import Datum, ImageChunk, ModelInput

# Images per worker round-trip: one shared-memory tensor per chunk, not per image
# (each shared segment costs a file descriptor and a few system calls).
_CHUNK = 32
# Below this much estimated in-process work, starting workers does not pay.
PARALLEL_MIN_SECONDS = 2.0


@dataclass
class PrefetchStats:
    images: int = 0  # distinct images seen (by content + settings)
    already_cached: int = 0  # in memory before the call
    decoded: int = 0
    disk_hits: int = 0
    failed: int = 0  # left for the training loop to raise its usual error on
    evicted: int = 0  # prefetched but pushed out of the memory cache by later ones
    workers: int = 0  # processes actually used (0: all in this process)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few failure messages

    def summary(self) -> str:
        text = (
            f"images: {self.images} distinct, {self.already_cached} already cached, "
            f"{self.decoded} decoded, {self.disk_hits} from disk cache, {self.failed} failed "
            f"({self.workers} workers, {self.seconds:.1f}s)"
        )
        if self.evicted:
            text += (
                f"; {self.evicted} did not fit the memory cache and will be "
                "preprocessed again when used (raise cache_bytes or set a cache_dir)"
            )
        return text


def default_workers() -> int:
    """min(4, CPU cores): decoding saturates well before more cores help."""
    return min(4, os.cpu_count() or 1)


def _auto_workers() -> int:
    """``default_workers()``, capped by the cores other processes leave idle.

    On a busy machine workers only take turns on the same cores: measured on a loaded
    2-core box, 2 workers took twice as long as this process alone. Fewer than 2
    usable workers: none (one worker is this process plus shipping costs).
    """
    try:
        busy = max(0.0, os.getloadavg()[0] - 1.0)  # minus this process itself
    except OSError:  # no load average on this platform
        busy = 0.0
    idle = int((os.cpu_count() or 1) - busy)
    n = min(default_workers(), idle)
    return n if n >= 2 else 0


def _image_bytes(items: Iterable[Datum | ModelInput | bytes]) -> Iterable[bytes]:
    for item in items:
        if isinstance(item, (bytes, bytearray, memoryview)):
            yield bytes(item)
            continue
        model_input = item.model_input if isinstance(item, Datum) else item
        for chunk in model_input.chunks:
            if isinstance(chunk, ImageChunk):
                yield chunk.data


class _Chunks(Dataset):
    """Item i: images [i*_CHUNK, (i+1)*_CHUNK) of ``todo``, preprocessed."""

    def __init__(self, preprocessor: ImagePreprocessor, todo: list[tuple[str, bytes]]) -> None:
        # A pickled copy: empty cache, fresh lock, whatever the start method.
        self.preprocessor: ImagePreprocessor = pickle.loads(pickle.dumps(preprocessor))
        self.todo = todo

    def __len__(self) -> int:
        return (len(self.todo) + _CHUNK - 1) // _CHUNK

    def __getitem__(self, index: int) -> dict[str, Any]:
        first = index * _CHUNK
        pixels, grids, patches, sources = [], [], [], []
        source: str
        for key, data in self.todo[first : first + _CHUNK]:
            try:
                pixel_values, grid, source = self.preprocessor.load_or_compute(data, key)
            except Exception as e:  # reported in the stats; the training loop raises it
                pixel_values, grid = None, torch.zeros(1, 3, dtype=torch.long)
                source = f"error: {type(e).__name__}: {e}"
            if pixel_values is not None:
                pixels.append(pixel_values)
            grids.append(grid.reshape(1, 3))
            patches.append(0 if pixel_values is None else pixel_values.shape[0])
            sources.append(source)
        return {
            "first": first,
            "pixels": torch.cat(pixels) if pixels else None,
            "grids": torch.cat(grids),
            "patches": patches,
            "sources": sources,
        }


def _unpack(
    chunk: dict[str, Any],
) -> Iterable[tuple[int, torch.Tensor | None, torch.Tensor, str]]:
    """(position in todo, pixel_values, grid, source) per image of a chunk."""
    pixels = chunk["pixels"]
    offset = 0
    for j, (n, source) in enumerate(zip(chunk["patches"], chunk["sources"], strict=True)):
        # A private copy: a cached view would pin the whole chunk (and, from a worker,
        # its shared-memory segment) for as long as any one of its images is cached.
        pv = None if source.startswith("error") else pixels[offset : offset + n].clone()
        offset += n
        yield chunk["first"] + j, pv, chunk["grids"][j : j + 1].clone(), source


def _no_collate(chunk: dict[str, Any]) -> dict[str, Any]:
    return chunk


def prefetch_images(
    items: Iterable[Datum | ModelInput | bytes],
    preprocessor: ImagePreprocessor,
    workers: int | None = None,
    *,
    multiprocessing_context: str | None = None,
) -> PrefetchStats:
    """Preprocess every distinct image in ``items`` into ``preprocessor``'s caches.

    ``workers``: None (default) picks up to ``default_workers()`` processes, and only
    when the work is big enough to repay them; a number uses exactly that many (0: all
    in this process). ``multiprocessing_context``: e.g. ``"spawn"``/``"forkserver"``
    where forking is unsafe; default: torch's DataLoader default (``fork`` on Linux).
    Images that fail are counted, not raised: the training loop reports them as usual.
    """
    t0 = time.perf_counter()
    fingerprint = preprocessor.fingerprint()
    stats = PrefetchStats()
    todo: dict[str, bytes] = {}
    for data in _image_bytes(items):
        todo.setdefault(preprocessor.cache_key(data, fingerprint), data)
    stats.images = len(todo)
    pending = [(k, d) for k, d in todo.items() if not preprocessor.in_memory(k)]
    stats.already_cached = stats.images - len(pending)
    done: list[str] = []

    def record(
        key: str, pixel_values: torch.Tensor | None, grid: torch.Tensor, source: str
    ) -> None:
        if source.startswith("error"):
            stats.failed += 1
            if len(stats.errors) < 5:
                stats.errors.append(source)
            return
        assert pixel_values is not None  # only a failed image has none
        stats.decoded += source == "decoded"
        stats.disk_hits += source == "disk"
        preprocessor.record_source(cast(CacheSource, source))  # not an error: a cache source
        preprocessor.remember(key, pixel_values, grid)
        done.append(key)

    def in_process(todo_part: list[tuple[str, bytes]]) -> None:
        chunks = _Chunks(preprocessor, todo_part)
        for index in range(len(chunks)):
            for i, pv, grid, source in _unpack(chunks[index]):
                record(todo_part[i][0], pv, grid, source)

    if preprocessor.cache_dir is not None:  # disk hits: read here, no worker round-trip
        misses = []
        for key, data in pending:
            loaded = preprocessor.read_disk(key)
            if loaded is None:
                misses.append((key, data))
            else:
                record(key, *loaded, "disk")
        pending = misses

    n_workers = _auto_workers() if workers is None else max(0, workers)
    if workers is None and n_workers and len(pending) > _CHUNK:
        probe, pending = pending[:_CHUNK], pending[_CHUNK:]
        t_probe = time.perf_counter()
        in_process(probe)
        per_image = (time.perf_counter() - t_probe) / len(probe)
        if per_image * len(pending) < PARALLEL_MIN_SECONDS:
            n_workers = 0
    if n_workers == 0 or len(pending) <= _CHUNK:
        in_process(pending)
    else:
        chunks = _Chunks(preprocessor, pending)
        stats.workers = min(n_workers, len(chunks))
        loader = DataLoader(
            chunks,
            batch_size=None,  # each item already is a chunk
            num_workers=stats.workers,
            # torch types collate_fn for batches (a list); batch_size=None passes items
            collate_fn=_no_collate,  # type: ignore[arg-type]
            multiprocessing_context=multiprocessing_context,
            prefetch_factor=4,
        )
        for chunk in loader:
            for i, pv, grid, source in _unpack(chunk):
                record(pending[i][0], pv, grid, source)
    stats.evicted = sum(1 for k in done if not preprocessor.in_memory(k))
    stats.seconds = time.perf_counter() - t0
    return stats
