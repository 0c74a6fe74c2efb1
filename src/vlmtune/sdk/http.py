"""The SDK over HTTP (``ServiceClient(base_url=...)``): the in-process interface, remote.

Training calls on a client are posted in call order by one submitter thread (a POST
returns once the server has validated and queued it); results are long-polled from a
shared pool, so ``forward_backward`` and ``optim_step`` go back to back. The renderer
is built locally from the same model files and pixel limits as the server's engine.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from vlmtune import types as vt
from vlmtune.sdk.futures import APIFuture

_POLL = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="vlmtune-http")


class RemoteError(RuntimeError):
    """The server refused or failed a request; ``status`` is the HTTP status (or 400/500)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


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


# ---- wire encoding -------------------------------------------------------------------
def model_input_json(mi: vt.ModelInput) -> dict[str, Any]:
    chunks = []
    for c in mi.chunks:
        if isinstance(c, vt.EncodedTextChunk):
            chunks.append({"type": "encoded_text", "tokens": list(c.tokens)})
        else:
            chunks.append({"type": "image", "data": base64.b64encode(c.data).decode(),
                           "format": c.format, "expected_tokens": c.expected_tokens})  # fmt: skip
    return {"chunks": chunks}


def datum_json(d: vt.Datum) -> dict[str, Any]:
    inputs = {k: {"data": list(v.data), "dtype": v.dtype} for k, v in d.loss_fn_inputs.items()}
    return {"model_input": model_input_json(d.model_input), "loss_fn_inputs": inputs}


def _fwdbwd(out: dict[str, Any]) -> vt.ForwardBackwardOutput:
    outputs = [{k: vt.TensorData(**v) for k, v in o.items()} for o in out["loss_fn_outputs"]]
    return vt.ForwardBackwardOutput(loss_fn_outputs=outputs, metrics=out.get("metrics", {}))


def _sample(out: dict[str, Any]) -> vt.SampleResponse:
    seqs = [vt.SampledSequence(tokens=s["tokens"], logprobs=s.get("logprobs"), stop_reason=s["stop_reason"])
            for s in out["sequences"]]  # fmt: skip
    return vt.SampleResponse(sequences=seqs, prompt_logprobs=out.get("prompt_logprobs"))


@functools.lru_cache(maxsize=8)
def local_renderer(base_model: str, min_pixels: int, max_pixels: int, cap: int | None) -> Any:
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
    def renderer(self) -> Any:
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
                "prompt": model_input_json(prompt), "sampling_params": params.model_dump(), **extra}  # fmt: skip

    def sample(
        self,
        prompt: vt.ModelInput,
        num_samples: int = 1,
        sampling_params: vt.SamplingParams | None = None,
    ) -> APIFuture[vt.SampleResponse]:
        body = self._body(prompt, num_samples, sampling_params or vt.SamplingParams())
        return APIFuture(_POLL.submit(lambda: _sample(self.t.call("/api/v1/asample", body))))

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

    def _submit(self, post: Callable[[], str], parse: Callable[[dict], Any]) -> APIFuture:
        """``post`` (on the submitter thread) returns a request id; a poller parses the result."""
        outer: concurrent.futures.Future = concurrent.futures.Future()

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

    def _call(self, path: str, body: Callable[[], dict], parse: Callable[[dict], Any]) -> APIFuture:
        return self._submit(lambda: self._post(path, body()), parse)

    def _fb(
        self, data: Sequence[vt.Datum], loss_fn: str, config: dict | None, forward_only: bool
    ) -> str:
        body = {"forward_only": forward_only, "forward_backward_input": {
            "data": [datum_json(d) for d in data], "loss_fn": loss_fn, "loss_fn_config": config}}  # fmt: skip
        return self._post("/api/v1/forward_backward", body)

    def forward(
        self,
        data: Sequence[vt.Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[vt.ForwardBackwardOutput]:
        data = list(data)
        return self._submit(lambda: self._fb(data, loss_fn, loss_fn_config, True), _fwdbwd)

    def forward_backward(
        self,
        data: Sequence[vt.Datum],
        loss_fn: str = "cross_entropy",
        loss_fn_config: dict | None = None,
    ) -> APIFuture[vt.ForwardBackwardOutput]:
        data = list(data)
        return self._submit(lambda: self._fb(data, loss_fn, loss_fn_config, False), _fwdbwd)

    def forward_backward_custom(
        self, data: Sequence[vt.Datum], loss_fn: Callable, *, logprobs_where: str | None = None
    ) -> APIFuture[vt.ForwardBackwardOutput]:
        """Tinker's method: a forward for logprobs, the loss with autograd here, then a
        forward_backward whose weights are ``-dloss/dlogprobs`` (a linear surrogate with
        the same gradient). Both are posted before any later call on this client.
        ``logprobs_where``: as in-process, logprobs are 0 where that input is 0."""
        import torch

        data, custom = list(data), {}
        if logprobs_where is not None:
            from vlmtune.engine.dispatch import check_input_present

            check_input_present(data, logprobs_where)

        def post() -> str:
            keep = [vt.Datum(model_input=d.model_input, loss_fn_inputs={
                k: v for k, v in d.loss_fn_inputs.items() if k in ("target_tokens", "weights")}) for d in data]  # fmt: skip
            fwd = self.t.wait(self._fb(keep, "cross_entropy", None, True))
            lps = [torch.tensor(o["logprobs"]["data"]) for o in fwd["loss_fn_outputs"]]
            if logprobs_where is not None:  # the same values the in-process engine gives
                lps = [lp * (d.loss_fn_inputs[logprobs_where].to_torch() != 0)
                       for lp, d in zip(lps, data, strict=True)]  # fmt: skip
            lps = [lp.requires_grad_() for lp in lps]
            loss, custom["metrics"] = loss_fn(data, lps)
            loss.backward()
            custom["loss"] = float(loss.detach())
            linear = [vt.Datum(model_input=d.model_input, loss_fn_inputs={
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": vt.TensorData(data=(-lp.grad).tolist(), dtype="float32")})
                for d, lp in zip(data, lps, strict=True)]  # fmt: skip
            return self._fb(linear, "cross_entropy", None, False)

        def parse(raw: dict) -> vt.ForwardBackwardOutput:
            out = _fwdbwd(raw)
            surrogate = out.metrics.pop("loss:sum", 0.0)
            out.metrics.update(
                {**custom["metrics"], "loss:sum": custom["loss"], "surrogate_loss:sum": surrogate}
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
        self, messages: Sequence[Any], train_on: str = "all_assistant"
    ) -> vt.Datum:
        from vlmtune.render import datum_from_rendered

        rendered = self.renderer.render(list(messages), train_on=train_on)
        return datum_from_rendered(rendered, self.renderer.image_token_id)

    def get_info(self) -> dict[str, Any]:
        info = self.t.post("/api/v1/get_info", {"model_id": self.model_id})
        v = info["vlmtune"]
        return {"base_model": info["model_name"], "mode": v["mode"], "lora_rank": info["lora_rank"] or 0,
                "step": v["step"], "model_id": self.model_id, "job_id": v.get("job_id")}  # fmt: skip

    def list_checkpoints(self) -> list[dict[str, Any]]:
        return self.t.get(f"/api/v1/training_runs/{self.model_id}/checkpoints")["checkpoints"]


class HttpServiceClient:
    """``ServiceClient`` whose clients call a server (see ``ServiceClient(base_url=...)``)."""

    def __init__(self, base_url: str, api_key: str | None = None, **engine_defaults: Any) -> None:
        # Deliberately not ServiceClient.__init__ (that one builds nothing remote).
        engine_defaults.pop("checkpoint_root", None)
        engine_defaults.pop("device", None)  # the server picks its device
        self.engine_defaults = engine_defaults
        self.transport = HttpTransport(base_url, api_key)
        self._session: str | None = None
        self._seq = itertools.count()
        self._lock = threading.Lock()

    @property
    def session_id(self) -> str:
        with self._lock:
            if self._session is None:
                self._session = self.transport.post(
                    "/api/v1/create_session", {"tags": [], "sdk_version": "vlmtune"}
                )["session_id"]
            return self._session

    def create_training_client(
        self, base_model: str, lora_rank: int = 0, **engine_kwargs: Any
    ) -> HttpTrainingClient:
        """``lora_rank=0`` fine-tunes every language-model weight; >0 trains a LoRA."""
        kwargs = {**self.engine_defaults, **engine_kwargs}
        kwargs.pop("device", None)
        mode = kwargs.pop("mode", "full" if lora_rank == 0 else "lora")
        if mode not in ("full", "lora") or (mode == "full") != (lora_rank == 0):
            raise ValueError(
                f"over HTTP, mode follows lora_rank (0: full, >0: lora); got mode={mode!r}, lora_rank={lora_rank}"
            )
        body = {"session_id": self.session_id, "model_seq_id": next(self._seq), "base_model": base_model,
                "lora_config": {"rank": lora_rank} if lora_rank else None, "engine": kwargs}  # fmt: skip
        self.transport.call("/api/v1/create_model", body)
        return self.training_client_for(f"{body['session_id']}:train:{body['model_seq_id']}")

    def create_lora_training_client(
        self, base_model: str, rank: int = 16, **engine_kwargs: Any
    ) -> HttpTrainingClient:
        return self.create_training_client(base_model, lora_rank=rank, **engine_kwargs)

    def training_client_for(self, model_id: str) -> HttpTrainingClient:
        """A client for an existing run (e.g. after a restart: it reloads its last state)."""
        info = self.transport.post("/api/v1/get_info", {"model_id": model_id})
        return HttpTrainingClient(self.transport, model_id, info)

    def create_sampling_client(self, base_model: str, **engine_kwargs: Any) -> HttpSamplingClient:
        """Sample from a base model, or a saved checkpoint given as ``tinker://run/...``."""
        key = "model_path" if base_model.startswith("tinker://") else "base_model"
        out = self.transport.post("/api/v1/create_sampling_session", {key: base_model})
        return HttpSamplingClient(self.transport, out["sampling_session_id"], out)


def _message_json(m: Any) -> dict[str, Any]:
    if isinstance(m, dict):
        return m
    from vlmtune.data.refs import data_url
    from vlmtune.data.schema import TextPart

    parts = [{"type": "text", "text": p.text} if isinstance(p, TextPart)
             else {"type": "image_url", "image_url": {"url": data_url(p.data, p.mime)}} for p in m.parts]  # fmt: skip
    return {"role": m.role, "content": parts}


def remote_chat_completion(
    server: str, api_key: str | None, model: str, messages: Sequence[Any], max_tokens: int = 32,
    temperature: float = 0.0,
) -> str:  # fmt: skip
    """One greedy chat completion from a served model (messages: OpenAI dicts or ``Message``)."""
    t = HttpTransport(server, api_key)
    body = {"model": model, "messages": [_message_json(m) for m in messages],
            "max_tokens": max_tokens, "temperature": temperature}  # fmt: skip
    return t.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]
