"""Both transports implement the client protocols completely, with the same signatures,
and ``connect`` is the one switch between them."""

from __future__ import annotations

import inspect

import pytest

from vlmtune.sdk import (
    SamplingClient,
    SamplingClientProtocol,
    ServiceClient,
    ServiceClientProtocol,
    TrainingClient,
    TrainingClientProtocol,
    connect,
)
from vlmtune.sdk.http import HttpSamplingClient, HttpTrainingClient
from vlmtune.sdk.http_service import HttpServiceClient

# (protocol, implementations, exact): exact means the very same parameters; otherwise an
# implementation may add optional ones (ServiceClient's training_shape_ref).
CASES = [
    (TrainingClientProtocol, [TrainingClient, HttpTrainingClient], True),
    (SamplingClientProtocol, [SamplingClient, HttpSamplingClient], True),
    (ServiceClientProtocol, [ServiceClient, HttpServiceClient], False),
]


def _static_conformance(
    tc: TrainingClient,
    htc: HttpTrainingClient,
    sc: SamplingClient,
    hsc: HttpSamplingClient,
    svc: ServiceClient,
    hsvc: HttpServiceClient,
) -> None:
    """Never called: `make lint` type-checks these assignments (mypy)."""
    _a: TrainingClientProtocol = tc
    _b: TrainingClientProtocol = htc
    _c: SamplingClientProtocol = sc
    _d: SamplingClientProtocol = hsc
    _e: ServiceClientProtocol = svc
    _f: ServiceClientProtocol = hsvc


def members(protocol: type) -> list[str]:
    return sorted(name for name in vars(protocol) if not name.startswith("_"))


def params(fn: object) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]  # type: ignore[arg-type]


def test_the_protocols_name_what_the_recipes_use():
    assert {"forward_reference", "describe", "prefetch_images", "forward_backward_custom",
            "save_weights_and_get_sampling_client", "renderer", "get_info"} <= set(
        members(TrainingClientProtocol))  # fmt: skip
    assert "create_training_client_from_config" in members(ServiceClientProtocol)


@pytest.mark.parametrize(
    ("protocol", "impls", "exact"), CASES, ids=lambda x: getattr(x, "__name__", "")
)
def test_every_member_with_the_same_signature(protocol, impls, exact):
    for impl in impls:
        for name in members(protocol):
            want = inspect.getattr_static(protocol, name)
            got = inspect.getattr_static(impl, name, None)
            where = f"{impl.__name__}.{name}"
            assert got is not None, f"{where} is missing"
            if isinstance(want, property):
                assert isinstance(got, property), f"{where} should be a property"
                continue
            want_p, got_p = params(want), params(got)
            if exact:
                assert [(p.name, p.kind, p.default) for p in got_p] == [
                    (p.name, p.kind, p.default) for p in want_p
                ], where
                continue
            by_name = {p.name: p for p in got_p}
            for p in want_p:
                if p.kind is p.VAR_KEYWORD:
                    assert any(q.kind is q.VAR_KEYWORD for q in got_p), where
                    continue
                assert p.name in by_name, f"{where}: no parameter {p.name}"
                q = by_name[p.name]
                assert q.kind == p.kind and (p.default is p.empty or q.default == p.default), where
            extra = [q for q in got_p if q.name not in {p.name for p in want_p}]
            assert all(q.default is not q.empty or q.kind is q.VAR_KEYWORD for q in extra), where


def test_connect_is_the_one_switch(tmp_path):
    local = connect(checkpoint_root=tmp_path)
    assert type(local) is ServiceClient and local.checkpoint_root == tmp_path
    remote = connect("http://127.0.0.1:9", api_key="k", min_pixels=4096, device="cpu")
    assert isinstance(remote, HttpServiceClient)
    assert remote.engine_defaults == {"min_pixels": 4096}  # the device is the server's
    assert remote.transport.base_url == "http://127.0.0.1:9"
    # the tinker-style spelling is connect(), kept for scripts written for tinker
    assert isinstance(ServiceClient(base_url="http://127.0.0.1:9"), HttpServiceClient)
    assert isinstance(local, ServiceClientProtocol) and isinstance(remote, ServiceClientProtocol)
    with pytest.raises(ValueError, match="pass its base_url"):
        connect(api_key="k")
