"""Every check a request's content must pass before an engine sees it.

``InputValidator`` checks each datum against the run's model: token ids in range, no
raw image placeholders in text, images that decode and whose token count matches
``expected_tokens`` (or fills it in), loss inputs of the right length, finite
numbers. Everything that can be wrong with a request is found here, so a bad request
is a 400 and the run's state is untouched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vlmtune.engine import losses
from vlmtune.protocol.bodies import FwdBwdInput
from vlmtune.protocol.errors import BadRequest
from vlmtune.protocol.wire import WireDatum, WireModelInput, WireText
from vlmtune.types import Datum, EncodedTextChunk, ImageChunk, ModelInput, TensorData

if TYPE_CHECKING:
    from vlmtune.models.vision import ImagePreprocessor


@dataclass
class InputValidator:
    """What a request must satisfy for one model and one pair of pixel limits."""

    model_dir: Path
    min_pixels: int
    max_pixels: int

    @cached_property
    def _config(self) -> dict[str, Any]:
        return json.loads((self.model_dir / "config.json").read_text())

    @cached_property
    def vocab_size(self) -> int:
        return int((self._config.get("text_config") or self._config)["vocab_size"])

    @cached_property
    def max_positions(self) -> int:
        text = self._config.get("text_config") or self._config
        return int(text.get("max_position_embeddings", 1 << 20))

    @cached_property
    def placeholder_ids(self) -> set[int]:
        return {
            int(self._config[k])
            for k in ("image_token_id", "video_token_id")
            if self._config.get(k) is not None
        }

    @cached_property
    def preprocessor(self) -> ImagePreprocessor:
        from vlmtune.models.loading import load_processor
        from vlmtune.models.vision import ImagePreprocessor

        processor = load_processor(self.model_dir, self.min_pixels, self.max_pixels)
        return ImagePreprocessor(processor.image_processor, self.min_pixels, self.max_pixels)

    def image_tokens(self, data: bytes, where: str) -> int:
        from vlmtune.data.images import probe_image

        try:
            info = probe_image(data)
            return int(self.preprocessor.num_tokens(info.width, info.height))
        except ValueError as e:
            raise BadRequest(f"{where}: image does not decode: {e}") from None

    def model_input(self, wire: WireModelInput, where: str) -> ModelInput:
        if not wire.chunks:
            raise BadRequest(f"{where}: model input has no chunks")
        chunks: list[EncodedTextChunk | ImageChunk] = []
        for k, c in enumerate(wire.chunks):
            at = f"{where}.chunks[{k}]"
            if isinstance(c, WireText):
                bad = [t for t in c.tokens if not 0 <= t < self.vocab_size]
                if bad:
                    raise BadRequest(
                        f"{at}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
                    )
                raw = [t for t in c.tokens if t in self.placeholder_ids]
                if raw:
                    raise BadRequest(
                        f"{at}: token {raw[0]} is an image placeholder; send images as image chunks"
                    )
                chunks.append(EncodedTextChunk(tokens=c.tokens))
                continue
            actual = self.image_tokens(c.data, at)
            if c.expected_tokens is not None and c.expected_tokens != actual:
                raise BadRequest(
                    f"{at}: image chunk expects {c.expected_tokens} tokens but the processor "
                    f"makes {actual} (min_pixels={self.min_pixels}, max_pixels={self.max_pixels}); "
                    "ask POST /api/v1/image_token_count for the count"
                )
            chunks.append(ImageChunk(data=c.data, format=c.format.lower(), expected_tokens=actual))
        out = ModelInput(chunks=chunks)
        if out.length > self.max_positions:
            raise BadRequest(
                f"{where}: {out.length} positions exceed the model's {self.max_positions}"
            )
        return out

    def datum(self, wire: WireDatum, loss_fn: str, where: str) -> Datum:
        model_input = self.model_input(wire.model_input, f"{where}.model_input")
        n = model_input.length
        inputs = dict(wire.loss_fn_inputs)
        spec = losses.loss_spec(loss_fn)
        missing = [k for k in spec.required_inputs if k not in inputs]
        if missing:
            raise BadRequest(f"{where}: loss {loss_fn!r} needs loss_fn_inputs {missing}")
        known = losses.known_inputs()
        unknown = sorted(set(inputs) - set(known))
        if unknown:
            raise BadRequest(f"{where}: unknown loss_fn_inputs {unknown} (known: {list(known)})")
        out: dict[str, TensorData] = {}
        for key, tensor in inputs.items():
            values = tensor.flat(f"{where}.loss_fn_inputs.{key}")
            if values.size != n:
                raise BadRequest(
                    f"{where}.loss_fn_inputs.{key}: {values.size} values for {n} input positions"
                )
            if key == "target_tokens":
                if values.size and (values.min() < 0 or values.max() >= self.vocab_size):
                    raise BadRequest(
                        f"{where}.loss_fn_inputs.target_tokens: ids must be in [0, {self.vocab_size})"
                    )
                out[key] = TensorData(data=values.astype(np.int64).tolist(), dtype="int64")
            else:
                out[key] = TensorData(data=values.astype(np.float32).tolist(), dtype="float32")
        for key, value in spec.fill.items():
            if key not in out:
                out[key] = TensorData(data=[value] * n, dtype="float32")
        return Datum(model_input=model_input, loss_fn_inputs=out)

    def forward_backward(self, body: FwdBwdInput) -> tuple[list[Datum], dict[str, float]]:
        try:
            spec = losses.loss_spec(body.loss_fn)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        config: dict[str, float] = {}
        for key, value in (body.loss_fn_config or {}).items():
            if key not in spec.config_keys:
                raise BadRequest(f"loss_fn_config: unknown key {key!r} for {body.loss_fn}")
            if not isinstance(value, float | int) or not math.isfinite(value):
                raise BadRequest(f"loss_fn_config.{key}: must be a finite number")
            config[key] = float(value)
        datums = [self.datum(d, body.loss_fn, f"data[{i}]") for i, d in enumerate(body.data)]
        return datums, config
