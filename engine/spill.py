"""Model arrays kept in files instead of process memory: a trainer's copy of the best model so far, and the model
training continues from while the trainer's model is the best one (after `Trainer.run`).

A `Spill` is a directory of its own inside a parent directory (a snapshot store's `.best`, or any directory), locked
while its owner lives. Every `write` goes into a fresh subdirectory and a written file is never changed afterwards,
so a snapshot version can hard-link it (`SnapshotStore.publish(links=...)`); `SpilledArrays.remove` unlinks only the
spill's names. The files are scratch, not fsynced: after a crash, training resumes from the published snapshots,
which carry the best model too. A spill whose owner has gone (killed) is removed by the next one made beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .snapshot import _file_crc32, _link_or_copy, model_arrays, model_from_arrays

if TYPE_CHECKING:
    from .config import SlideConfig
    from .network import SlideModel

SPILL_DIR = ".best"
"""The spill directory of a trainer with a snapshot store, in the store's root (its listing takes only `v000042`)."""
LOCK = ".lock"
PREFIX = "spill-"
_SPILL_NAME = re.compile(rf"^{PREFIX}\d+-\w+$")


class SpilledArrays(NamedTuple):
    """Arrays written by `Spill.write` (or linked by `Spill.link`): name -> (.npy file, manifest entry)."""

    directory: Path
    files: dict[str, tuple[Path, dict]]

    def load(self) -> dict[str, np.ndarray]:
        """The arrays, read into memory (writable: the caller may change them)."""
        return {name: np.load(path) for name, (path, _) in self.files.items()}

    def links(self, prefix: str = "") -> dict[str, tuple[Path, dict]]:
        """The files as `SnapshotStore.publish` takes them, each named prefix + its name."""
        return {prefix + name: (path, dict(info)) for name, (path, info) in self.files.items()}

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class SpilledModel(NamedTuple):
    """A SlideModel in files: its arrays (`model_arrays`) and what else it holds."""

    arrays: SpilledArrays
    config: SlideConfig
    num_features: int
    num_labels: int
    serving_report: dict
    featurizer: Any
    label_names: Any

    def load(self) -> SlideModel:
        """The model, its arrays read into memory."""
        model = model_from_arrays(self.config, self.num_features, self.num_labels, self.arrays.load())
        model.serving_report = self.serving_report
        model.featurizer, model.label_names = self.featurizer, self.label_names
        return model


class Spill:
    """A directory of spilled arrays inside `parent` (created if missing), removed by `close` or when the object is
    collected or the process exits."""

    def __init__(self, parent: str | os.PathLike):
        self.parent = Path(parent)
        self.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.parent):
            _remove_abandoned(self.parent)
            self.directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self.parent))
            fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        self._count = 0
        self._finalizer = weakref.finalize(self, _remove, self.directory, fd)

    def write(self, arrays: dict[str, np.ndarray]) -> SpilledArrays:
        """Write arrays into new files (with their manifest entries: shape, dtype, crc32 of the file)."""
        target = self._next()
        files = {}
        try:
            for name, arr in arrays.items():
                path = target / f"{name}.npy"
                np.save(path, np.ascontiguousarray(arr))
                files[name] = (path, {"shape": list(arr.shape), "dtype": str(arr.dtype), "crc32": _file_crc32(path)})
        except BaseException:  # e.g. the disk is full: what was written goes
            shutil.rmtree(target, ignore_errors=True)
            raise
        return SpilledArrays(target, files)

    def write_model(self, model: SlideModel) -> SpilledModel:
        """Write a model's arrays (the caller may let the model go then: `SpilledModel.load` gives it back)."""
        return SpilledModel(
            self.write(model_arrays(model)),
            model.config,
            model.num_features,
            model.num_labels,
            model.serving_report,
            model.featurizer,
            model.label_names,
        )

    def link(self, source: Path, entries: dict[str, dict]) -> SpilledArrays:
        """Take arrays from a snapshot version as they are: its files `source/<name>.npy`, hard-linked (copied where
        the file system cannot link), with their manifest entries `entries`."""
        target = self._next()
        files = {}
        try:
            for name, info in entries.items():
                path = target / f"{name}.npy"
                _link_or_copy(source / f"{name}.npy", path)
                files[name] = (path, dict(info))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        return SpilledArrays(target, files)

    def close(self) -> None:
        """Remove the directory and every file in it (versions that linked a file keep theirs)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _next(self) -> Path:
        if self.closed:
            raise RuntimeError(f"{self.directory}: the spill is closed")
        self._count += 1
        target = self.directory / f"{self._count:06d}"
        target.mkdir()
        return target


@contextlib.contextmanager
def _locked(parent: Path) -> Iterator[None]:
    """An exclusive flock on `parent/.lock`: making a spill and removing abandoned ones exclude each other."""
    fd = os.open(parent / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_abandoned(parent: str | os.PathLike) -> None:
    """Remove the spills in parent (if it exists) whose owner is gone (a process killed while it trained)."""
    parent = Path(parent)
    if parent.is_dir():
        with _locked(parent):
            _remove_abandoned(parent)


def _remove_abandoned(parent: Path) -> None:
    """Remove the spills in parent whose owner is gone: their lock is free (a killed process's flock goes with it)."""
    for entry in parent.iterdir():
        if not _SPILL_NAME.match(entry.name) or not entry.is_dir():
            continue
        try:
            fd = os.open(entry / LOCK, os.O_RDWR)
        except FileNotFoundError:
            shutil.rmtree(entry, ignore_errors=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its owner lives
        finally:
            os.close(fd)
        shutil.rmtree(entry, ignore_errors=True)


def _remove(directory: Path, fd: int) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    os.close(fd)
