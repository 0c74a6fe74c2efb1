"""The SDK over HTTP (``connect(base_url)``): the in-process clients' protocol, remote.

Training calls on a client are posted in call order by one submitter thread (a POST
returns once the server has validated and queued it); results are long-polled from a
shared pool, so ``forward_backward`` and ``optim_step`` go back to back. The renderer
is built locally from the same model files and pixel limits as the server's engine.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx

from vlmtune import types as vt
from vlmtune.data.schema import Message
from vlmtune.protocol.bodies import forward_backward_body
from vlmtune.protocol.wire import (
    WireModelInput,
    forward_backward_from_json,
    sample_from_json,
)
from vlmtune.sdk.client import datum_from_conversation
from vlmtune.sdk.futures import APIFuture
from vlmtune.sdk.protocol import CustomLoss

if TYPE_CHECKING:
    import torch

    from vlmtune.render import Renderer

R = TypeVar("R")

_POLL = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="vlmtune-http")


class RemoteError(RuntimeError):
    """The server refused or failed a request; ``status`` is the HTTP status (or 400/500)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclass
class _CustomResult:
    """What ``forward_backward_custom``'s loss gave, kept for its response."""

    loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def _grad(lp: torch.Tensor) -> torch.Tensor:
    """``dloss/dlp``: zeros where the loss never read ``lp`` (autograd leaves it None),
    as in-process, where such a datum just gets no gradient."""
    return lp.grad if lp.grad is not None else lp.new_zeros(lp.shape)


class HttpTransport:
    """Authenticated JSON calls to one server (thread-safe)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        key = api_key or os.environ.get("VLMTUNE_API_KEY") or os.environ.get("TINKER_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.base_url = base_url.rstrip("/")
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        for attempt in range(3):
            try:
                r = self.client.request(method, path, json=body, params=params or None)
                break
            except httpx.ConnectError:  # nothing was sent: safe to retry
                if attempt == 2:
                    raise
                threading.Event().wait(0.5 * (attempt + 1))
        if r.status_code >= 400:
            is_json = r.headers.get("content-type", "").startswith("application/json")
            raise RemoteError(r.status_code, str(r.json().get("detail") if is_json else r.text))
        return r.json()

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, **params)

    def wait(self, request_id: str) -> dict[str, Any]:
        """Poll a future until it is done; raise ``RemoteError`` if it failed."""
        while True:
            out = self.post("/api/v1/retrieve_future", {"request_id": request_id})
            if out.get("type") == "try_again":
                continue
            if "error" in out:
                raise RemoteError(400 if out.get("category") == "user" else 500, out["error"])
            return out

    def call(self, path: str, body: Any) -> dict[str, Any]:
        """Submit a future-returning call and wait for its result."""
        return self.wait(self.post(path, body)["request_id"])


@functools.lru_cache(maxsize=8)
def local_renderer(base_model: str, min_pixels: int, max_pixels: int, cap: int | None) -> Renderer:
    """The renderer the server's engine uses, built here from the same model files."""
    from vlmtune.models.loading import load_processor, resolve_model_path
    from vlmtune.models.vision import ImagePreprocessor
    from vlmtune.render import Renderer

    processor = load_processor(resolve_model_path(base_model), min_pixels, max_pixels)
    ip = ImagePreprocessor(processor.image_processor, min_pixels, max_pixels)
    return Renderer(processor.tokenizer, ip, cap)


class _RendererMixin:
    _info: dict[str, Any]

    @property
    def renderer(self) -> Renderer:
        v = self._info["vlmtune"]
        return local_renderer(
            self._info["model_name"], v["min_pixels"], v["max_pixels"], v["max_images_per_message"]
        )

    def get_tokenizer(self) -> Any:
        return self.renderer.tokenizer


class HttpSamplingClient(_RendererMixin):
    def __init__(self, transport: HttpTransport, session_id: str, info: dict[str, Any]) -> None:
        self.t = transport
        self.sampling_session_id = session_id
        self._info = info

    def _body(
        self, prompt: vt.ModelInput, n: int, params: vt.SamplingParams, **extra: Any
    ) -> dict[str, Any]:
        return {"sampling_session_id": self.sampling_session_id, "num_samples": n,
                "prompt": WireModelInput.of(prompt).model_dump(exclude_none=True),
                "sampling_params": params.model_dump(), **extra}  # fmt: skip

    def sample(
        self,
        prompt: vt.ModelInput,
        num_samples: int = 1,
        sampling_params: vt.SamplingParams | None = None,
    ) -> APIFuture[vt.SampleResponse]:
        body = self._body(prompt, num_samples, sampling_params or vt.SamplingParams())
        return APIFuture(
            _POLL.submit(lambda: sample_from_json(self.t.call("/api/v1/asample", body)))
        )

    def sample_many(
        self,
        prompts: Sequence[vt.ModelInput],
        num_samples: int = 1,
        sampling_params: vt.SamplingParams | None = None,
    ) -> APIFuture[list[vt.SampleResponse]]:
        futures = [self.sample(p, num_samples, sampling_params) for p in prompts]
        return APIFuture(_POLL.submit(lambda: [f.result() for f in futures]))

    def compute_logprobs(self, prompt: vt.ModelInput) -> APIFuture[list[float | None]]:
        body = self._body(prompt, 1, vt.SamplingParams(max_tokens=1), prompt_logprobs=True)
        return APIFuture(
            _POLL.submit(lambda: self.t.call("/api/v1/asample", body)["prompt_logprobs"])
        )


class HttpTrainingClient(_RendererMixin):
    def __init__(self, transport: HttpTransport, model_id: str, info: dict[str, Any]) -> None:
        self.t = transport
        self.model_id = model_id
        self._info = info
        # One thread posts this client's requests, so they reach the server in call order.
        self._submitter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vlmtune")

    def _submit(
        self, post: Callable[[], str], parse: Callable[[dict[str, Any]], R]
    ) -> APIFuture[R]:
        """``post`` (on the submitter thread) returns a request id; a poller parses the result."""
        outer: concurrent.futures.Future[R] = concurrent.futures.Future()

        def fetch(rid: str) -> None:
            try:
                outer.set_result(parse(self.t.wait(rid)))
            except BaseException as e:
                outer.set_exception(e)

        def submit() -> None:
            try:
                _POLL.submit(fetch, post())
            except BaseException as e:
                outer.set_exception(e)

        self._submitter.submit(submit)
        return APIFuture(outer)

    def _post(self, path: str, body: dict[str, Any]) -> str:
        return self.t.post(path, {"model_id": self.model_id, **body})["request_id"]

    def _call(
        self,
        path: str,
        body: Callable[[], dict[str, Any]],
        parse: Callable[[dict[str, Any]], R],
    ) -> APIFuture[R]:
        return self._submit(lambda: self._post(path, body()), parse)

    def _fb(
        self, data: Sequence[vt.Datum], loss_fn: str, config: dict | None, forward_only: bool
    ) -> str:
        body = forward_backward_body(data, loss_fn, config, forward_only)
        return self._post("/api/v1/forward_backward", body)

    def forward(
        self,
        data: Sequence[vt.Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[vt.ForwardBackwardOutput]:
        data = list(data)
        return self._submit(
            lambda: self._fb(data, loss_fn, loss_fn_config, True), forward_backward_from_json
        )

    def forward_backward(
        self,
        data: Sequence[vt.Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[vt.ForwardBackwardOutput]:
        data = list(data)
        return self._submit(
            lambda: self._fb(data, loss_fn, loss_fn_config, False), forward_backward_from_json
        )

    def forward_reference(
        self,
        data: Sequence[vt.Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[vt.ForwardBackwardOutput]:
        """``forward`` under the base model, on the server (a vlmtune route): the values
        the in-process ``forward_reference`` gives, at the positions its loss reads."""
        body = forward_backward_body(data, loss_fn, loss_fn_config)
        return self._call("/api/v1/forward_reference", lambda: body, forward_backward_from_json)

    def forward_backward_custom(
        self, data: Sequence[vt.Datum], loss_fn: CustomLoss, *, logprobs_where: str | None = None
    ) -> APIFuture[vt.ForwardBackwardOutput]:
        """Tinker's method: a forward for logprobs, the loss with autograd here, then a
        forward_backward whose weights are ``-dloss/dlogprobs`` (a linear surrogate with
        the same gradient). Both are posted before any later call on this client.
        ``logprobs_where``: as in-process, logprobs are 0 where that input is 0."""
        import torch

        data, custom = list(data), _CustomResult()
        if logprobs_where is not None:
            from vlmtune.engine.dispatch import check_input_present

            check_input_present(data, logprobs_where)

        def post() -> str:
            # Tinker's forward gives logprobs at every position whatever the weights; ones
            # keep it valid for data that has none (RL's: advantages and logprobs).
            keep = [vt.Datum(model_input=d.model_input, loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": vt.TensorData(data=[1.0] * len(d.loss_fn_inputs["target_tokens"].data),
                                         dtype="float32")}) for d in data]  # fmt: skip
            fwd = forward_backward_from_json(
                self.t.wait(self._fb(keep, "cross_entropy", None, True))
            )
            lps = [torch.tensor(o["logprobs"].data) for o in fwd.loss_fn_outputs]
            if logprobs_where is not None:  # the same values the in-process engine gives
                lps = [lp * (d.loss_fn_inputs[logprobs_where].to_torch() != 0)
                       for lp, d in zip(lps, data, strict=True)]  # fmt: skip
            lps = [lp.requires_grad_() for lp in lps]
            loss, custom.metrics = loss_fn(data, lps)
            loss.backward()
            custom.loss = float(loss.detach())
            linear = [vt.Datum(model_input=d.model_input, loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": vt.TensorData(data=(-_grad(lp)).tolist(), dtype="float32")})
                for d, lp in zip(data, lps, strict=True)]  # fmt: skip
            return self._fb(linear, "cross_entropy", None, False)

        def parse(raw: dict) -> vt.ForwardBackwardOutput:
            out = forward_backward_from_json(raw)
            surrogate = out.metrics.pop("loss:sum", 0.0)
            out.metrics.update(
                {**custom.metrics, "loss:sum": custom.loss, "surrogate_loss:sum": surrogate}
            )
            return out

        return self._submit(post, parse)

    def optim_step(self, adam_params: vt.AdamParams) -> APIFuture[vt.OptimStepResponse]:
        return self._call("/api/v1/optim_step", lambda: {"adam_params": adam_params.model_dump()},
                            lambda o: vt.OptimStepResponse(metrics=o.get("metrics", {})))  # fmt: skip

    def save_state(self, name: str, extra: dict[str, Any] | None = None) -> APIFuture[str]:
        # A local-looking path keeps only its last part: checkpoints live on the server.
        body = {"path": Path(name).name, "overwrite": True, "extra": extra}
        return self._call("/api/v1/save_weights", lambda: body, lambda o: o["path"])

    def load_state(self, path: str) -> APIFuture[dict[str, Any]]:
        return self._call("/api/v1/load_weights", lambda: {"path": path, "optimizer": True},
                            lambda o: o.get("extra") or {})  # fmt: skip

    def save_weights_for_sampler(self, name: str) -> APIFuture[vt.SaveWeightsResponse]:
        return self._call("/api/v1/save_weights_for_sampler", lambda: {"path": Path(name).name},
                            lambda o: vt.SaveWeightsResponse(path=o["path"]))  # fmt: skip

    def save_weights_for_sampler_ext(self, name: str, checkpoint_type: str = "base") -> str:
        """Save a sampler checkpoint (``base``: the adapter; ``merged``: LoRA folded into
        full weights) and return its name, which ``promote_checkpoint`` takes."""
        if checkpoint_type not in ("base", "merged"):
            raise ValueError(f"checkpoint_type must be 'base' or 'merged', got {checkpoint_type!r}")
        body = {"path": name, "checkpoint_type": checkpoint_type}
        return self._call(
            "/api/v1/save_weights_for_sampler", lambda: body, lambda o: o["name"]
        ).result()

    def create_sampling_client(self) -> HttpSamplingClient:
        """A sampler over the live weights: it sees every later ``optim_step``."""
        sid = self._call("/api/v1/save_weights_for_sampler", lambda: {"kind": "inflight"},
                           lambda o: o["sampling_session_id"]).result()  # fmt: skip
        return HttpSamplingClient(self.t, sid, self._info)

    def save_weights_and_get_sampling_client(self, name: str) -> HttpSamplingClient:
        self.save_weights_for_sampler(name).result()
        return self.create_sampling_client()

    def datum_from_messages(
        self, messages: Sequence[Message | dict[str, Any]], train_on: str = "all_assistant"
    ) -> vt.Datum:
        """A next-token datum from a conversation (OpenAI-style dicts or ``Message``s),
        parsed and rendered here exactly as the in-process client does it."""
        return datum_from_conversation(self.renderer, messages, train_on)

    def get_info(self) -> dict[str, Any]:
        info = self.t.post("/api/v1/get_info", {"model_id": self.model_id})
        v = info["vlmtune"]
        return {"base_model": info["model_name"], "mode": v["mode"], "lora_rank": info["lora_rank"] or 0,
                "step": v["step"], "model_id": self.model_id, "job_id": v.get("job_id"),
                "dtype": v.get("dtype")}  # fmt: skip

    def describe(self) -> str:
        v = self.t.post("/api/v1/get_info", {"model_id": self.model_id})["vlmtune"]
        what = v.get("describe") or f"model {self._info['model_name']} ({v['mode']})"
        return f"{what}; run {self.model_id} on {self.t.base_url}"

    def prefetch_images(self, datums: Sequence[vt.Datum], workers: int | None = None) -> str:
        """Nothing to do here: the server preprocesses each image when it first arrives
        (and keeps it in its engine's cache), so only a count is reported."""
        distinct = {
            c.data for d in datums for c in d.model_input.chunks if isinstance(c, vt.ImageChunk)
        }
        return f"images: {len(distinct)} distinct, preprocessed by the server on first use"

    def list_checkpoints(self) -> list[dict[str, Any]]:
        return self.t.get(f"/api/v1/training_runs/{self.model_id}/checkpoints")["checkpoints"]

    def report_link(self) -> dict[str, Any]:
        """``{"url", "expires_at"}``: this run's report page (a curve of each recorded
        ``optim_step``), with a token a browser opens it by (no key, that page, a day)."""
        return run_report_link(self.t, self.model_id)


def run_report_link(transport: HttpTransport, run_id: str) -> dict[str, Any]:
    return transport.get(f"/api/v1/training_runs/{quote(run_id)}/report_link")


def _message_json(m: Message | dict[str, Any]) -> dict[str, Any]:
    if isinstance(m, dict):
        return m
    from vlmtune.data.tools import message_json

    return message_json(m)


def remote_chat_completion(
    server: str, api_key: str | None, model: str, messages: Sequence[Message | dict[str, Any]],
    max_tokens: int = 32,
    temperature: float = 0.0,
    tools: Sequence[dict[str, Any]] = (),
) -> str:  # fmt: skip
    """One greedy chat completion from a served model (messages: OpenAI dicts or ``Message``;
    ``tools``: the row's function specs, rendered as in training)."""
    t = HttpTransport(server, api_key)
    body: dict[str, Any] = {"model": model, "messages": [_message_json(m) for m in messages],
                            "max_tokens": max_tokens, "temperature": temperature}  # fmt: skip
    if tools:
        # "none" would leave them out of the prompt, unlike training; "auto" parses the
        # reply's calls, which are put back as text below.
        body["tools"], body["tool_choice"] = list(tools), "auto"
    message = t.post("/v1/chat/completions", body)["choices"][0]["message"]
    if not message.get("tool_calls"):
        return message["content"]
    # The reply as the model wrote it (calls as <tool_call> text), to compare with a
    # reference answer rendered the same way.
    from vlmtune.data.schema import ToolCall
    from vlmtune.tool_calls import assistant_text

    calls = [ToolCall(c["function"]["name"], c["function"]["arguments"])
             for c in message["tool_calls"]]  # fmt: skip
    return assistant_text(message.get("content") or "", calls)
