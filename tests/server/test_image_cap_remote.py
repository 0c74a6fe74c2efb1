"""Over HTTP: a run takes the model family's image cap unless it asks for none (0)."""

from __future__ import annotations

import warnings

import pytest

from tests.conftest import assistant, image_part, user
from vlmtune.sdk import ServiceClient
from vlmtune.sdk.client import ImagesDroppedWarning

MODEL = "tiny-qwen3-vl"


def two_images():
    return [user(image_part(seed=1), image_part(seed=2), "how many?"), assistant("2")]


def test_remote_run_caps_by_default_and_not_with_0(server, key):
    service = ServiceClient(base_url=server.url, api_key=key)
    capped = service.create_lora_training_client(MODEL, rank=2)
    assert capped.renderer.max_images_per_message == 1  # resolved by the server
    with pytest.warns(ImagesDroppedWarning, match=r"1 image\(s\) dropped"):
        datum = capped.datum_from_messages(two_images())
    assert datum.images_dropped == 1 and len(datum.model_input.images) == 1

    uncapped = service.create_lora_training_client(MODEL, rank=2, max_images_per_message=0)
    assert uncapped.renderer.max_images_per_message is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImagesDroppedWarning)
        datum = uncapped.datum_from_messages(two_images())
    assert datum.images_dropped == 0 and len(datum.model_input.images) == 2
    # The server's engine agrees: it trains on both images.
    assert uncapped.forward([datum]).result().loss_fn_outputs


def test_a_bad_cap_is_a_400(api):
    session = api.post("/api/v1/create_session", json={"tags": []}).json()["session_id"]
    for bad in ("2", -1, 1.5):
        body = {
            "session_id": session,
            "model_seq_id": 0,
            "base_model": MODEL,
            "engine": {"max_images_per_message": bad},
        }
        response = api.post("/api/v1/create_model", json=body)
        assert response.status_code == 400, response.text
        assert "max_images_per_message" in response.text
