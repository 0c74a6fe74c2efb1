"""Files uploaded to the server (``/v1/files``, shaped like OpenAI's files API): what a
TOML job's ``data = "file-<id>"`` names.

An upload is a ``multipart/form-data`` body with one ``file`` part and an optional
``purpose`` field. It streams to a hidden file in ``<data-dir>/files/<id>/`` while its
SHA-256 is computed, and is renamed to ``<id>/<filename>`` only once the whole body has
arrived: a job sees a whole file or none. The body size limit is the gate's
(``auth.GateMiddleware``, ``--max-body-mb``); a body stopped there leaves nothing.

Each upload gets a folder of its own because a JSONL's relative image paths resolve in
its own folder (``data/refs.py``): an uploaded dataset can name no other upload.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from vlmtune.protocol.errors import BadRequest, NotFound, shown
from vlmtune.protocol.files import DEFAULT_PURPOSE, is_file_id
from vlmtune.server.store import Store

FIELDS = ("file", "purpose")
MAX_FIELD_BYTES = 64  # a purpose is a word, never a payload
# A TOML job in these states reads its uploads (its config's "files") now or soon.
READING_STATES = ("submitted", "queued", "running")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str) -> str:
    """The last part of a client's file name, in characters every filesystem takes; the
    name is only shown (and keeps the suffix), the id is what finds the file."""
    base = re.split(r"[/\\]", name)[-1]
    return _UNSAFE.sub("_", base).lstrip(".")[:200] or "upload"


def file_json(row: dict[str, Any]) -> dict[str, Any]:
    """A file as OpenAI's files API shows one, plus its SHA-256."""
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": int(row["created"]),
        "filename": row["filename"],
        "purpose": row["purpose"],
        "sha256": row["sha256"],
        "status": "processed",
    }


class Upload:
    """One multipart body streamed to disk: ``write`` each chunk, then ``finish``;
    ``discard`` (always, in a ``finally``) removes what an unfinished upload wrote."""

    def __init__(self, folder: Path, boundary: bytes) -> None:
        self.folder = folder  # <data-dir>/files/<id>, this upload's alone
        self.partial = folder / ".partial"
        self.filename: str | None = None
        self.purpose = DEFAULT_PURPOSE
        self.size = 0
        self.digest = hashlib.sha256()
        self.finished = False  # the file part arrived whole
        self.kept = False  # the store recorded it: discard leaves it
        self._out: BinaryIO | None = None
        self._field: str | None = None  # the part being read
        self._value = bytearray()  # a plain field's bytes
        self._headers: dict[str, str] = {}
        self._header = [bytearray(), bytearray()]  # name, value (a chunk may split either)
        self._ended = False
        try:
            self.parser = MultipartParser(boundary, callbacks=self._callbacks())
        except (MultipartParseError, ValueError) as e:  # e.g. a boundary over 70 bytes
            raise BadRequest(f"multipart body: {e}") from None
        folder.mkdir(parents=True)  # last: a refused upload leaves no folder

    def _callbacks(self) -> Any:
        def header_field(data: bytes, start: int, end: int) -> None:
            self._header[0] += data[start:end]

        def header_value(data: bytes, start: int, end: int) -> None:
            self._header[1] += data[start:end]

        def header_end() -> None:
            name, value = (bytes(b).decode("latin-1") for b in self._header)
            self._headers[name.strip().lower()] = value.strip()
            self._header = [bytearray(), bytearray()]

        def end() -> None:
            self._ended = True

        return {
            "on_part_begin": self._part_begin,
            "on_header_field": header_field,
            "on_header_value": header_value,
            "on_header_end": header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": end,
        }

    def _part_begin(self) -> None:
        self._headers, self._field, self._value = {}, None, bytearray()

    def _headers_finished(self) -> None:
        kind, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if kind != b"form-data" or name not in FIELDS:
            raise BadRequest(
                f"multipart field {shown(name)}: an upload has the fields "
                f"{', '.join(FIELDS)} (file required)"
            )
        self._field = name
        if name == "file":
            if self._out is not None or self.finished:
                raise BadRequest("one file per upload: send each file in its own request")
            raw = options.get(b"filename", b"").decode("utf-8", "replace")
            self.filename = safe_filename(raw)
            self._out = self.partial.open("wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._field == "file":
            assert self._out is not None
            self._out.write(chunk)
            self.digest.update(chunk)
            self.size += len(chunk)
            return
        self._value += chunk
        if len(self._value) > MAX_FIELD_BYTES:
            raise BadRequest(f"multipart field {self._field}: over {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._field == "purpose":
            purpose = self._value.decode("utf-8", "replace").strip()
            if not purpose:
                raise BadRequest("purpose: must not be empty (default: fine-tune)")
            self.purpose = purpose
        elif self._field == "file" and self._out is not None:
            self._close(sync=True)

    def _close(self, sync: bool) -> None:
        out, self._out = self._out, None
        if out is None:
            return
        if sync:  # on disk before the rename publishes it
            out.flush()
            os.fsync(out.fileno())
        out.close()
        self.finished = self.finished or sync

    def write(self, chunk: bytes) -> None:
        try:
            self.parser.write(chunk)
        except MultipartParseError as e:
            raise BadRequest(f"malformed multipart body: {e}") from None

    def finish(self) -> Path:
        """The uploaded file, renamed into place; ``BadRequest`` if the body had none."""
        self.parser.finalize()
        if not self._ended:
            raise BadRequest("multipart body ended before its closing boundary")
        if not self.finished or self.filename is None:
            raise BadRequest("an upload needs a file field (multipart/form-data, name=file)")
        path = self.folder / self.filename
        os.replace(self.partial, path)
        return path

    def discard(self) -> None:
        """Remove the folder of an upload the store did not keep (cut off, malformed)."""
        self._close(sync=False)
        if not self.kept:
            shutil.rmtree(self.folder, ignore_errors=True)


class FileStore:
    """Uploaded files: the bytes under ``<data-dir>/files/``, the rows in the store."""

    def __init__(self, store: Store, data_dir: Path) -> None:
        self.store = store
        self.dir = data_dir / "files"

    def begin(self, content_type: str) -> tuple[str, Upload]:
        """A new upload's id and its sink, for a ``multipart/form-data`` body."""
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise BadRequest(
                "an upload is a multipart/form-data body with a file field (and an optional "
                f"purpose); got content-type {shown(content_type)}"
            )
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        return file_id, Upload(self.dir / file_id, boundary)

    def add(self, file_id: str, upload: Upload, tenant: str = "default") -> dict[str, Any]:
        """Record a finished upload (``Upload.finish``) and return its row."""
        path = upload.finish()
        self.store.add_file(
            file_id, filename=path.name, purpose=upload.purpose, size=upload.size,
            sha256=upload.digest.hexdigest(), path=str(path), tenant=tenant,
        )  # fmt: skip
        upload.kept = True
        return self.get(file_id)

    def get(self, file_id: str, tenant: str | None = None) -> dict[str, Any]:
        row = self.store.file(file_id, tenant) if is_file_id(file_id) else None
        if row is None:
            raise NotFound(f"no uploaded file {shown(file_id)} (GET /v1/files lists them)")
        return row

    def list(self, purpose: str | None = None, tenant: str | None = None) -> list[dict[str, Any]]:
        return self.store.files(purpose, tenant)

    def delete(self, file_id: str, tenant: str | None = None) -> None:
        """Remove a file; refused while a job that is queued or running reads it (one that
        could resume later is told why it cannot when it is resumed)."""
        row = self.get(file_id, tenant)
        readers = [
            job["id"]
            for state in READING_STATES
            for job in self.store.jobs(kind="toml", state=state)
            if file_id in job["config"].get("files", [])
        ]
        if readers:
            raise BadRequest(
                f"{file_id} is read by job(s) {', '.join(readers)}; cancel them or wait "
                "for them to end before deleting it"
            )
        self.store.delete_file(file_id)
        shutil.rmtree(Path(row["path"]).parent, ignore_errors=True)
