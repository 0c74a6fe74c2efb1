"""Image preprocessing with fixed pixel limits, shared by rendering, training and sampling.

One ``ImagePreprocessor`` per run: the renderer asks it how many ``<|image_pad|>``
tokens an image becomes, and the engine asks it for the pixels; both must use the same
``min_pixels``/``max_pixels`` or the token count and the vision features disagree.

Preprocessed pixels are cached in memory (LRU, bounded in bytes) and optionally on disk
(``cache_dir``), keyed by the image bytes *and* every processor setting that changes the
pixels, so a second epoch or a second run on the same data never decodes again, and a
change of limits or normalisation can never serve stale tensors.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from vlmtune.atomic import atomic_path

# Bump when the on-disk layout or the preprocessing semantics change: old files then
# simply stop matching (new keys) instead of being misread.
DISK_CACHE_FORMAT = 1

CacheSource = Literal["memory", "disk", "decoded"]


def _smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    # Same arithmetic as transformers' qwen2_vl smart_resize, which the image processor
    # applies; kept here so token counts need no image and no transformers internals.
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"image aspect ratio must be below 200, got {width}x{height} "
            f"({max(height, width) / min(height, width):.0f})"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def decode_image_bytes(data: bytes) -> Image.Image:
    """Decode to an RGB PIL image, EXIF-oriented (so sizes match ImagePart.width/height)."""
    try:
        from vlmtune.data.images import decode_image  # the data layer's guarded decoder
    except ImportError:  # data layer not available yet: plain PIL, same orientation rule
        from PIL import ImageOps

        with Image.open(io.BytesIO(data)) as raw:
            return ImageOps.exif_transpose(raw).convert("RGB")
    return decode_image(data)


def _plain(value: Any) -> Any:
    """A JSON-stable form of a processor setting (enums, tuples, numpy scalars)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):  # PILImageResampling and other int enums
        return int(value)
    if isinstance(value, float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


@dataclass
class CacheStats:
    """What ``preprocess_bytes`` did in this process (workers keep their own).

    Plain counters for reports, updated without the lock: a rare lost increment under
    concurrent threads is harmless, a lock on the worker path is not.
    """

    memory_hits: int = 0
    disk_hits: int = 0
    decoded: int = 0
    disk_writes: int = 0
    disk_errors: int = 0  # unreadable/unwritable cache files (treated as misses)


class ImagePreprocessor:
    """Wraps a Qwen2-VL-style HF image processor with explicit pixel limits.

    ``min_pixels``/``max_pixels`` default to the processor's own ``size`` limits.
    ``cache_bytes`` bounds the memory of the ``preprocess_bytes`` LRU cache.
    ``cache_dir``, when set, also keeps every preprocessed image there as a safetensors
    file named by ``cache_key`` (content hash + settings fingerprint), written atomically.
    """

    def __init__(
        self,
        image_processor: Any,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        *,
        cache_bytes: int = 256 * 2**20,
        cache_dir: str | Path | None = None,
    ) -> None:
        size = image_processor.size
        self.image_processor = image_processor
        self.min_pixels = int(min_pixels if min_pixels is not None else size["shortest_edge"])
        self.max_pixels = int(max_pixels if max_pixels is not None else size["longest_edge"])
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        self.patch_size = int(image_processor.patch_size)
        self.merge_size = int(image_processor.merge_size)
        self.cache_bytes = cache_bytes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.stats = CacheStats()
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_used = 0
        self._lock = threading.Lock()

    @classmethod
    def from_processor(
        cls,
        processor: Any,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        *,
        cache_dir: str | Path | None = None,
    ) -> ImagePreprocessor:
        return cls(processor.image_processor, min_pixels, max_pixels, cache_dir=cache_dir)

    # Worker processes get a copy without the cache and the lock (neither pickles, and a
    # lock copied by fork while held would deadlock the child).
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_cache=OrderedDict(), _cache_used=0, _lock=None, stats=CacheStats())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def size(self) -> dict[str, int]:
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the processor resizes an image to."""
        h, w = _smart_resize(
            height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels
        )
        return w, h

    def num_tokens(self, width: int, height: int) -> int:
        """Number of ``<|image_pad|>`` tokens for an image of this size."""
        w, h = self.resized_size(width, height)
        return (h // self.patch_size) * (w // self.patch_size) // (self.merge_size**2)

    def preprocess(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [sum patches, C*T*P*P], image_grid_thw [n_images, 3])."""
        out = self.image_processor(images=images, size=self.size, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    # ---- cache keys ------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Everything that changes the pixel tensors an image becomes."""
        import transformers

        ip = self.image_processor
        names = (
            "temporal_patch_size", "image_mean", "image_std", "resample", "do_resize",
            "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb",
        )  # fmt: skip
        return {
            "format": DISK_CACHE_FORMAT,
            "processor_class": f"{type(ip).__module__}.{type(ip).__qualname__}",
            # A transformers upgrade may change resize/normalise numerics: new keys.
            "transformers": transformers.__version__,
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            **{n: _plain(getattr(ip, n, None)) for n in names},
        }

    def fingerprint(self) -> str:
        """sha256 of ``settings()``: equal fingerprints give identical tensors."""
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def cache_key(self, data: bytes, fingerprint: str | None = None) -> str:
        """sha256(image bytes + settings fingerprint): the memory and disk cache key."""
        h = hashlib.sha256(data)
        h.update(b"\0" + (fingerprint or self.fingerprint()).encode())
        return h.hexdigest()

    # ---- cached preprocessing ------------------------------------------------------------
    def preprocess_bytes(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocess one encoded image; cached (memory, then disk) so epochs skip decoding."""
        key = self.cache_key(data)
        hit = self.cached(key)
        if hit is not None:
            return hit
        pixel_values, grid, source = self.load_or_compute(data, key)
        self.record_source(source)
        self.remember(key, pixel_values, grid)
        return pixel_values, grid

    def cached(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The in-memory entry for ``key`` (marked recently used), or None."""
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.stats.memory_hits += 1
            return hit

    def load_or_compute(
        self, data: bytes, key: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, CacheSource]:
        """Disk cache, else decode + preprocess (and write the disk cache).

        Touches neither the memory cache nor the lock, so it is safe in worker processes
        (a lock copied by ``fork`` while another thread held it would never be released).
        """
        key = key or self.cache_key(data)
        if self.cache_dir is not None:
            loaded = self.read_disk(key)
            if loaded is not None:
                return loaded[0], loaded[1], "disk"
        pixel_values, grid = self.preprocess([decode_image_bytes(data)])
        if self.cache_dir is not None:
            self._write_disk(key, pixel_values, grid)
        return pixel_values, grid, "decoded"

    def remember(self, key: str, pixel_values: torch.Tensor, grid: torch.Tensor) -> bool:
        """Put an entry in the memory cache (LRU eviction); False if it alone is too big."""
        nbytes = pixel_values.numel() * pixel_values.element_size()
        with self._lock:
            if key in self._cache:
                return True
            if nbytes > self.cache_bytes:
                return False
            self._cache[key] = (pixel_values, grid)
            self._cache_used += nbytes
            while self._cache_used > self.cache_bytes:
                _, (old_pv, _) = self._cache.popitem(last=False)
                self._cache_used -= old_pv.numel() * old_pv.element_size()
        return True

    def in_memory(self, key: str) -> bool:
        with self._lock:
            return key in self._cache

    def cache_info(self) -> dict[str, Any]:
        """Counters and sizes, for logs and benchmarks."""
        with self._lock:
            n, used = len(self._cache), self._cache_used
        return {**asdict(self.stats), "entries": n, "bytes": used, "capacity": self.cache_bytes}

    def record_source(self, source: CacheSource) -> None:
        """Count where an entry came from (prefetch reports its workers' work here)."""
        if source == "disk":
            self.stats.disk_hits += 1
        elif source == "decoded":
            self.stats.decoded += 1

    def _disk_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        # Two-level fan-out keeps directories small for millions of images.
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def read_disk(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The disk-cache entry for ``key``, or None (absent, or unreadable)."""
        from safetensors.torch import load_file

        path = self._disk_path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            return tensors["pixel_values"], tensors["image_grid_thw"]
        except Exception:  # truncated or foreign file: recompute and overwrite it
            self.stats.disk_errors += 1
            return None

    def _write_disk(self, key: str, pixel_values: torch.Tensor, grid: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._disk_path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Readers (other workers, other runs) see no file or a whole one.
            with atomic_path(path) as tmp:
                save_file(
                    {
                        "pixel_values": pixel_values.contiguous(),
                        "image_grid_thw": grid.contiguous(),
                    },
                    str(tmp),
                    metadata={"settings": json.dumps(self.settings(), sort_keys=True)},
                )
        except OSError:  # a full or read-only disk must not stop training
            self.stats.disk_errors += 1
            return
        self.stats.disk_writes += 1

    def preprocess_many(self, datas: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated pixel_values and grids for several encoded images, in order."""
        if not datas:
            return torch.empty(0), torch.empty(0, 3, dtype=torch.long)
        parts = [self.preprocess_bytes(d) for d in datas]
        return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
