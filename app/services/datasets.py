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
from collections.abc import AsyncIterator, Sequence
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
from app.services.pagination import page_by_created
from app.settings import Settings
from engine import XMCParseError, XMCStreamParser
from engine.data import XMCTooLargeError  # not re-exported by `engine` (yet)
from engine.text import (
    JSONLParseError,
    JSONLStreamParser,
    featurize_like,
    fit_text_dataset,
    load_text_info,
    read_label_names,
    read_text_meta,
    save_text_info,
)

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks, MultipartParser

log = logging.getLogger("app.datasets")

FEED_BATCH_BYTES = 1 << 20  # hand the parser ~1 MiB at a time: one thread hop per MiB, bounded memory
GZIP_TYPES = {"application/gzip", "application/x-gzip"}
JSONL_TYPES = {"application/x-ndjson", "application/jsonl", "application/json-lines", "application/json"}
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

    def __init__(self, content_type: str | None, content_encoding: str | None, limit: int, fmt: str = "xmc"):
        media, params = _media_type(content_type)
        self.format = fmt
        parser_class = JSONLStreamParser if fmt == "jsonl" else XMCStreamParser
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
            self._parser = parser_class(max_bytes=self.limit, gzip=None)
            self._multipart = self._make_multipart(boundary)
        elif media in RAW_TYPES or (fmt == "jsonl" and media in JSONL_TYPES):
            declared_gzip = encoding in ("gzip", "x-gzip") or media in GZIP_TYPES
            self._parser = parser_class(max_bytes=self.limit, gzip=True if declared_gzip else None)
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

    def finish(self) -> Any:
        """The parsed dataset (an engine.Dataset, or engine.text.TextRecords for JSONL); raises InvalidContent when
        the body ended early or had no `file` part."""
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

    def new_upload(self, content_type: str | None, content_encoding: str | None, fmt: str = "xmc") -> UploadSink:
        return UploadSink(content_type, content_encoding, int(self.settings.max_upload_bytes), fmt)

    async def upload(
        self,
        body: AsyncIterator[bytes],
        *,
        name: str | None,
        content_type: str | None,
        content_encoding: str | None,
        content_length: int | None,
        fmt: str = "xmc",
        like: str | None = None,
    ) -> DatasetRow:
        """Stream the body into the parser (parsing runs in worker threads, a batch of chunks at a time), then
        save and register the dataset. JSONL text: fit a featurizer and label vocabulary on it, or with `like`
        featurize it with that dataset's."""
        if like is not None:
            if fmt != "jsonl":
                raise InvalidContent("`like` applies to format=jsonl uploads only", loc=("query", "like"))
            await anyio.to_thread.run_sync(self._text_of, like)  # 404 / 422 before reading the body
        sink = self.new_upload(content_type, content_encoding, fmt)
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
        parsed = await anyio.to_thread.run_sync(sink.finish)
        if fmt != "jsonl":
            return await anyio.to_thread.run_sync(self.create, name, parsed, sink.bytes_received)

        def featurize() -> DatasetRow:
            text: tuple[Any, Any, dict[str, Any]]
            try:
                if like is None:
                    dataset, featurizer, names = fit_text_dataset(parsed)
                    text = (featurizer, names, {"format": "jsonl"})
                else:
                    featurizer, names, _ = self._text_of(like)
                    dataset, unknown = featurize_like(parsed, featurizer, names, self.get(like).num_labels)
                    text = (None, None, {"format": "jsonl", "like_dataset_id": like, "unknown_labels": unknown})
            except JSONLParseError as exc:
                raise UploadSink._parse_error(exc) from exc
            return self.create(name, dataset, sink.bytes_received, text=text)

        return await anyio.to_thread.run_sync(featurize)

    def _text_of(self, dataset_id: str) -> tuple[Any, Any, dict[str, Any]]:
        """(featurizer, label names, meta) of a text dataset; 422 when it has no featurizer."""
        self.get(dataset_id)
        featurizer, names, meta = load_text_info(self.settings.dataset_dir(dataset_id))
        if featurizer is None or names is None:
            raise InvalidContent(
                f"like: dataset {dataset_id} was not uploaded as text (format=jsonl), so it has no featurizer",
                loc=("query", "like"),
            )
        return featurizer, names, meta

    def text_meta(self, dataset_id: str) -> dict[str, Any]:
        try:
            return read_text_meta(self.settings.dataset_dir(dataset_id))
        except (OSError, ValueError):
            return {}

    def set_label_names(self, dataset_id: str, body: bytes) -> DatasetRow:
        """Name the labels of a dataset: UTF-8 text, line i names label i-1. Blocking."""
        row = self.get(dataset_id)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidContent(f"the label names are not UTF-8 text ({exc})", loc=("body",)) from None
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        try:
            names = read_label_names(lines, row.num_labels)
        except JSONLParseError as exc:
            raise UploadSink._parse_error(exc) from exc
        try:
            save_text_info(self.settings.dataset_dir(dataset_id), None, names)
        except OSError as exc:
            cause = storage_cause(exc)
            if cause is None:
                raise
            raise InsufficientStorage(
                f"the label names could not be stored: {cause[0]} ({cause[1]})", reason=cause[0]
            ) from exc
        return row

    def create(
        self,
        name: str | None,
        dataset: engine.Dataset,
        nbytes: int,
        text: tuple[Any, Any, dict[str, Any]] | None = None,
    ) -> DatasetRow:
        """Save the arrays atomically, then insert the row; on any failure nothing is left behind. Blocking."""
        if dataset.num_points == 0:
            raise InvalidContent("the dataset has no points (the header says 0 or no lines followed)", loc=("body",))
        dataset_id = uuid.uuid4().hex
        target = self.settings.dataset_dir(dataset_id)
        summary = dataset.summary()
        try:
            engine.save_dataset(dataset, target)
            if text is not None:
                save_text_info(target, *text)
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

    def page(self, limit: int, cursor: str | None) -> tuple[Sequence[DatasetRow], str | None]:
        with self.db.session() as s:
            return page_by_created(s, DatasetRow, limit, cursor)

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
