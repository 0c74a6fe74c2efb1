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


# Qwen-VL's ids, for a model config that does not name them.
IMAGE_PAD_ID, VISION_START_ID, VISION_END_ID = 151655, 151652, 151653


def image_next_positions(model_input: ModelInput) -> np.ndarray:
    """(N,) bool: whether input position i's next token (its target) is an image token.

    Position i predicts slot i + 1; the last position predicts the final target, which
    follows the input and is text.
    """
    image_N = np.concatenate(
        [np.full(c.length, isinstance(c, ImageChunk)) for c in model_input.chunks]
        or [np.zeros(0, dtype=bool)]
    )
    next_N = np.zeros_like(image_N)
    next_N[:-1] = image_N[1:]
    return next_N


def per_position(values: np.ndarray, image_next_N: np.ndarray, where: str) -> np.ndarray:
    """One value per input position: as sent, or spread from the text-next positions.

    A tensor with one value per position whose next token is text (the old Fireworks
    cookbook's ``target_tokens``, and the zero weights its client adds of that length)
    gets its values there, in order, and 0 at the image-next positions.
    """
    n = image_next_N.size
    n_text = n - int(image_next_N.sum())
    if values.size == n:
        return values
    if values.size == n_text:
        out_N = np.zeros(n, dtype=values.dtype)
        out_N[~image_next_N] = values
        return out_N
    also = (
        f", or one per position whose next token is text ({n_text}: image tokens left out)"
        if n_text != n
        else ""
    )
    raise BadRequest(
        f"{where}: {values.size} values for {n} input positions (send one per input "
        f"position ({n}){also})"
    )


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
    def image_token_id(self) -> int:
        return int(self._config.get("image_token_id", IMAGE_PAD_ID))

    def _placeholder_message(self, token: int) -> str:
        """How to send what a raw ``<|image_pad|>`` run in the text stands for."""
        name = "<|video_pad|>" if token == self._config.get("video_token_id") else "<|image_pad|>"
        start = self._config.get("vision_start_token_id", VISION_START_ID)
        end = self._config.get("vision_end_token_id", VISION_END_ID)
        return (
            f"token {token} is the image placeholder {name}: the model cannot see an image "
            f"from placeholder tokens. Replace the {name} run between <|vision_start|> "
            f"({start}) and <|vision_end|> ({end}) with one image chunk, "
            '{"type": "image", "data": "<base64 PNG or JPEG bytes>", "format": "png" or '
            '"jpeg", "expected_tokens": N} (tinker.types.ImageChunk(data=<bytes>, '
            'format="png", expected_tokens=N)); POST /api/v1/image_token_count gives N'
        )

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
                    raise BadRequest(f"{at}: {self._placeholder_message(raw[0])}")
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
        """The datum in vlmtune's layout: one value per input position for every input.

        Clients lay out ``target_tokens`` two ways at the positions whose next token is
        an image token: with a value there (vlmtune's renderer: the image token id; the
        Fireworks cookbook: the placeholder 0), or text positions only (the Fireworks
        cookbook at 68dc0d97, May 2026), every other input still one per position. Both
        become the first, with the placeholder resolved to the image token id and its
        position out of the loss, so every layout of one example gives one loss.
        """
        model_input = self.model_input(wire.model_input, f"{where}.model_input")
        n = model_input.length
        image_next_N = image_next_positions(model_input)
        inputs = dict(wire.loss_fn_inputs)
        spec = losses.loss_spec(loss_fn)
        missing = [k for k in spec.required_inputs if k not in inputs]
        if missing:
            raise BadRequest(f"{where}: loss {loss_fn!r} needs loss_fn_inputs {missing}")
        known = (*losses.known_inputs(), losses.MASK_INPUT)
        unknown = sorted(set(inputs) - set(known))
        if unknown:
            raise BadRequest(f"{where}: unknown loss_fn_inputs {unknown} (known: {list(known)})")
        values_by_key: dict[str, np.ndarray] = {}
        for key, tensor in inputs.items():
            at = f"{where}.loss_fn_inputs.{key}"
            values_by_key[key] = per_position(tensor.flat(at), image_next_N, at)
        targets_N = values_by_key["target_tokens"]
        if targets_N.size and (targets_N.min() < 0 or targets_N.max() >= self.vocab_size):
            raise BadRequest(
                f"{where}.loss_fn_inputs.target_tokens: ids must be in [0, {self.vocab_size})"
            )
        for key, value in spec.fill.items():
            values_by_key.setdefault(key, np.full(n, value))
        positions_N = values_by_key[spec.positions]
        mask_N = values_by_key.pop(losses.MASK_INPUT, None)
        if mask_N is not None:
            if not np.isin(mask_N, (0, 1)).all():
                raise BadRequest(
                    f"{where}.loss_fn_inputs.{losses.MASK_INPUT}: values must be 0 or 1"
                )
            positions_N = positions_N * mask_N  # a position outside the mask adds no loss
        # The wire placeholder 0 stands for the image token (the only possible next token
        # there): resolved, so forward's log-probs there are the image token's, and out
        # of the loss, as the clients that send it expect.
        placeholder_N = image_next_N & (targets_N == 0)
        targets_N = np.where(placeholder_N, self.image_token_id, targets_N)
        values_by_key["target_tokens"] = targets_N
        values_by_key[spec.positions] = np.where(placeholder_N, 0.0, positions_N)
        out = {
            key: TensorData(data=v.astype(np.int64).tolist(), dtype="int64")
            if key == "target_tokens"
            else TensorData(data=v.astype(np.float32).tolist(), dtype="float32")
            for key, v in values_by_key.items()
        }
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
