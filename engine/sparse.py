"""A sparse multi-label dataset as CSR arrays, and its on-disk form (one `.npy` per array + `meta.json`)."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .kernels.rowread import rows_from_file, rows_from_memory

DATASET_FORMAT_VERSION = 1
_ARRAYS = ("x_indptr", "x_indices", "x_values", "y_indptr", "y_indices")


@dataclass(frozen=True)
class Dataset:
    """Features and labels of N points as two CSR matrices.

    x_indptr int64 (N+1,), x_indices int32 (nnz,), x_values float32 (nnz,): features, ids < num_features.
    y_indptr int64 (N+1,), y_indices int32 (nnz_labels,): labels, ids < num_labels (a row may be empty).
    """

    x_indptr: np.ndarray
    x_indices: np.ndarray
    x_values: np.ndarray
    y_indptr: np.ndarray
    y_indices: np.ndarray
    num_features: int
    num_labels: int

    def __post_init__(self) -> None:
        n = len(self.x_indptr) - 1
        if len(self.y_indptr) - 1 != n:
            raise ValueError(f"features have {n} rows but labels have {len(self.y_indptr) - 1}")
        if self.x_indices.shape != self.x_values.shape:
            raise ValueError("x_indices and x_values must have the same length")
        if self.x_indptr[-1] != len(self.x_indices) or self.y_indptr[-1] != len(self.y_indices):
            raise ValueError("indptr[-1] must equal the number of stored entries")

    @property
    def num_points(self) -> int:
        return len(self.x_indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.x_indptr[-1])

    @property
    def num_label_entries(self) -> int:
        return int(self.y_indptr[-1])

    def row_slice(self, start: int, stop: int) -> Dataset:
        """Points [start, stop) as a new Dataset (views where possible, indptr rebased)."""
        xs, xe = int(self.x_indptr[start]), int(self.x_indptr[stop])
        ys, ye = int(self.y_indptr[start]), int(self.y_indptr[stop])
        return Dataset(
            np.asarray(self.x_indptr[start : stop + 1]) - xs,
            self.x_indices[xs:xe],
            self.x_values[xs:xe],
            np.asarray(self.y_indptr[start : stop + 1]) - ys,
            self.y_indices[ys:ye],
            self.num_features,
            self.num_labels,
        )

    def label_counts(self) -> np.ndarray:
        """How many points carry each label, int64 (num_labels,)."""
        return np.bincount(np.asarray(self.y_indices), minlength=self.num_labels).astype(np.int64)

    def summary(self) -> dict:
        n = self.num_points
        return {
            "num_points": n,
            "num_features": int(self.num_features),
            "num_labels": int(self.num_labels),
            "nnz": self.nnz,
            "avg_features_per_point": self.nnz / n if n else 0.0,
            "avg_labels_per_point": self.num_label_entries / n if n else 0.0,
        }


def unit_rows(indptr: np.ndarray, values: np.ndarray) -> np.ndarray:
    """float32 copy of a CSR matrix's values with every row scaled to unit L2 norm (all-zero rows stay 0)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    n = indptr.shape[0] - 1
    row = np.repeat(np.arange(n), np.diff(indptr))
    norms = np.sqrt(np.bincount(row, weights=values.astype(np.float64) ** 2, minlength=n))
    scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return (values * scale[row]).astype(np.float32)


def normalize_rows(data: Dataset) -> Dataset:
    """The same points with unit-L2-norm feature rows (see unit_rows)."""
    return Dataset(
        data.x_indptr,
        data.x_indices,
        unit_rows(data.x_indptr, data.x_values),
        data.y_indptr,
        data.y_indices,
        data.num_features,
        data.num_labels,
    )


def save_dataset(dataset: Dataset, directory: str | os.PathLike) -> Path:
    """Write the dataset atomically: arrays into a temp dir beside `directory`, then one rename."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(getattr(dataset, name)))
        meta = {"format_version": DATASET_FORMAT_VERSION, **dataset.summary()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        _fsync_dir(tmp)
        os.replace(tmp, target) if not target.exists() else _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


class RowReader:
    """Compact copies of chosen rows of a Dataset: `take(rows)` -> a new in-memory Dataset.

    An array memory-mapped from its .npy file (`load_dataset`'s default) is read with pread, not
    through its map: a trainer draws its batches from all over the data, and pages read through the
    map would stay mapped into its resident set (the whole ~300 MB of amazon670k's features within a
    few hundred steps). The two indptr arrays are copied into memory once (8 bytes a point each)."""

    _ROWS = (("x_indptr", ("x_indices", "x_values")), ("y_indptr", ("y_indices",)))

    def __init__(self, data: Dataset):
        self.data = data
        self.x_indptr = np.array(data.x_indptr, dtype=np.int64)
        self.y_indptr = np.array(data.y_indptr, dtype=np.int64)
        self._files = {name: _open_mapped(getattr(data, name)) for _, names in self._ROWS for name in names}
        fds = [f[0] for f in self._files.values() if f is not None]
        self._close = weakref.finalize(self, _close_all, fds)

    def take(self, rows: np.ndarray) -> Dataset:
        """The given rows (int, any order, repeats allowed), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        n = self.data.num_points
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= n)):
            raise IndexError(f"rows must be a 1-D array of row ids in [0, {n})")
        out = {}
        for indptr_name, names in self._ROWS:
            indptr = getattr(self, indptr_name)
            starts, stops = indptr[rows], indptr[rows + 1]
            out[indptr_name] = np.concatenate(([0], np.cumsum(stops - starts))).astype(np.int64)
            for name in names:
                src = getattr(self.data, name)
                dst = np.empty(int(out[indptr_name][-1]), dtype=src.dtype)
                file = self._files[name]
                if file is None:
                    rows_from_memory(src, starts, stops, dst)
                elif rows_from_file(file[0], file[1], starts, stops, dst) != 0:
                    raise OSError(
                        f"could not read {name} rows from {file[2]} (changed, or shorter than its header says?)"
                    )
                out[name] = dst
        return Dataset(
            out["x_indptr"],
            out["x_indices"],
            out["x_values"],
            out["y_indptr"],
            out["y_indices"],
            self.data.num_features,
            self.data.num_labels,
        )

    def close(self) -> None:
        """Close the files now (otherwise when the reader is collected)."""
        self._close()


def _open_mapped(array: np.ndarray) -> tuple[int, int, str] | None:
    """(fd, byte offset of array[0] in its file, file name) for a contiguous 1-D view of a memory-mapped
    .npy file; None for an array in memory."""
    mapping = getattr(array, "_mmap", None)
    if not isinstance(array, np.memmap) or mapping is None or array.filename is None:
        return None
    if not array.flags.c_contiguous or array.size == 0:
        return None
    map_start = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
    map_file_offset = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
    fd = os.open(array.filename, os.O_RDONLY | os.O_CLOEXEC)
    return fd, map_file_offset + array.ctypes.data - map_start, str(array.filename)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def load_dataset(directory: str | os.PathLike, mmap: bool = True) -> Dataset:
    """Open a dataset written by `save_dataset`; with `mmap` the arrays are read-only memory maps."""
    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text())
    if meta.get("format_version") != DATASET_FORMAT_VERSION:
        raise ValueError(f"{d}: unsupported dataset format version {meta.get('format_version')}")
    arrays = {n: np.load(d / f"{n}.npy", mmap_mode="r" if mmap else None) for n in _ARRAYS}
    return Dataset(**arrays, num_features=int(meta["num_features"]), num_labels=int(meta["num_labels"]))


def _replace_dir(tmp: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
