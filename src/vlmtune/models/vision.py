"""Image preprocessing with fixed pixel limits, shared by rendering, training and sampling.

One ``ImagePreprocessor`` per run: the renderer asks it how many ``<|image_pad|>``
tokens an image becomes, and the engine asks it for the pixels; both must use the same
``min_pixels``/``max_pixels`` or the token count and the vision features disagree.
"""

from __future__ import annotations

import hashlib
import io
import math
import threading
from collections import OrderedDict
from typing import Any

import torch
from PIL import Image


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

        with Image.open(io.BytesIO(data)) as img:
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    return decode_image(data)


class ImagePreprocessor:
    """Wraps a Qwen2-VL-style HF image processor with explicit pixel limits.

    ``min_pixels``/``max_pixels`` default to the processor's own ``size`` limits.
    ``cache_bytes`` bounds the memory of the ``preprocess_bytes`` LRU cache.
    """

    def __init__(
        self,
        image_processor: Any,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        *,
        cache_bytes: int = 256 * 2**20,
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
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._cache_used = 0
        self._lock = threading.Lock()

    @classmethod
    def from_processor(
        cls, processor: Any, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> ImagePreprocessor:
        return cls(processor.image_processor, min_pixels, max_pixels)

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

    def preprocess_bytes(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocess one encoded image; cached by content hash so epochs skip decoding."""
        key = hashlib.sha256(data).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        pixel_values, grid = self.preprocess([decode_image_bytes(data)])
        nbytes = pixel_values.numel() * pixel_values.element_size()
        with self._lock:
            if key not in self._cache and nbytes <= self.cache_bytes:
                self._cache[key] = (pixel_values, grid)
                self._cache_used += nbytes
                while self._cache_used > self.cache_bytes:
                    _, (old_pv, _) = self._cache.popitem(last=False)
                    self._cache_used -= old_pv.numel() * old_pv.element_size()
        return pixel_values, grid

    def preprocess_many(self, datas: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated pixel_values and grids for several encoded images, in order."""
        if not datas:
            return torch.empty(0), torch.empty(0, 3, dtype=torch.long)
        parts = [self.preprocess_bytes(d) for d in datas]
        return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
