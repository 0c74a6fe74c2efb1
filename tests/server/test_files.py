"""Uploads (``/v1/files``): streamed to disk whole or not at all, hashed, listed, deleted,
and held to the server's body limit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from vlmtune.protocol.errors import BadRequest
from vlmtune.server import ServerThread
from vlmtune.server.auth import create_key
from vlmtune.server.files import FileStore
from vlmtune.server.store import Store


def multipart(fields: dict[str, str], file: tuple[str, bytes] | None) -> tuple[str, bytes]:
    """(content-type, body) of a multipart upload, as httpx (and so the SDK) writes one."""
    if file is None:  # httpx would send a form without files urlencoded
        parts = [f'--b0\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                 for k, v in fields.items()]  # fmt: skip
        return "multipart/form-data; boundary=b0", ("".join(parts) + "--b0--\r\n").encode()
    request = httpx.Request("POST", "http://x/v1/files", data=fields, files={"file": file})
    return request.headers["content-type"], request.read()


@pytest.fixture
def file_store(tmp_path: Path) -> FileStore:
    return FileStore(Store(tmp_path / "server.db"), tmp_path / "data")


def leftovers(store: FileStore) -> list[Path]:
    return sorted(store.dir.rglob("*")) if store.dir.exists() else []


def test_an_upload_in_any_chunking_is_stored_whole_with_its_sha256(file_store):
    payload = b'{"messages": []}\n' * 300 + b"\r\n--not-a-boundary\r\n"
    content_type, body = multipart({"purpose": "fine-tune"}, ("../../evil name.jsonl", payload))
    file_id, upload = file_store.begin(content_type)
    for i in range(0, len(body), 7):  # boundaries and headers split across chunks
        upload.write(body[i : i + 7])
    row = file_store.add(file_id, upload)
    upload.discard()
    path = Path(row["path"])
    assert path.read_bytes() == payload
    assert row["sha256"] == hashlib.sha256(payload).hexdigest() and row["bytes"] == len(payload)
    # The name keeps no folder part; the upload has a folder of its own, and nothing else.
    assert path == file_store.dir / file_id / "evil_name.jsonl"
    assert leftovers(file_store) == [path.parent, path]


@pytest.mark.parametrize(
    "fields, file, cut, message",
    [
        ({"purpose": "fine-tune"}, None, 0, "needs a file field"),
        ({"purpose": "x", "other": "y"}, ("a.jsonl", b"{}\n"), 0, "'other'"),
        ({}, ("a.jsonl", b"{}\n" * 100), 40, "ended before its closing boundary"),
    ],
)
def test_a_malformed_upload_is_refused_and_leaves_nothing(file_store, fields, file, cut, message):
    content_type, body = multipart(fields, file)
    file_id, upload = file_store.begin(content_type)
    with pytest.raises(BadRequest, match=message):
        upload.write(body[: len(body) - cut])
        file_store.add(file_id, upload)
    upload.discard()
    assert leftovers(file_store) == [] and file_store.list() == []


def test_files_api_uploads_lists_shows_and_deletes(api):
    r = api.post("/v1/files", files={"file": ("rows.jsonl", b"{}\n")}, data={"purpose": "eval"})
    assert r.status_code == 200, r.text
    made = r.json()
    assert made["object"] == "file" and made["id"].startswith("file-")
    assert (made["filename"], made["bytes"], made["purpose"]) == ("rows.jsonl", 3, "eval")
    assert made in api.get("/v1/files", params={"purpose": "eval"}).json()["data"]
    assert api.get(f"/v1/files/{made['id']}").json() == made
    assert api.delete(f"/v1/files/{made['id']}").json()["deleted"] is True
    assert api.get(f"/v1/files/{made['id']}").status_code == 404
    assert api.post("/v1/files", json={"file": "x"}).status_code == 400  # not multipart


def test_an_upload_over_the_body_limit_is_413_declared_or_streamed(tmp_path):
    with ServerThread(tmp_path, max_body_mb=0.01) as srv:  # ~10 KB
        key = create_key(srv.context.store)
        headers = {"Authorization": f"Bearer {key}"}
        small = httpx.post(
            f"{srv.url}/v1/files", files={"file": ("a.jsonl", b"x" * 4000)}, headers=headers
        )
        assert small.status_code == 200, small.text
        content_type, body = multipart({}, ("big.jsonl", b"x" * 40_000))
        declared = httpx.post(
            f"{srv.url}/v1/files", content=body, headers={**headers, "content-type": content_type}
        )
        chunks = (body[i : i + 4096] for i in range(0, len(body), 4096))  # no content-length
        streamed = httpx.post(
            f"{srv.url}/v1/files", content=chunks, headers={**headers, "content-type": content_type}
        )
        assert (declared.status_code, streamed.status_code) == (413, 413), streamed.text
        files = srv.context.jobs.files
        small_id = small.json()["id"]
        assert [r["id"] for r in files.list()] == [small_id]
        assert [p.name for p in files.dir.iterdir()] == [small_id]  # the cut-off one is gone
