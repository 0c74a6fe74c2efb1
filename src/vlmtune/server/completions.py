"""``POST /inference/v1/completions`` on a deployment: token ids (and images) in, tokens out.

The Fireworks SDK's sampler sends a token-id prompt holding one ``<|image_pad|>`` per
entry of ``images`` (data URLs); each pad becomes that image's chunk here, so the
prompt is laid out exactly as a training datum holding the same image. It reads back
``raw_output.completion_token_ids``, the expanded ``prompt_token_ids`` (the prompt of
the sequence it trains on) and per-token ``logprob`` / ``sampling_logprob``. Generation
is vlmtune's own (``inference.sample`` on the deployment's engine); this module only
translates the request and the answer.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from vlmtune.engine.engine import TrainingEngine
from vlmtune.protocol.errors import BadRequest, shown
from vlmtune.protocol.wire import WireImage, WireModel, WireModelInput, WireText
from vlmtune.server.inference import sample
from vlmtune.server.validate import InputValidator
from vlmtune.types import ModelInput, SamplingParams

MAX_PROMPT_TOKENS = 1 << 20
MAX_IMAGES = 64
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
StopText = Annotated[str, Field(min_length=1, max_length=1000)]


class CompletionBody(WireModel):
    """What the SDK's sampler sends; fields it sends for other engines are ignored."""

    model: str = Field(max_length=300, description="accounts/{a}/deployments/{id}")
    prompt: list[TokenId] | Annotated[str, Field(max_length=1 << 22)] = Field(
        description="token ids (one <|image_pad|> per image), or text to tokenize"
    )
    images: list[Annotated[str, Field(max_length=64 << 20)]] = Field(
        [], max_length=MAX_IMAGES, description="data:image/...;base64 URLs, one per pad"
    )
    n: int = Field(1, ge=1, le=16, description="completions of the prompt")
    max_tokens: int = Field(16, ge=1, le=8192, description="new tokens per completion")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    top_k: int = Field(0, ge=-1, le=1 << 20, description="0 or -1: no limit")
    stop: StopText | list[StopText] | list[TokenId] | None = Field(
        None, max_length=16, description="strings (or token ids) that end a completion"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="reproducible sampling")
    logprobs: bool | Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="true (or a count): logprobs.content per token"
    )
    stream: bool = Field(False, description="server-sent events, ending with [DONE]")
    return_token_ids: bool = Field(False, description="choices[].prompt_token_ids (expanded)")
    raw_output: bool = Field(False, description="raw_output is always sent")
    perf_metrics_in_response: bool = Field(False, description="perf_metrics in the answer")
    echo: bool = Field(False, description="not supported: must be false")
    include_routing_matrix: bool = Field(False, description="MoE router replay: unsupported")

    def check_supported(self) -> None:
        if self.echo:
            raise BadRequest(
                "echo: not supported (a prompt's logprobs come from the trainer's forward)"
            )
        if self.include_routing_matrix:
            raise BadRequest("include_routing_matrix: router replay is not supported here")
        if isinstance(self.prompt, list) and not self.prompt:
            raise BadRequest("prompt: empty")
        if isinstance(self.prompt, list) and len(self.prompt) > MAX_PROMPT_TOKENS:
            raise BadRequest(f"prompt: more than {MAX_PROMPT_TOKENS:,} tokens")

    def params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=-1 if self.top_k <= 0 else self.top_k,  # the SDK's 0 is "no limit"
            stop=[self.stop] if isinstance(self.stop, str) else (self.stop or None),
            # A fresh seed per request: the engine restores its RNG after each generation,
            # so unseeded requests would all draw alike (the SDK's n is n requests).
            seed=self.seed if self.seed is not None else secrets.randbits(63),
        )

    @property
    def full_distribution(self) -> bool:
        """Sampling from the model's own distribution: then the sampled tokens' logprobs
        are also the sampling logprobs (vlmtune reports the temperature-1 ones)."""
        return self.temperature == 1 and self.top_p == 1 and self.top_k <= 0


@cache
def image_pad_id(model_dir: Path) -> int:
    """The model's ``<|image_pad|>`` id (its config's ``image_token_id``)."""
    return int(json.loads((model_dir / "config.json").read_text())["image_token_id"])


def decoded_images(urls: list[str]) -> list[WireImage]:
    from vlmtune.data.errors import RowError
    from vlmtune.data.refs import parse_data_url

    out = []
    for i, url in enumerate(urls):
        if not url.startswith("data:"):
            raise BadRequest(
                f"images[{i}]: {shown(url, 60)} is not a data URL (data:image/png;base64,...); "
                "this server fetches no URLs"
            )
        try:
            mime, data = parse_data_url(url)
        except RowError as e:
            raise BadRequest(f"images[{i}]: {e}") from None
        out.append(WireImage(type="image", data=data, format=mime.rpartition("/")[2] or "png"))
    return out


def prompt_input(ids: list[int], images: list[WireImage], validator: InputValidator) -> ModelInput:
    """The prompt with each ``<|image_pad|>`` replaced by its image's chunk, checked as a
    training datum's input is (token ids, image decoding and token counts)."""
    pad = image_pad_id(validator.model_dir)
    pads = ids.count(pad)
    if pads != len(images):
        raise BadRequest(
            f"prompt has {pads} <|image_pad|> token(s) (id {pad}) for {len(images)} image(s): "
            "send one <|image_pad|> per entry of images (the server expands each to the "
            "image's tokens)"
        )
    chunks: list[WireText | WireImage] = []
    text: list[int] = []
    next_image = iter(images)
    for t in ids:
        if t != pad:
            text.append(t)
            continue
        if text:
            chunks.append(WireText(tokens=text))
            text = []
        chunks.append(next(next_image))
    if text:
        chunks.append(WireText(tokens=text))
    return validator.model_input(WireModelInput(chunks=chunks), "prompt")


def complete(
    engine: TrainingEngine,
    body: CompletionBody,
    prompt: ModelInput | None,
    images: list[WireImage],
    validator: InputValidator,
) -> dict[str, Any]:
    """Sample ``body.n`` completions on ``engine`` (its worker thread); a text prompt is
    tokenized here, with the engine's tokenizer."""
    tokenizer = engine.processor.tokenizer
    if prompt is None:
        assert isinstance(body.prompt, str)
        ids = tokenizer.encode(body.prompt, add_special_tokens=False)
        if not ids:
            raise BadRequest("prompt: no tokens")
        prompt = prompt_input(ids, images, validator)
    sequences = sample(engine, prompt, body.n, body.params()).sequences
    choices = []
    for s in sequences:
        assert s.logprobs is not None  # the engine reports every sampled token's
        choices.append(
            {
                "tokens": s.tokens,
                "logprobs": s.logprobs,
                "names": [tokenizer.decode([t]) for t in s.tokens],
                "pieces": token_pieces(engine.renderer.decode, s.tokens),
                "text": engine.renderer.decode(s.tokens),
                "finish": s.stop_reason,
            }
        )
    return {"prompt_ids": prompt.to_ints(engine.image_token_id), "choices": choices}


def token_pieces(decode: Callable[[list[int]], str], tokens: list[int]) -> list[str]:
    """The text each token adds (special tokens: none), decoding a short window at a
    time; a token ending inside a UTF-8 character adds nothing until it is complete."""
    pieces: list[str] = []
    start = done = 0  # decode tokens[start:]; tokens[start:done] is text already given
    for k in range(1, len(tokens) + 1):
        before = decode(tokens[start:done])
        now = decode(tokens[start:k])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            pieces.append(now[len(before) :])
            start, done = done, k
        else:
            pieces.append("")
    full, given = decode(tokens), "".join(pieces)
    if pieces and full.startswith(given):
        pieces[-1] += full[len(given) :]  # what a trailing partial character held back
    return pieces


class Answer:
    """One completion request's answer, as one JSON object or as server-sent events."""

    def __init__(self, body: CompletionBody, result: dict[str, Any], seconds: float) -> None:
        self.body = body
        self.result = result
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.seconds = seconds

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.body.model}  # fmt: skip

    def _tail(self) -> dict[str, Any]:
        prompt = len(self.result["prompt_ids"])
        completion = sum(len(c["tokens"]) for c in self.result["choices"])
        out: dict[str, Any] = {
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }  # fmt: skip
        if self.body.perf_metrics_in_response:
            out["perf_metrics"] = {
                "server-processing-time": f"{self.seconds:.4f}",
                "prompt-tokens": str(prompt),
            }
        return out

    def _entries(self, choice: dict[str, Any]) -> list[dict[str, Any]]:
        exact = self.body.full_distribution
        return [
            {"token": name, "token_id": t, "logprob": lp,
             "sampling_logprob": lp if exact else None, "top_logprobs": []}
            for t, lp, name in zip(choice["tokens"], choice["logprobs"], choice["names"], strict=True)
        ]  # fmt: skip

    def _final(self, i: int, choice: dict[str, Any], text: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": i,
            "text": text,
            "finish_reason": choice["finish"],
            "raw_output": {
                "prompt_token_ids": self.result["prompt_ids"],
                "completion_token_ids": choice["tokens"],
                "completion": choice["text"],
            },
        }
        if self.body.return_token_ids or self.body.images:
            out["prompt_token_ids"] = self.result["prompt_ids"]
        return out

    def json(self) -> dict[str, Any]:
        choices = []
        for i, choice in enumerate(self.result["choices"]):
            out = self._final(i, choice, choice["text"])
            if self.body.logprobs:
                out["logprobs"] = {"content": self._entries(choice)}
            choices.append(out)
        return {**self._head(), "choices": choices, **self._tail()}

    def events(self) -> Iterator[str]:
        """One event per token (its text and logprob), one closing each choice, then the
        usage and ``[DONE]``. The whole answer exists first: the client reads it whole."""
        for i, choice in enumerate(self.result["choices"]):
            entries = self._entries(choice)
            for piece, entry in zip(choice["pieces"], entries, strict=True):
                delta: dict[str, Any] = {"index": i, "text": piece, "finish_reason": None}
                if self.body.logprobs:
                    delta["logprobs"] = {"content": [entry]}
                yield _event({**self._head(), "choices": [delta]})
            yield _event({**self._head(), "choices": [self._final(i, choice, "")]})
        yield _event({**self._head(), "choices": [], **self._tail()})
        yield "data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, allow_nan=False, separators=(',', ':'))}\n\n"
