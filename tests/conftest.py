"""Shared fixtures: the tiny model and small real images (the tests' only model)."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
from PIL import Image

from vlmtune.data.schema import ImagePart, Message, TextPart


def pytest_configure(config: pytest.Config) -> None:
    # huggingface_hub reads this once, when first imported (after this hook): without it,
    # building its user agent fetches an agent registry from huggingface.co, and no test
    # may reach the network (tests/models/test_hub.py serves a fake hub on 127.0.0.1).
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def png_bytes(width: int = 32, height: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def png_data_url(width: int = 32, height: int = 32, seed: int = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height, seed)).decode()


def image_part(width: int = 32, height: int = 32, seed: int = 0) -> ImagePart:
    return ImagePart(
        data=png_bytes(width, height, seed), mime="image/png", width=width, height=height
    )


def user(*parts) -> Message:
    return Message(role="user", parts=[TextPart(p) if isinstance(p, str) else p for p in parts])


def assistant(text: str, weight: float | None = None) -> Message:
    return Message(role="assistant", parts=[TextPart(text)], weight=weight)


@pytest.fixture(scope="session")
def tiny_dir():
    from vlmtune.models.tiny import tiny_model_dir

    return tiny_model_dir()


# Files whose tests start several torch.distributed processes. Under `make test`'s two
# xdist workers they share one worker (`--dist loadgroup`): two gloo groups forming at
# once on two cores have aborted a rank (SIGABRT) under load.
MULTIPROCESS_TEST_FILES = frozenset(
    {
        "test_distributed.py",
        "test_train_distributed.py",
        "test_metrics.py",
        "test_dpo.py",
        "test_hosted_job.py",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in MULTIPROCESS_TEST_FILES:
            item.add_marker(pytest.mark.xdist_group("multiprocess"))
