"""``datum_from_messages`` over HTTP gives the in-process client's datum, byte for byte."""

from __future__ import annotations

import pytest

from tests.conftest import assistant, image_part, png_data_url, user
from vlmtune.data.errors import RowError
from vlmtune.sdk import ServiceClient
from vlmtune.sdk.http import HttpTrainingClient

MODEL = "tiny-qwen3-vl"
# Default pixel limits, and explicit ones the server must pass on to the local renderer
# (at least 16 tokens an image, where the defaults give 40x40 px 4 tokens).
ENGINES = [{}, {"min_pixels": 16 * 32 * 32, "max_pixels": 64 * 32 * 32}]


@pytest.fixture(scope="module", params=ENGINES, ids=["default-pixels", "explicit-pixels"])
def clients(request, server, key, tmp_path_factory):
    remote = ServiceClient(base_url=server.url, api_key=key).create_training_client(
        MODEL, lora_rank=8, **request.param
    )
    local = ServiceClient(checkpoint_root=tmp_path_factory.mktemp("ckpt")).create_training_client(
        MODEL, lora_rank=8, **request.param
    )
    assert isinstance(remote, HttpTrainingClient)
    return remote, local, request.param


def image_dict(width: int, height: int, seed: int) -> dict:
    return {"type": "image_url", "image_url": {"url": png_data_url(width, height, seed)}}


CONVERSATIONS = {
    "text": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    "image-dicts": [
        {"role": "system", "content": "You read handwriting."},
        {"role": "user", "content": [image_dict(160, 96, 1), {"type": "text", "text": "Digit?"}]},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, image_dict(40, 40, 2)]},
        {"role": "assistant", "content": [{"type": "text", "text": "3"}], "weight": 0},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "yes"},
    ],
    "messages": [user(image_part(64, 64, seed=5), "What digit is this?"), assistant("5")],
    # Two images in one message: over Qwen3-VL's default cap of 1, so the server's cap
    # must reach the local renderer for the same image to be dropped.
    "over-cap": [
        {
            "role": "user",
            "content": [
                image_dict(64, 64, 3),
                image_dict(64, 64, 4),
                {"type": "text", "text": "Same?"},
            ],
        },
        {"role": "assistant", "content": "no"},
    ],
}


@pytest.mark.filterwarnings("ignore:datum_from_messages.*dropped")
@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_datum_from_messages_matches_in_process(clients, name, train_on):
    remote, local, engine = clients
    messages = CONVERSATIONS[name]
    got = remote.datum_from_messages(messages, train_on=train_on)
    want = local.datum_from_messages(messages, train_on=train_on)
    assert [c.type for c in got.model_input.chunks] == [c.type for c in want.model_input.chunks]
    assert got.model_input.to_ints(0) == want.model_input.to_ints(0)  # text and image slots
    assert got.loss_fn_inputs["weights"].data == want.loss_fn_inputs["weights"].data
    assert got == want  # image bytes, formats and expected_tokens too
    image_tokens = [c.expected_tokens for c in got.model_input.chunks if c.type == "image"]
    assert len(image_tokens) == {"text": 0, "image-dicts": 2, "messages": 1, "over-cap": 1}[name]
    assert got.images_dropped == want.images_dropped == (name == "over-cap")
    assert min(image_tokens, default=16) >= (16 if engine else 4)
    assert sum(got.loss_fn_inputs["weights"].data) > 0


def test_datum_from_messages_rejects_input_as_in_process(clients):
    remote, local, _ = clients
    mixed = [user("hi"), {"role": "assistant", "content": "hi"}]
    bad_role = [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]
    for client in (remote, local):
        with pytest.raises(TypeError, match="not a mix"):
            client.datum_from_messages(mixed)
    errors = []
    for client in (remote, local):
        with pytest.raises(RowError) as err:
            client.datum_from_messages(bad_role)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and "robot" in errors[0]
