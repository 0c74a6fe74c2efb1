"""The service client over HTTP (``connect(base_url)``): runs created on a server.

A run created here is configured as the in-process one would be: every
``engine.RUN_SETTINGS`` value travels with ``create_model``. What the host decides
(``engine.HOST_SETTINGS``: device, sharding, disk caches) is the server's.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from vlmtune.engine.engine import HOST_SETTINGS, RUN_SETTINGS, EngineConfig
from vlmtune.protocol.paths import is_tinker_path
from vlmtune.sdk.http import (
    HttpSamplingClient,
    HttpTrainingClient,
    HttpTransport,
    run_report_link,
)
from vlmtune.types import lora_rank_of, mode_for

# Host settings a remote run leaves to the server without complaint: the device is the
# server's, and a client's cache folder means nothing on the server's disk.
_SERVER_DECIDES = ("device", "image_cache_dir")


def remote_settings(config: EngineConfig) -> tuple[int, dict[str, Any]]:
    """(lora_rank, engine settings) that make a server build ``config``'s run.

    Raises ``ValueError`` for what a server cannot honour: QLoRA, or sharding and CPU
    offload, which are the server's to decide (one process per run there).
    """
    if config.mode == "qlora":
        raise ValueError("over HTTP a run is full or LoRA; the server does not train QLoRA")
    defaults = {f.name: f.default for f in fields(EngineConfig)}
    refused = [
        f"{k}={getattr(config, k)!r}"
        for k in HOST_SETTINGS
        if k not in _SERVER_DECIDES and getattr(config, k) != defaults[k]
    ]
    if refused:
        raise ValueError(
            f"{', '.join(refused)}: sharding and offload are the server's to choose; "
            "a remote run cannot ask for them"
        )
    rank = lora_rank_of(config.mode, config.lora_rank)
    return rank, {k: getattr(config, k) for k in RUN_SETTINGS}


class HttpServiceClient:
    """``ServiceClientProtocol`` whose clients call a server (see ``connect``)."""

    def __init__(self, base_url: str, api_key: str | None = None, **engine_defaults: Any) -> None:
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
        mode = kwargs.pop("mode", None) or mode_for(lora_rank)
        if mode != mode_for(lora_rank):
            raise ValueError(
                f"over HTTP, mode follows lora_rank (0: full, >0: lora); got mode={mode!r}, lora_rank={lora_rank}"
            )
        return self._create(base_model, lora_rank, kwargs)

    def create_lora_training_client(
        self, base_model: str, rank: int = 16, **engine_kwargs: Any
    ) -> HttpTrainingClient:
        return self.create_training_client(base_model, lora_rank=rank, **engine_kwargs)

    def create_training_client_from_config(
        self, config: EngineConfig, checkpoint_dir: str | Path | None = None
    ) -> HttpTrainingClient:
        """A run configured as ``config`` (this service's defaults do not apply).
        ``checkpoint_dir`` is unused: the server keeps checkpoints under its data dir."""
        rank, settings = remote_settings(config)
        return self._create(config.base_model, rank, settings)

    def _create(
        self, base_model: str, lora_rank: int, engine: dict[str, Any]
    ) -> HttpTrainingClient:
        body = {"session_id": self.session_id, "model_seq_id": next(self._seq), "base_model": base_model,
                "lora_config": {"rank": lora_rank} if lora_rank else None, "engine": engine}  # fmt: skip
        self.transport.call("/api/v1/create_model", body)
        return self.training_client_for(f"{body['session_id']}:train:{body['model_seq_id']}")

    def training_client_for(self, model_id: str) -> HttpTrainingClient:
        """A client for an existing run (e.g. after a restart: it reloads its last state)."""
        info = self.transport.post("/api/v1/get_info", {"model_id": model_id})
        return HttpTrainingClient(self.transport, model_id, info)

    def report_link(self, run_id: str) -> dict[str, Any]:
        """``{"url", "expires_at"}``: run ``run_id``'s report page, with a token a
        browser opens it by (no key, that page only, for a day)."""
        return run_report_link(self.transport, run_id)

    def create_sampling_client(self, base_model: str, **engine_kwargs: Any) -> HttpSamplingClient:
        """Sample from a base model, or a saved checkpoint given as ``tinker://run/...``."""
        key = "model_path" if is_tinker_path(base_model) else "base_model"
        out = self.transport.post("/api/v1/create_sampling_session", {key: base_model})
        return HttpSamplingClient(self.transport, out["sampling_session_id"], out)
