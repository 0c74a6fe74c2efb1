"""Shared fixtures for the data-layer tests: image bytes, rows, JSONL files, an HTTP server."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image


class Make:
    """Builders for test inputs (a fixture, so test modules need no imports from here)."""

    @staticmethod
    def image(
        fmt: str = "PNG", size: tuple[int, int] = (8, 6), color: Any = (200, 30, 30), **kw: Any
    ) -> bytes:
        mode = "RGBA" if isinstance(color, tuple) and len(color) == 4 else "RGB"
        buf = io.BytesIO()
        Image.new(mode, size, color).save(buf, fmt, **kw)
        return buf.getvalue()

    def png(self, size: tuple[int, int] = (8, 6), color: Any = (200, 30, 30)) -> bytes:
        return self.image("PNG", size, color)

    def jpeg(self, size: tuple[int, int] = (8, 6), **kw: Any) -> bytes:
        return self.image("JPEG", size, (30, 200, 30), **kw)

    @staticmethod
    def noise_png(size: tuple[int, int] = (32, 32)) -> bytes:
        img = Image.frombytes(
            "RGB", size, bytes((i * 7919) % 251 for i in range(size[0] * size[1] * 3))
        )
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    @staticmethod
    def png_header_only(width: int, height: int) -> bytes:
        """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""

        def chunk(kind: bytes, data: bytes) -> bytes:
            return (
                struct.pack(">I", len(data))
                + kind
                + data
                + struct.pack(">I", zlib.crc32(kind + data))
            )

        ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b"")
        )

    @staticmethod
    def data_url(data: bytes, mime: str = "image/png") -> str:
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"

    def png_url(self, color: Any = (200, 30, 30)) -> str:
        return self.data_url(self.png(color=color))

    @staticmethod
    def user(*parts: Any) -> dict[str, Any]:
        """A user message: str parts become text parts, others are taken as given."""
        content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
        return {"role": "user", "content": content}

    @staticmethod
    def img(ref: str) -> dict[str, Any]:
        return {"type": "image_url", "image_url": {"url": ref}}

    @staticmethod
    def assistant(text: str = "A red square.") -> dict[str, Any]:
        return {"role": "assistant", "content": text}

    def sft(self, ref: str | None = None, **extra: Any) -> dict[str, Any]:
        ref = ref if ref is not None else self.png_url()
        return {
            "messages": [self.user(self.img(ref), "What is this?"), self.assistant()],
            **extra,
        }

    @staticmethod
    def write(path: Path, rows: list[Any]) -> Path:
        """Write rows (dicts as JSON, strings verbatim) one per line."""
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
        return path


@pytest.fixture
def mk() -> Make:
    return Make()


@pytest.fixture
def load(tmp_path: Path) -> Callable[..., Any]:
    """``load(rows, kind="sft", **kw)`` -> (rows, report) through ``load_dataset``."""
    from vlmtune.data import load_dataset

    def _load(rows: list[Any], kind: str = "sft", name: str = "data.jsonl", **kw: Any) -> Any:
        path = Make.write(tmp_path / name, rows)
        return load_dataset(path, kind, **kw)

    return _load


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ImageServer:
    """A real HTTP server on 127.0.0.1; ``routes[path]`` is a Route or a list served in turn."""

    Route: ClassVar[type[Route]] = Route  # so tests build routes without importing conftest
    port: int
    routes: dict[str, Route | list[Route]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def image_server() -> Iterator[ImageServer]:
    state = ImageServer(port=0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            state.requests.append((self.path, self.headers.get("Host", "")))
            route = state.routes.get(
                self.path, Route(404, b"not found", {"Content-Type": "text/plain"})
            )
            if isinstance(route, list):
                route = route.pop(0) if len(route) > 1 else route[0]
            self.send_response(route.status)
            headers = {"Content-Length": str(len(route.body)), **route.headers}
            for k, v in headers.items():
                if v:  # an empty value leaves the header out
                    self.send_header(k, v)
            self.end_headers()
            self.wfile.write(route.body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # the client hanging up early (size cap) is expected, not a failure

    server = Server(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
