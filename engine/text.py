"""Text in, label names out: a TF-IDF featurizer, a label vocabulary and the JSONL text-dataset format.

A text dataset is JSON Lines, one point per line::

    {"text": "red running shoes", "labels": ["shoes", "running"]}

Fitting uses scikit-learn's `TfidfVectorizer` (its tokenizer, vocabulary and idf are the reference). Serving a
single query through `TfidfVectorizer.transform` costs ~0.8 ms of validation for a few words, so `TextFeaturizer`
keeps sklearn's analyzer (the same tokens) and applies the fitted vocabulary and idf itself; a test checks both
give the same matrix.

Persistence is arrays plus JSON, never pickles: the vocabulary and the label names are UTF-8 blobs with offsets
(`encode_strings`), the idf a float32 array, the settings a small JSON dict with `TEXT_FORMAT_VERSION`.
`TextFeaturizer.to_arrays` / `from_arrays` and `LabelNames.to_arrays` / `from_arrays` are what a model snapshot
and a dataset directory store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data import XMCParseError, XMCStreamParser
from engine.sparse import Dataset

__all__ = [
    "TEXT_FORMAT_VERSION",
    "DEFAULT_TEXT_PARAMS",
    "JSONLParseError",
    "JSONLStreamParser",
    "LabelNames",
    "TextFeaturizer",
    "TextRecords",
    "encode_strings",
    "decode_strings",
    "fit_text_dataset",
    "featurize_like",
    "read_jsonl",
    "save_text_info",
    "load_text_info",
    "read_label_names",
    "read_text_meta",
]

TEXT_FORMAT_VERSION = 1
DEFAULT_TEXT_PARAMS: dict = {
    "lowercase": True,
    "strip_accents": "unicode",
    "token_pattern": r"(?u)\b\w\w+\b",
    "ngram_range": [1, 1],
    "min_df": 1,
    "max_features": None,
    "sublinear_tf": True,
}
"""TfidfVectorizer settings a featurizer is fitted with (l2-normalised rows, smoothed idf)."""
_PARAM_KEYS = set(DEFAULT_TEXT_PARAMS)
TEXT_FILE = "text.json"
MAX_NAME_BYTES = 1000
"""Longest label name accepted (UTF-8 bytes)."""


class JSONLParseError(XMCParseError):
    """A JSONL text dataset is malformed; `line` is the 1-based physical line."""


# --------------------------------------------------------------------------------------------- strings


def encode_strings(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (uint8 UTF-8 blob, int64 offsets of len+1): string i is blob[off[i]:off[i+1]]."""
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return data, offsets


def decode_strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = np.asarray(data, dtype=np.uint8).tobytes()
    off = np.asarray(offsets).tolist()
    return [raw[off[i] : off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]


class LabelNames:
    """Names of labels 0..n-1, stored as a UTF-8 blob + offsets; a name is decoded only when asked for."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data = np.asarray(data, dtype=np.uint8)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or int(self.offsets[-1]) != len(self.data):
            raise ValueError("label names: offsets do not match the data")
        self._index: dict[str, int] | None = None

    @classmethod
    def from_list(cls, names: Sequence[str]) -> LabelNames:
        return cls(*encode_strings(names))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.data[a:b].tobytes().decode("utf-8")

    def names(self, ids: Iterable[int]) -> list[str | None]:
        """Names of `ids`; None for an id beyond the named range."""
        n = len(self)
        return [self[i] if 0 <= i < n else None for i in ids]

    def to_list(self) -> list[str]:
        return decode_strings(self.data, self.offsets)

    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {name: i for i, name in enumerate(self.to_list())}
        return self._index

    def to_arrays(self, prefix: str = "label_names") -> dict[str, np.ndarray]:
        return {f"{prefix}_data": self.data, f"{prefix}_offsets": self.offsets}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "label_names") -> LabelNames | None:
        if f"{prefix}_data" not in arrays:
            return None
        return cls(arrays[f"{prefix}_data"], arrays[f"{prefix}_offsets"])


def read_label_names(lines: Iterable[str], num_labels: int | None = None) -> LabelNames:
    """One name per line (line i names label i-1); names must be non-empty and distinct. Raises JSONLParseError
    naming the line."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(lines, start=1):
        name = line.rstrip("\r\n")
        if line_no == 1 and name.startswith("\ufeff"):
            name = name[1:]
        if not name.strip():
            raise JSONLParseError(line_no, "empty label name; line i names label i-1, one name per line")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise JSONLParseError(line_no, f"label name longer than {MAX_NAME_BYTES} bytes")
        if name in seen:
            raise JSONLParseError(line_no, f"label name {name[:80]!r} repeats line {seen[name]}; names must be unique")
        seen[name] = line_no
        names.append(name)
    if num_labels is not None and len(names) != num_labels:
        raise JSONLParseError(
            len(names) + 1 if len(names) < num_labels else num_labels + 1,
            f"{len(names)} names for {num_labels} labels; send exactly one name per label",
        )
    return LabelNames.from_list(names)


# --------------------------------------------------------------------------------------------- featurizer


class TextFeaturizer:
    """TF-IDF features of text: sklearn's analyzer, the fitted vocabulary (`terms`, term i = feature i) and idf.

    A row is `tf * idf` over the known terms (tf = 1 + log(count) with sublinear_tf, else count), l2-normalised,
    as `TfidfVectorizer(norm="l2")` computes it. Unknown words are dropped.
    """

    def __init__(self, params: dict, terms: Sequence[str], idf: np.ndarray):
        unknown = set(params) - _PARAM_KEYS
        if unknown:
            raise ValueError(f"unknown text featurizer settings: {sorted(unknown)}")
        self.params = {**DEFAULT_TEXT_PARAMS, **params}
        self.terms = list(terms)
        self.idf = np.ascontiguousarray(idf, dtype=np.float32)
        if self.idf.shape != (len(self.terms),):
            raise ValueError(f"idf has shape {self.idf.shape}; the vocabulary has {len(self.terms)} terms")
        self.vocabulary = {t: i for i, t in enumerate(self.terms)}
        self._analyzer = self._vectorizer(vocabulary=self.vocabulary).build_analyzer()

    @property
    def num_features(self) -> int:
        return len(self.terms)

    def _vectorizer(self, **extra):
        from sklearn.feature_extraction.text import TfidfVectorizer

        p = dict(self.params)
        p["ngram_range"] = tuple(p["ngram_range"])
        return TfidfVectorizer(dtype=np.float32, norm="l2", use_idf=True, smooth_idf=True, **p, **extra)

    @classmethod
    def fit(cls, texts: Sequence[str], params: dict | None = None):
        """Fit on `texts`; returns (featurizer, scipy CSR float32 matrix of the texts). Raises ValueError when no
        term survives (e.g. every text is a single character)."""
        from sklearn.feature_extraction.text import TfidfVectorizer

        p = {**DEFAULT_TEXT_PARAMS, **(params or {})}
        vec = TfidfVectorizer(
            dtype=np.float32, norm="l2", use_idf=True, smooth_idf=True, **{**p, "ngram_range": tuple(p["ngram_range"])}
        )
        try:
            matrix = vec.fit_transform(texts)
        except ValueError as exc:  # "empty vocabulary; perhaps the documents only contain stop words"
            raise ValueError(f"no words to learn from: {exc}") from None
        featurizer = cls(p, vec.get_feature_names_out().tolist(), vec.idf_)
        return featurizer, matrix.tocsr()

    def transform_one(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(feature ids int32 ascending, values float32) of one text; empty when no word is known."""
        vocab = self.vocabulary
        counts: dict[int, int] = {}
        for token in self._analyzer(text):
            j = vocab.get(token)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        if not counts:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        ids = np.fromiter(sorted(counts), dtype=np.int32, count=len(counts))
        tf = np.fromiter((counts[j] for j in ids.tolist()), dtype=np.float32, count=len(ids))
        if self.params["sublinear_tf"]:
            tf = np.log(tf) + np.float32(1.0)
        values = tf * self.idf[ids]
        norm = np.float32(np.sqrt(np.dot(values, values)))
        if norm > 0:
            values = values / norm
        return ids, values.astype(np.float32, copy=False)

    def transform(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR (indptr int64, indices int32, values float32) of `texts`."""
        rows = [self.transform_one(t) for t in texts]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r[0]) for r in rows], out=indptr[1:])
        indices = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int32)
        values = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.float32)
        return indptr, indices.astype(np.int32, copy=False), values.astype(np.float32, copy=False)

    # ---- persistence -----------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"format_version": TEXT_FORMAT_VERSION, "kind": "tfidf", "params": self.params}

    def to_arrays(self, prefix: str = "text") -> dict[str, np.ndarray]:
        data, offsets = encode_strings(self.terms)
        return {f"{prefix}_terms_data": data, f"{prefix}_terms_offsets": offsets, f"{prefix}_idf": self.idf}

    @classmethod
    def from_arrays(cls, meta: dict | None, arrays, prefix: str = "text") -> TextFeaturizer | None:
        if not meta:
            return None
        if meta.get("format_version") != TEXT_FORMAT_VERSION or meta.get("kind") != "tfidf":
            raise ValueError(
                f"unsupported text featurizer (format {meta.get('format_version')}, kind {meta.get('kind')})"
            )
        terms = decode_strings(arrays[f"{prefix}_terms_data"], arrays[f"{prefix}_terms_offsets"])
        return cls(dict(meta.get("params") or {}), terms, np.asarray(arrays[f"{prefix}_idf"]))


# --------------------------------------------------------------------------------------------- JSONL


@dataclass
class TextRecords:
    """Parsed JSONL lines: the texts and each one's label names (a list, maybe empty)."""

    texts: list[str]
    labels: list[list[str]]

    def __len__(self) -> int:
        return len(self.texts)


class JSONLStreamParser(XMCStreamParser):
    """JSON Lines `{"text": str, "labels": [str, ...]}` fed in chunks (plain or gzip, as XMCStreamParser).

    Empty lines are skipped; line numbers count physical lines from 1. The texts and names are kept in memory
    (the featurizer is fitted on all of them); `max_bytes` caps the decompressed size as for XMC text.
    """

    def __init__(self, max_bytes: int | None = None, gzip: bool | None = None, max_text_chars: int = 1 << 20):
        super().__init__(max_bytes=max_bytes, gzip=gzip)
        self.max_text_chars = max_text_chars
        self._records = TextRecords([], [])

    @property
    def points_parsed(self) -> int:
        return len(self._records)

    def _feed_text(self, chunk: bytes | bytearray, count: bool = True) -> None:
        if not chunk:
            return
        if count:
            self.bytes_seen += len(chunk)
            if self.max_bytes is not None and self.bytes_seen > self.max_bytes:
                from engine.data import XMCTooLargeError

                raise XMCTooLargeError(
                    None,
                    f"the data is larger than the limit of {self.max_bytes} bytes"
                    f"{' once decompressed' if self._gzip else ''}; split it into smaller files or raise the upload "
                    "size limit",
                    limit=self.max_bytes,
                )
        last_nl = chunk.rfind(b"\n")
        if last_nl < 0:
            self._tail += chunk
            return
        self._tail += chunk[: last_nl + 1]
        block = bytes(self._tail)
        self._tail = bytearray(chunk[last_nl + 1 :])
        lines = block.split(b"\n")
        lines.pop()  # after the last newline: empty
        for line in lines:
            self._line(line)

    def _line(self, raw: bytes) -> None:
        line_no = self._line_no
        self._line_no += 1
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            return
        text, labels = parse_jsonl_line(raw, line_no, self.max_text_chars)
        self._records.texts.append(text)
        self._records.labels.append(labels)

    def finish(self) -> TextRecords:  # type: ignore[override]
        self._check_open()
        try:
            if self._pending:
                chunk, self._pending = self._pending, b""
                self._gzip = False
                self._feed_text(chunk)
            if self._gzip and self._inflater is not None and not self._inflater.eof:
                raise JSONLParseError(
                    None,
                    f"the gzip stream is truncated after {self.raw_bytes_seen} bytes (no end-of-stream marker); "
                    "the upload was cut short, send the whole file",
                )
            if self._tail:
                tail = bytes(self._tail)
                self._tail = bytearray()
                self._line(tail)
            if not self._records.texts:
                raise JSONLParseError(1, 'empty input: send one JSON object per line, {"text": ..., "labels": [...]}')
        except BaseException:
            self._state = "failed"
            raise
        self._state = "finished"
        return self._records


def parse_jsonl_line(raw: bytes, line_no: int, max_text_chars: int = 1 << 20) -> tuple[str, list[str]]:
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise JSONLParseError(line_no, "not UTF-8 text") from None
    except ValueError as exc:
        raise JSONLParseError(line_no, f"not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise JSONLParseError(line_no, f'expected a JSON object {{"text": ..., "labels": [...]}}, got {_kind(obj)}')
    extra = set(obj) - {"text", "labels"}
    if extra:
        raise JSONLParseError(line_no, f"unknown field(s) {sorted(extra)}; a line has `text` and `labels` only")
    text = obj.get("text")
    if not isinstance(text, str):
        raise JSONLParseError(line_no, f"`text` must be a string, got {_kind(text)}")
    if not text.strip():
        raise JSONLParseError(line_no, "`text` is empty")
    if len(text) > max_text_chars:
        raise JSONLParseError(line_no, f"`text` has {len(text)} characters; at most {max_text_chars}")
    labels = obj.get("labels", [])
    if not isinstance(labels, list):
        raise JSONLParseError(line_no, f"`labels` must be a list of names, got {_kind(labels)}")
    seen: set[str] = set()
    for j, name in enumerate(labels):
        if not isinstance(name, str) or not name.strip():
            raise JSONLParseError(line_no, f"`labels[{j}]` must be a non-empty string, got {_kind(name)}")
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise JSONLParseError(line_no, f"`labels[{j}]` is longer than {MAX_NAME_BYTES} bytes")
        if "\n" in name or "\r" in name:
            raise JSONLParseError(line_no, f"`labels[{j}]` contains a line break")
        if name in seen:
            raise JSONLParseError(line_no, f"`labels[{j}]` repeats the name {name[:80]!r}")
        seen.add(name)
    return text, labels


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "an object"
    )


def read_jsonl(path: str | os.PathLike, max_bytes: int | None = None) -> TextRecords:
    """A JSONL text dataset file (plain or .gz)."""
    parser = JSONLStreamParser(max_bytes=max_bytes)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            parser.feed(chunk)
    return parser.finish()


# --------------------------------------------------------------------------------------------- datasets


def _label_csr(labels: list[list[str]], index: dict[str, int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Label names -> CSR ids (ascending per row); names missing from `index` are dropped and counted."""
    indptr = np.zeros(len(labels) + 1, dtype=np.int64)
    ids: list[int] = []
    unknown = 0
    for i, names in enumerate(labels):
        row = sorted(index[n] for n in names if n in index)
        unknown += len(names) - len(row)
        ids.extend(row)
        indptr[i + 1] = len(ids)
    return indptr, np.asarray(ids, dtype=np.int32), unknown


def fit_text_dataset(records: TextRecords, params: dict | None = None) -> tuple[Dataset, TextFeaturizer, LabelNames]:
    """Fit the featurizer and the label vocabulary (names in order of first appearance) on a training set."""
    order: dict[str, int] = {}
    for names in records.labels:
        for n in names:
            order.setdefault(n, len(order))
    if not order:
        raise JSONLParseError(None, "no line has labels: a training set needs label names to learn")
    try:
        featurizer, matrix = TextFeaturizer.fit(records.texts, params)
    except ValueError as exc:
        raise JSONLParseError(None, f"{exc}; texts need words of two or more letters or digits") from None
    y_indptr, y_indices, _ = _label_csr(records.labels, order)
    matrix.sort_indices()
    ds = Dataset(
        matrix.indptr.astype(np.int64),
        matrix.indices.astype(np.int32),
        matrix.data.astype(np.float32),
        y_indptr,
        y_indices,
        featurizer.num_features,
        len(order),
    )
    return ds, featurizer, LabelNames.from_list(list(order))


def featurize_like(
    records: TextRecords, featurizer: TextFeaturizer, names: LabelNames, num_labels: int | None = None
) -> tuple[Dataset, int]:
    """Featurize a test or validation set with a training set's featurizer and label vocabulary; label names the
    vocabulary lacks are dropped (not invented) and their count returned."""
    x_indptr, x_indices, x_values = featurizer.transform(records.texts)
    y_indptr, y_indices, unknown = _label_csr(records.labels, names.index())
    ds = Dataset(x_indptr, x_indices, x_values, y_indptr, y_indices, featurizer.num_features, num_labels or len(names))
    return ds, unknown


# --------------------------------------------------------------------------------------------- on disk


def save_text_info(
    directory: str | os.PathLike, featurizer: TextFeaturizer | None, names: LabelNames | None, extra: dict | None = None
) -> None:
    """Write the featurizer and/or label names beside a dataset's arrays (`text.json` + `.npy`), atomically per
    file (the JSON last, so it never names arrays that are not there yet)."""
    d = Path(directory)
    arrays: dict[str, np.ndarray] = {}
    if featurizer is not None:
        arrays.update(featurizer.to_arrays())
    if names is not None:
        arrays.update(names.to_arrays())
    for name, arr in arrays.items():
        tmp = d / f".{name}.npy.tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(arr))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, d / f"{name}.npy")
    meta = {
        "format_version": TEXT_FORMAT_VERSION,
        "featurizer": featurizer.meta() if featurizer is not None else None,
        "label_names": names is not None,
        **(extra or {}),
    }
    old = read_text_meta(d)
    if old and featurizer is None and old.get("featurizer"):
        meta["featurizer"] = old["featurizer"]  # naming the labels keeps the featurizer
    for key in ("format", "like_dataset_id", "unknown_labels"):
        if key in old and key not in meta:
            meta[key] = old[key]
    tmp = d / f".{TEXT_FILE}.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, d / TEXT_FILE)


def read_text_meta(d: Path) -> dict:
    try:
        meta = json.loads((d / TEXT_FILE).read_text())
    except FileNotFoundError:
        return {}
    if meta.get("format_version") != TEXT_FORMAT_VERSION:
        raise ValueError(f"{d}: unsupported text format version {meta.get('format_version')}")
    return meta


def load_text_info(directory: str | os.PathLike) -> tuple[TextFeaturizer | None, LabelNames | None, dict]:
    """(featurizer, label names, meta) stored with a dataset; (None, None, {}) for a plain XMC dataset."""
    d = Path(directory)
    meta = read_text_meta(d)
    if not meta:
        return None, None, {}
    arrays: dict[str, np.ndarray] = {}
    want = []
    if meta.get("featurizer"):
        want += ["text_terms_data", "text_terms_offsets", "text_idf"]
    if meta.get("label_names"):
        want += ["label_names_data", "label_names_offsets"]
    for name in want:
        arrays[name] = np.load(d / f"{name}.npy", allow_pickle=False)
    return TextFeaturizer.from_arrays(meta.get("featurizer"), arrays), LabelNames.from_arrays(arrays), meta
