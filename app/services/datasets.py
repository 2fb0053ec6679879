"""Dataset store: streaming uploads into CSR arrays, atomic save, one DB row per dataset.

Ids are server-generated (uuid4 hex); a name is only a label, never part of a path. An upload is parsed into
in-memory arrays while it streams (the raw text is never held), then `engine.save_dataset` writes the arrays
atomically (temp dir + rename), then the DB row is inserted; any failure on the way removes what was written. A
full or unwritable data dir (or database) is an `InsufficientStorage` error (HTTP 507) naming the errno.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from sqlalchemy import select

import engine
from app.db import Database, DatasetRow, JobRow
from app.domain import DATA_READING_STATES
from app.services.errors import (
    Conflict,
    InsufficientStorage,
    InvalidContent,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    require_id,
    storage_cause,
)
from app.settings import Settings
from engine import XMCParseError, XMCStreamParser
from engine.data import XMCTooLargeError  # not re-exported by `engine` (yet)

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks, MultipartParser

log = logging.getLogger("app.datasets")

FEED_BATCH_BYTES = 1 << 20  # hand the parser ~1 MiB at a time: one thread hop per MiB, bounded memory
GZIP_TYPES = {"application/gzip", "application/x-gzip"}
RAW_TYPES = {"", "text/plain", "application/octet-stream", "text/x-xmc"} | GZIP_TYPES


def _media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    if not content_type:
        return "", {}
    main, *params = content_type.split(";")
    opts = {}
    for p in params:
        if "=" in p:
            k, v = p.split("=", 1)
            opts[k.strip().lower()] = v.strip().strip('"')
    return main.strip().lower(), opts


class UploadSink:
    """Receives the request body chunk by chunk (called from a worker thread) and feeds `engine.XMCStreamParser`.

    Raw bodies go straight to the parser; `multipart/form-data` bodies go through a streaming multipart parser
    and only the `file` part reaches the XMC parser. Counts the bytes received against the limit.
    """

    def __init__(self, content_type: str | None, content_encoding: str | None, limit: int):
        media, params = _media_type(content_type)
        encoding = (content_encoding or "").strip().lower()
        if encoding not in ("", "identity", "gzip", "x-gzip"):
            raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; send gzip or nothing")
        self.limit = int(limit)
        self.bytes_received = 0
        self.is_raw = media != "multipart/form-data"
        self._multipart = None
        self._file_started = False
        self._file_done = False
        self._part_is_file = False
        if media == "multipart/form-data":
            boundary = params.get("boundary")
            if not boundary:
                raise InvalidContent("multipart/form-data without a boundary parameter", loc=("header", "content-type"))
            self._parser = XMCStreamParser(max_bytes=self.limit, gzip=None)
            self._multipart = self._make_multipart(boundary)
        elif media in RAW_TYPES:
            declared_gzip = encoding in ("gzip", "x-gzip") or media in GZIP_TYPES
            self._parser = XMCStreamParser(max_bytes=self.limit, gzip=True if declared_gzip else None)
        else:
            raise UnsupportedMediaType(
                f"Content-Type {media!r} is not accepted; send the dataset file as text/plain, application/gzip "
                "(or with Content-Encoding: gzip), or as the `file` field of multipart/form-data"
            )

    # ---- multipart -----------------------------------------------------------------------------------
    def _make_multipart(self, boundary: str) -> MultipartParser:
        from python_multipart.multipart import MultipartParser, parse_options_header

        state: dict[str, Any] = {"hname": b"", "hvalue": b"", "disposition": b""}

        def on_part_begin() -> None:
            state["disposition"] = b""
            self._part_is_file = False

        def on_header_field(data: bytes, start: int, end: int) -> None:
            state["hname"] += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            state["hvalue"] += data[start:end]

        def on_header_end() -> None:
            if state["hname"].strip().lower() == b"content-disposition":
                state["disposition"] = state["hvalue"]
            state["hname"], state["hvalue"] = b"", b""

        def on_headers_finished() -> None:
            _, options = parse_options_header(state["disposition"])
            if options.get(b"name") == b"file":
                if self._file_started:
                    raise InvalidContent(
                        "multipart body has more than one `file` part; send one dataset per request",
                        loc=("body", "file"),
                    )
                self._file_started = self._part_is_file = True

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if self._part_is_file:
                self._feed(data[start:end])

        def on_part_end() -> None:
            if self._part_is_file:
                self._file_done = True
            self._part_is_file = False

        callbacks: MultipartCallbacks = {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        }
        return MultipartParser(boundary, callbacks)

    # ---- feeding -------------------------------------------------------------------------------------
    def _feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.bytes_received += len(chunk)
        if self.bytes_received > self.limit:
            raise PayloadTooLarge(self.limit)
        try:
            self._parser.feed(chunk)
        except XMCTooLargeError as exc:
            raise PayloadTooLarge(self.limit) from exc
        except XMCParseError as exc:
            raise self._parse_error(exc) from exc

    def write(self, chunk: bytes) -> None:
        """One chunk (or batch of chunks) of the request body. CPU work: call it off the event loop."""
        if self._multipart is None:
            self._feed(chunk)
            return
        from python_multipart.exceptions import FormParserError

        try:
            self._multipart.write(chunk)
        except FormParserError as exc:
            raise InvalidContent(f"malformed multipart/form-data body: {exc}", loc=("body",)) from exc

    def finish(self) -> engine.Dataset:
        """The parsed dataset; raises InvalidContent when the body ended early or had no `file` part."""
        if self._multipart is not None:
            from python_multipart.exceptions import FormParserError

            try:
                self._multipart.finalize()
            except FormParserError as exc:
                raise InvalidContent(f"malformed multipart/form-data body: {exc}", loc=("body",)) from exc
            if not self._file_started:
                raise InvalidContent(
                    "the multipart/form-data body has no `file` part; put the dataset file in a field named `file`",
                    loc=("body", "file"),
                )
            if not self._file_done:
                raise InvalidContent("the multipart/form-data body ended inside the `file` part", loc=("body", "file"))
        try:
            return self._parser.finish()
        except XMCTooLargeError as exc:
            raise PayloadTooLarge(self.limit) from exc
        except XMCParseError as exc:
            raise self._parse_error(exc) from exc

    @staticmethod
    def _parse_error(exc: Any) -> InvalidContent:
        line = getattr(exc, "line", None)
        column = getattr(exc, "column", None)
        reason = getattr(exc, "reason", None) or str(exc)
        where = f"line {line}" + (f", column {column}" if column else "") if line else "the dataset"
        return InvalidContent(f"{where}: {reason}", loc=("body",), line=line, column=column, reason=reason)


class DatasetService:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db

    def new_upload(self, content_type: str | None, content_encoding: str | None) -> UploadSink:
        return UploadSink(content_type, content_encoding, int(self.settings.max_upload_bytes))

    async def upload(
        self,
        body: AsyncIterator[bytes],
        *,
        name: str | None,
        content_type: str | None,
        content_encoding: str | None,
        content_length: int | None,
    ) -> DatasetRow:
        """Stream the body into the parser (parsing runs in worker threads, a batch of chunks at a time), then
        save and register the dataset."""
        sink = self.new_upload(content_type, content_encoding)
        if content_length is not None and sink.is_raw and content_length > sink.limit:
            raise PayloadTooLarge(sink.limit)
        buf = bytearray()
        async for chunk in body:
            buf += chunk
            if len(buf) >= FEED_BATCH_BYTES:
                await anyio.to_thread.run_sync(sink.write, bytes(buf))
                buf.clear()
        if buf:
            await anyio.to_thread.run_sync(sink.write, bytes(buf))
        dataset = await anyio.to_thread.run_sync(sink.finish)
        return await anyio.to_thread.run_sync(self.create, name, dataset, sink.bytes_received)

    def create(self, name: str | None, dataset: engine.Dataset, nbytes: int) -> DatasetRow:
        """Save the arrays atomically, then insert the row; on any failure nothing is left behind. Blocking."""
        if dataset.num_points == 0:
            raise InvalidContent("the dataset has no points (the header says 0 or no lines followed)", loc=("body",))
        dataset_id = uuid.uuid4().hex
        target = self.settings.dataset_dir(dataset_id)
        summary = dataset.summary()
        try:
            engine.save_dataset(dataset, target)
            row = DatasetRow(
                id=dataset_id,
                name=name or f"dataset-{dataset_id[:8]}",
                num_points=summary["num_points"],
                num_features=summary["num_features"],
                num_labels=summary["num_labels"],
                nnz=summary["nnz"],
                avg_labels_per_point=float(summary["avg_labels_per_point"]),
                avg_features_per_point=float(summary["avg_features_per_point"]),
                bytes=int(nbytes),
            )
            with self.db.session() as s:
                s.add(row)
        except BaseException as exc:
            shutil.rmtree(target, ignore_errors=True)
            cause = storage_cause(exc)
            if cause is None:
                raise
            log.error("dataset %s not stored (%s): %s", dataset_id, cause[0], exc)
            raise InsufficientStorage(
                f"the dataset could not be stored: {cause[0]} ({cause[1]}) in the service's data dir "
                "(SLIDE_DATA_DIR) or database; nothing was kept. Free space or make the data dir writable, then "
                "upload again",
                reason=cause[0],
            ) from exc
        log.info(
            "dataset %s (%s): %d points, %d features, %d labels",
            dataset_id,
            row.name,
            row.num_points,
            row.num_features,
            row.num_labels,
        )
        return row

    def list(self) -> list[DatasetRow]:
        with self.db.session() as s:
            return list(s.scalars(select(DatasetRow).order_by(DatasetRow.created_at.desc())))

    def get(self, dataset_id: str) -> DatasetRow:
        require_id("dataset", dataset_id)
        with self.db.session() as s:
            row = s.get(DatasetRow, dataset_id)
        if row is None:
            raise NotFound("dataset", dataset_id)
        return row

    def path(self, dataset_id: str) -> Path:
        return self.settings.dataset_dir(self.get(dataset_id).id)

    def delete(self, dataset_id: str) -> None:
        require_id("dataset", dataset_id)
        with self.db.session() as s:
            row = s.get(DatasetRow, dataset_id)
            if row is None:
                raise NotFound("dataset", dataset_id)
            users = list(
                s.scalars(
                    select(JobRow.id).where(
                        (JobRow.train_dataset_id == dataset_id) | (JobRow.eval_dataset_id == dataset_id),
                        JobRow.state.in_(DATA_READING_STATES),
                    )
                )
            )
            if users:
                raise Conflict(
                    f"dataset {dataset_id} is used by job(s) {', '.join(users)}; delete those jobs (or let them "
                    "complete) first",
                    jobs=users,
                )
            s.delete(row)
        _remove_tree(self.settings.dataset_dir(dataset_id))

    def sweep(self, min_age_s: float = 600.0) -> None:
        """Remove what a crash left behind: temp dirs of unfinished saves and dataset dirs without a row (only
        ones older than `min_age_s`, so an upload in flight in another process is never touched)."""
        root = self.settings.datasets_dir
        if not root.is_dir():
            return
        with self.db.session() as s:
            known = set(s.scalars(select(DatasetRow.id)))
        now = time.time()
        for entry in root.iterdir():
            try:
                old = now - entry.stat().st_mtime > min_age_s
            except OSError:
                continue
            if old and (entry.name.startswith(".") or (entry.is_dir() and entry.name not in known)):
                log.warning("removing leftover %s", entry)
                _remove_tree(entry)


def _remove_tree(path: Path) -> None:
    """Rename aside first (so a half-deleted tree is never mistaken for a dataset), then delete."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        path.rename(trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)
