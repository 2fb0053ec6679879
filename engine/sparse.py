"""A sparse multi-label dataset as CSR arrays, and its on-disk form (one `.npy` per array + `meta.json`)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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

    def row_slice(self, start: int, stop: int) -> "Dataset":
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
