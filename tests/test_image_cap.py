"""The model family's per-message image cap applies by default everywhere; 0 asks for none."""

from __future__ import annotations

import warnings

import pytest

from tests.conftest import png_data_url
from vlmtune.config import ConfigError, ModelConfig, load_job
from vlmtune.defaults import image_cap
from vlmtune.sdk import ServiceClient
from vlmtune.sdk.client import ImagesDroppedWarning

MODEL = "tiny-qwen3-vl"
PIXELS = {"min_pixels": 4096, "max_pixels": 4096}


def two_images_in_one_message() -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": png_data_url(32, 32)}}
    content = [image, image, {"type": "text", "text": "how many?"}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": "2"}]


def test_image_cap_resolves_unset_to_the_family_and_0_to_no_cap():
    assert image_cap(MODEL, None) == 1
    assert image_cap("Qwen/Qwen3-VL-8B-Instruct", None) == 1
    assert image_cap("qwen3-vl-30b-a3b", None) == 1
    assert image_cap(MODEL, 0) is None
    assert image_cap(MODEL, 3) == 3
    # Not in the registry and no config.json (e.g. a LoRA adapter): every family is Qwen3-VL.
    assert image_cap("/no/such/adapter", None) == 1
    with pytest.raises(ValueError, match="0: no cap"):
        image_cap(MODEL, -1)


def test_job_file_spelling_of_no_cap(tmp_path):
    assert ModelConfig().max_images_per_message is None  # the family's
    assert ModelConfig(max_images_per_message=0).max_images_per_message == 0
    toml = tmp_path / "job.toml"
    toml.write_text(f'[job]\nmodel = "{MODEL}"\ndata = "d.jsonl"\n[model]\n')
    toml.write_text(toml.read_text() + "max_images_per_message = -1\n")
    with pytest.raises(ConfigError, match=r"model\.max_images_per_message"):
        load_job(toml)
    toml.write_text(toml.read_text().replace("-1", "0"))
    assert load_job(toml).model.max_images_per_message == 0


def test_sdk_datum_from_messages_warns_counts_and_honours_no_cap(tmp_path):
    service = ServiceClient(checkpoint_root=tmp_path)
    capped = service.create_training_client(MODEL, lora_rank=2, **PIXELS)  # cap unset
    assert capped.renderer.max_images_per_message == 1
    with pytest.warns(ImagesDroppedWarning, match=r"1 image\(s\) dropped.*at most 1"):
        datum = capped.datum_from_messages(two_images_in_one_message())
    assert datum.images_dropped == 1 and len(datum.model_input.images) == 1
    assert "images_dropped" not in datum.model_dump()  # the wire format stays Tinker's

    uncapped = service.create_training_client(
        MODEL, lora_rank=2, max_images_per_message=0, **PIXELS
    )
    assert uncapped.renderer.max_images_per_message is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImagesDroppedWarning)
        datum = uncapped.datum_from_messages(two_images_in_one_message())
    assert datum.images_dropped == 0 and len(datum.model_input.images) == 2


def test_sampling_client_takes_the_family_cap(tmp_path):
    sampler = ServiceClient(checkpoint_root=tmp_path).create_sampling_client(MODEL, **PIXELS)
    assert sampler.renderer.max_images_per_message == 1
