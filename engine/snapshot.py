"""Versioned model snapshots: a directory of `.npy` arrays plus a JSON manifest, published atomically.

A version is written into a hidden temp directory beside the store, fsynced, then renamed to
`v000042`: readers see either the whole version or none of it, and a crash mid-write leaves the
previous versions intact. Serving maps the arrays read-only (`np.load(mmap_mode="r")`); training
resumes from the same files, optimizer state included.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .config import SlideConfig, upgrade_settings
from .lsh import HashFunctions
from .network import SlideModel, layer_slots
from .resolve import resolve
from .tables import Tables

FORMAT_VERSION = 3
"""3: the config is nested by group (`{"model": {...}, "sampling": {...}, ..., "predict": {...}, "seed": 0}`,
engine.config.GROUPS). 2 had the same settings under flat names (`hash_l`, `predict_hubs`), 1 also 0 for auto
and -1 for none/all (engine.config.LEGACY); both are migrated when read (`migrate_manifest`)."""
MANIFEST = "manifest.json"
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
PINS_DIR = ".pins"
LOCK_FILE = ".lock"
_PIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SnapshotError(RuntimeError):
    """A snapshot is missing, incomplete or fails its checksums."""


def model_arrays(model: SlideModel) -> dict[str, np.ndarray]:
    """The arrays that define a model for serving and for rehashing."""
    arrays = {f"w{layer}": w for layer, w in enumerate(model.weights)}
    arrays["b0"] = model.b0
    arrays["serve_tables"] = model.serve_tables.astype(np.uint8)
    for s, (hf, tb) in enumerate(zip(model.hashes, model.tables, strict=True)):
        arrays.update({f"hash{s}_{name}": a for name, a in zip(HashFunctions._fields, hf, strict=True)})
        arrays.update({f"table{s}_{name}": a for name, a in zip(Tables._fields, tb, strict=True)})
    return arrays


def owned_bytes(model: SlideModel) -> int:
    """Bytes of the model's arrays held in process memory rather than mapped from its snapshot's files: ~0 for
    a version loaded with mmap, the output layer and tables for one built by applying label-edit deltas
    (engine.delta), everything for a model built in memory. An array that is a view counts its whole buffer,
    once."""
    buffers: dict[int, int] = {}
    for a in model_arrays(model).values():
        root: object = a
        while isinstance(root, np.ndarray) and not isinstance(root, np.memmap) and root.base is not None:
            root = root.base
        if isinstance(root, np.memmap) or not isinstance(root, np.ndarray):
            continue  # mapped from a file (np.memmap, or a view of an mmap.mmap)
        buffers[id(root)] = root.nbytes
    return sum(buffers.values())


def manifest_config(manifest: dict) -> SlideConfig:
    """The config a snapshot was written with (from a manifest of any format)."""
    return SlideConfig.from_dict(migrate_manifest(manifest)["config"])


def manifest_resolved(manifest: dict) -> dict:
    """What the snapshot's config resolves to for its data (engine.resolve, as `Resolved.to_dict`): as its
    trainer recorded it, or, for a snapshot written before the record had per-layer plans, from its config
    and shape (with the run's values it did record)."""
    recorded = (manifest.get("trainer_state") or {}).get("resolved") or {}
    if "layers" in recorded:
        return recorded
    out = resolve(manifest_config(manifest), manifest["num_features"], manifest["num_labels"]).to_dict()
    out.update(
        {k: recorded[k] for k in ("train_points", "val_points", "steps_per_epoch", "lr_warmup_steps") if k in recorded}
    )
    return out


def model_from_arrays(config: SlideConfig, num_features: int, num_labels: int, arrays) -> SlideModel:
    slots = layer_slots(config, num_labels)
    depth = len(slots)
    n_sampled = int((slots >= 0).sum())
    weights = tuple(np.asarray(arrays[f"w{layer}"]) for layer in range(depth))
    hashes = [
        HashFunctions(*(np.asarray(arrays[f"hash{s}_{p}"]) for p in HashFunctions._fields)) for s in range(n_sampled)
    ]

    def table_array(s: int, name: str) -> np.ndarray:
        key = f"table{s}_{name}"
        if name == "serve_hubs" and key not in arrays:
            return np.zeros(0, np.int32)  # written before serving hubs existed: serve with the training hubs
        return np.asarray(arrays[key])

    tabs = [Tables(*(table_array(s, name) for name in Tables._fields)) for s in range(n_sampled)]
    # written before `auto` serving existed: the width rule (SlideModel's default)
    serve = np.asarray(arrays["serve_tables"]).astype(np.bool_) if "serve_tables" in arrays else None
    return SlideModel(config, num_features, num_labels, weights, np.asarray(arrays["b0"]), hashes, tabs, serve)


def _file_crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


class SnapshotStore:
    """Increasing versions `v000001`, `v000002`, ... under `root`, keeping the newest `keep`."""

    def __init__(self, root: str | os.PathLike, keep: int = 3):
        self.root = Path(root)
        self.keep = max(1, int(keep))

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            m = _VERSION_DIR.match(entry.name)
            if m and (entry / MANIFEST).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def latest(self) -> tuple[int, Path] | None:
        versions = self.versions()
        return (versions[-1], self.path(versions[-1])) if versions else None

    def publish(
        self,
        arrays: dict[str, np.ndarray],
        meta: dict,
        links: dict[str, tuple[Path, dict]] | None = None,
        parts: Callable[[Path], dict] | None = None,
    ) -> tuple[int, Path]:
        """Write a new version atomically and prune old ones; returns (version, path).

        links: arrays taken unchanged from another version, name -> (its .npy file, its manifest entry): hard-linked
        (copied where the file system cannot link), not written again. parts: called with the version's temp
        directory before the manifest is written, to write more of the version there (a sharded model's slices,
        each in its own fsynced subdirectory); what it returns joins the manifest."""
        self.root.mkdir(parents=True, exist_ok=True)
        version = max((int(m[1]) for e in self.root.iterdir() if (m := _VERSION_DIR.match(e.name))), default=0) + 1
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=self.root))
        try:
            files = {}
            for name, arr in arrays.items():
                path = tmp / f"{name}.npy"
                np.save(path, np.ascontiguousarray(arr))
                files[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "crc32": _file_crc32(path)}
            for name, (source, info) in (links or {}).items():
                _link_or_copy(source, tmp / f"{name}.npy")
                files[name] = dict(info)
            extra = parts(tmp) if parts is not None else {}
            manifest = {
                "format_version": FORMAT_VERSION,
                "version": version,
                "created_at": time.time(),
                **meta,
                **extra,
                "arrays": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            for f in tmp.iterdir():
                if not f.is_file():
                    continue
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            target = self.path(version)
            os.rename(tmp, target)
            _fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return version, target

    def rewrite(self, version: int, arrays: dict[str, np.ndarray], meta: dict, links: dict | None = None) -> Path:
        """Give version `version` another form of the same model, under the same number (a delta version made full,
        engine.delta.compact); returns its path. arrays and links as for `publish`; their names must be new to the
        version. Each file is written under a temp name in the version's directory, fsynced and renamed to its
        name, then the manifest is replaced in one rename of an fsynced temp file: a reader, and a process killed
        at any point, finds the old manifest with every file it names, or the new one with every file it names.
        The old form's files stay (a reader that read the old manifest may still open them). Prunes afterwards."""
        path = self.path(version)
        old = read_manifest(path)
        clash = sorted((set(arrays) | set(links or {})) & set(old["arrays"]))
        if clash:
            raise ValueError(f"version {version} has arrays named {clash} already: a rewrite adds new files only")
        for entry in path.glob(".rewrite-*"):  # what a rewrite cut short left
            entry.unlink(missing_ok=True)
        files = {}

        def put(name: str, arr: np.ndarray | None = None, source: Path | None = None) -> Path:
            tmp = path / f".rewrite-{name}.npy"
            if source is not None:
                _link_or_copy(source, tmp)
            else:
                np.save(tmp, np.ascontiguousarray(arr))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path / f"{name}.npy")
            tmp.unlink(missing_ok=True)  # a rename onto a link to the same file leaves both names
            return path / f"{name}.npy"

        for name, arr in arrays.items():
            crc = _file_crc32(put(name, arr=arr))
            files[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "crc32": crc}
        for name, (source, info) in (links or {}).items():
            put(name, source=source)
            files[name] = dict(info)
        manifest = {
            "format_version": FORMAT_VERSION,
            "version": version,
            "created_at": old.get("created_at", time.time()),
            **meta,
            "arrays": files,
        }
        tmp = path / f".rewrite-{MANIFEST}"
        tmp.write_text(json.dumps(manifest, indent=1))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_path(path)  # the renamed array files before the manifest that names them
        os.replace(tmp, path / MANIFEST)
        _fsync_path(path)
        self.prune()
        return path

    def prune(self) -> None:
        """Remove versions beyond the newest `keep`, except pinned ones (see `pin`) and those a kept delta version
        applies to (engine.delta)."""
        from .delta import kept_parents

        with self._locked():
            versions = self.versions()
            kept = set(versions[-self.keep :]) | set(self.pins().values())
            kept |= kept_parents(self.root, kept)  # the versions a kept delta version applies to
            for v in reversed(versions[: -self.keep]):  # newest first: a delta goes before what it applies to
                if v not in kept:
                    gone = self.root / f".pruned-{self.path(v).name}-{os.getpid()}"
                    try:  # out of the listing at once: a kill while removing leaves no half version listed
                        os.rename(self.path(v), gone)
                    except OSError:
                        continue
                    shutil.rmtree(gone, ignore_errors=True)
        for entry in self.root.glob(".pruned-*"):  # what a kill left
            shutil.rmtree(entry, ignore_errors=True)
        for entry in self.root.glob(".publish-*"):
            if time.time() - entry.stat().st_mtime > 3600:
                shutil.rmtree(entry, ignore_errors=True)

    # ---- pins: versions kept beyond `keep` while something (a serving alias) points at them ------------
    def _locked(self) -> contextlib.AbstractContextManager[None]:
        """An exclusive flock on `<root>/.lock`: pinning and pruning exclude each other across processes."""
        return self.file_lock(LOCK_FILE)

    @contextlib.contextmanager
    def file_lock(self, name: str) -> Iterator[None]:
        """Hold an exclusive flock on the lock file `<root>/<name>` (created if missing) until the block ends."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def pins(self) -> dict[str, int]:
        """name -> pinned version."""
        d = self.root / PINS_DIR
        out: dict[str, int] = {}
        if not d.is_dir():
            return out
        for entry in d.iterdir():
            if entry.name.startswith("."):
                continue
            try:
                out[entry.name] = int(entry.read_text().strip())
            except (OSError, ValueError):
                continue
        return out

    def pin(self, name: str, version: int) -> None:
        """Keep `version` (beyond `keep`) until `unpin(name)` or another `pin(name, ...)`. Raises SnapshotError
        when the version is not on disk (never written, or already pruned)."""
        if not _PIN_NAME.match(name):
            raise ValueError(f"pin name {name!r}: letters, digits, '.', '_' and '-' only")
        with self._locked():
            if not (self.path(version) / MANIFEST).is_file():
                raise SnapshotError(f"version {version} is not retained (versions on disk: {self.versions()})")
            d = self.root / PINS_DIR
            d.mkdir(exist_ok=True)
            tmp = d / f".{name}.tmp"
            tmp.write_text(str(int(version)))
            os.replace(tmp, d / name)

    def unpin(self, name: str) -> None:
        """Release a pin; the version goes at the next prune if it is beyond `keep`."""
        if not _PIN_NAME.match(name):
            return
        with self._locked():
            try:
                (self.root / PINS_DIR / name).unlink()
            except FileNotFoundError:
                pass


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path}: no readable manifest ({exc})") from exc
    if manifest.get("format_version") not in (1, 2, FORMAT_VERSION):
        raise SnapshotError(f"{path}: unsupported snapshot format {manifest.get('format_version')}")
    return migrate_manifest(manifest)


def migrate_manifest(manifest: dict) -> dict:
    """A manifest in the current format (the arrays are the same in all formats): the flat config of versions 1
    and 2 nested by group, version 1's numbers that meant auto or none/all made null and words, and settings
    added since given the meaning its arrays had (float32 weights and moments before weight_dtype and
    moment_dtype existed, a softmax before model.loss did)."""
    if manifest.get("format_version") in (1, 2):
        flat = {"moment_dtype": "float32", "weight_dtype": "float32", **manifest["config"]}
        manifest = {**manifest, "format_version": FORMAT_VERSION, "config": upgrade_settings(flat)[0]}
    config = manifest.get("config")
    if isinstance(config, dict) and "loss" not in config.get("model", {}):
        manifest = {**manifest, "config": {**config, "model": {**config.get("model", {}), "loss": "softmax"}}}
    return manifest


def load_arrays(path: str | os.PathLike, names=None, mmap: bool = True, verify: bool = False) -> dict:
    """Arrays of a snapshot (all or `names`), memory-mapped read-only by default; checks shapes, and
    checksums with `verify`. A delta version's are those of the full version it amounts to (engine.delta)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("delta"):
        from . import delta

        arrays = delta.full_arrays(path, manifest, mmap=mmap, verify=verify)[0]
        return {n: a for n, a in arrays.items() if names is None or n in names}
    return load_full_arrays(path, manifest, names, mmap=mmap, verify=verify)


def load_full_arrays(path: Path, manifest: dict, names=None, mmap: bool = True, verify: bool = False) -> dict:
    """The arrays a version's own files hold (a delta version's: its delta, engine.delta)."""
    out = {}
    for name, info in manifest["arrays"].items():
        if names is not None and name not in names:
            continue
        file = path / f"{name}.npy"
        if verify and _file_crc32(file) != info["crc32"]:
            raise SnapshotError(f"{file}: checksum mismatch, the snapshot is corrupt")
        arr = np.load(file, mmap_mode="r" if mmap else None)
        if list(arr.shape) != info["shape"] or str(arr.dtype) != info["dtype"]:
            raise SnapshotError(f"{file}: shape/dtype differ from the manifest")
        out[name] = np.asarray(arr) if mmap else arr
    return out


def load_model(
    path: str | os.PathLike, mmap: bool = True, verify: bool = False, base: SlideModel | None = None
) -> SlideModel:
    """The model of a snapshot, for serving: weights and tables only, memory-mapped read-only.

    A delta version (engine.delta) is its deltas applied to the full version under them, or only those after
    `base` when `base` (a model loaded from the same store, left unchanged) is a version of its chain.
    Raises SnapshotError when the version is incomplete or gone (e.g. pruned while being opened):
    callers that follow a live store should fall back to the next newest version.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("delta"):
        from . import delta

        return delta.load_model(path, manifest, mmap=mmap, verify=verify, base=base)
    names = [n for n in manifest["arrays"] if not n.startswith("opt_")]
    arrays = load_full_arrays(path, manifest, names, mmap=mmap, verify=verify)
    config = manifest_config(manifest)
    if manifest.get("shards"):
        from .distributed.snapshot import merge_shards

        model = merge_shards(path, manifest, config, mmap=mmap, verify=verify)
    else:
        model = model_from_arrays(config, manifest["num_features"], manifest["num_labels"], arrays)
    attach_text(model, manifest, arrays)
    finish_model(model, manifest)
    return model


def finish_model(model: SlideModel, manifest: dict) -> None:
    """Set what a loaded model knows of its version: its number, trainer state and serving report."""
    model.version = int(manifest["version"])
    model.trainer_state = manifest.get("trainer_state", {})
    model.serving_report = manifest.get("serving", {})


def attach_text(model: SlideModel, manifest: dict, arrays) -> None:
    """Set `model.featurizer` and `model.label_names` from a snapshot (None when it has none: snapshots of XMC
    datasets, and those written before text support)."""
    from .text import LabelNames, TextFeaturizer

    try:
        model.featurizer = TextFeaturizer.from_arrays(manifest.get("text"), arrays)
        model.label_names = LabelNames.from_arrays(arrays)
    except (KeyError, ValueError) as exc:
        raise SnapshotError(f"snapshot v{manifest.get('version')}: unreadable text featurizer ({exc})") from exc


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link of source at target, or a copy where the file system cannot link."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
