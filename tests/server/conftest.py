"""One server (and so one process-wide set of engines) shared by the server tests."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import png_bytes
from vlmtune.server import ServerThread
from vlmtune.server.auth import create_key


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path_factory.mktemp("vlmtune-server")).start()
    srv.key = create_key(srv.context.store, "tests")  # type: ignore[attr-defined]
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def key(server: ServerThread) -> str:
    return server.key  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def api(server: ServerThread, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as client:
        yield client


def b64_png(width: int = 32, height: int = 32, seed: int = 0) -> str:
    return base64.b64encode(png_bytes(width, height, seed)).decode()
