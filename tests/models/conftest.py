"""Fixtures for the models-layer tests. The tiny model is built once into the regular
cache (``$VLMTUNE_CACHE`` or ``~/.cache/vlmtune``) and reused across runs."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from vlmtune.data.schema import ImagePart


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from vlmtune.models.tiny import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_processor(tiny_dir: Path):
    from vlmtune.models.loading import load_processor

    return load_processor(tiny_dir)


def png_part(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> ImagePart:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return ImagePart(data=buf.getvalue(), mime="image/png", width=width, height=height)


@pytest.fixture
def make_image():
    return png_part
