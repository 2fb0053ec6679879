"""Label edits stored as deltas: a version that holds only what an edit changed, on top of the version before it.

Adding or retiring labels changes a few rows of the output layer, a few entries of its hash tables and the names.
A full version rewrites the output layer and its tables, as large as the model; a delta version stores

- `delta_rows`: the new output rows, in the layer's storage dtype (their ids follow the parent's labels);
- `delta_codes` int32 (L, m): their bucket in each of the output layer's tables (L = 0 for a layer without tables);
- `delta_retired` int64: the ids the edit retired;
- `delta_names_data` / `delta_names_offsets`: the new labels' names,

with a manifest that is its parent's (config, shape, featurizer, trainer state), updated for the edit, plus
`"delta": {"parent": P, "depth": d}` (d: deltas from the nearest full version up to this one). A reader applies the
chain from that full version up, or only the deltas after a version it already holds (`load_model(path,
base=held)`), exactly as `labels.append_output_rows` and `labels.retire_labels` change a model in memory: new rows
are appended, inserted into the buckets and served to every query, retired rows get bias -inf and leave the
buckets. Every array an edit changes is a new array, so a model that requests are reading is never changed.
Adam's state of a new row is zero (optimizer arrays shorter than their layer are read as padded).

A delta is published like any version (a temp dir renamed into place, see SnapshotStore.publish), pruning keeps
every version a kept delta applies to, and an edit writes a full version instead once the chain holds MAX_DEPTH
deltas. `compact` makes the newest delta version a full version apart from an edit, under its own number, as the
service does once a chain is full (clients keep seeing the version the edit answered). A trainer's snapshots are
always full versions.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .labels import RETIRED_BIAS, _match_access, _storage, append_names, drop_from_tables, id_names, insert_rows
from .tables import Tables

if TYPE_CHECKING:
    from .config import SlideConfig
    from .network import SlideModel
    from .snapshot import SnapshotStore

MAX_DEPTH = 8
"""Deltas a chain may hold: the edit after that writes a full version."""
KEY = "delta"
TRAINING_PREFIX = "opt_cur_"
"""Arrays of the state a trainer continues from when it is not the served model: an edit starts from the served one."""
_WEIGHTS = re.compile(r"^w(\d+)$")


class Delta(NamedTuple):
    """One edit: rows appended after `first` labels (with their codes and names), then ids retired."""

    first: int
    rows: np.ndarray
    codes: np.ndarray
    retired: np.ndarray
    names: list[str]

    def arrays(self) -> dict[str, np.ndarray]:
        from .text import LabelNames

        names = LabelNames.from_list(self.names)
        return {
            "delta_rows": self.rows,
            "delta_codes": np.ascontiguousarray(self.codes, np.int32),
            "delta_retired": np.asarray(self.retired, np.int64),
            **names.to_arrays("delta_names"),
        }


def info(manifest: dict) -> dict | None:
    """The manifest's delta entry ({"parent", "depth"}), None for a full version."""
    return manifest.get(KEY)


def depth(manifest: dict) -> int:
    entry = info(manifest)
    return int(entry["depth"]) if entry else 0


def read(path: Path, manifest: dict) -> Delta:
    """A delta version's edit, its checksums verified (its files are small)."""
    from .snapshot import SnapshotError, load_full_arrays
    from .text import LabelNames

    arrays = load_full_arrays(path, manifest, mmap=False, verify=True)
    try:
        names = LabelNames.from_arrays(arrays, "delta_names")
        delta = Delta(
            int(manifest["num_labels"]) - arrays["delta_rows"].shape[0],
            arrays["delta_rows"],
            arrays["delta_codes"],
            arrays["delta_retired"],
            names.to_list() if names is not None else [],
        )
    except KeyError as exc:
        raise SnapshotError(f"{path}: delta version without its array {exc}") from exc
    m = delta.rows.shape[0]
    if delta.codes.ndim != 2 or delta.codes.shape[1] != m or len(delta.names) != m or delta.retired.ndim != 1:
        raise SnapshotError(f"{path}: the delta's arrays disagree on the number of rows it adds ({m})")
    return delta


def output_layer(arrays: dict) -> int:
    return max(int(m[1]) for n in arrays if (m := _WEIGHTS.match(n)))


def _table(arrays: dict, slot: int, name: str) -> np.ndarray:
    key = f"table{slot}_{name}"
    if name == "serve_hubs" and key not in arrays:
        return np.zeros(0, np.int32)
    return np.asarray(arrays[key])


def _grown(w: np.ndarray, delta: Delta, out: np.ndarray | None = None) -> np.ndarray:
    """The output layer w with the delta's rows appended and its retired rows zeroed (bias -inf), in `out` (rows
    (n + m, width + 1)) or a new array."""
    n, m = w.shape[0], delta.rows.shape[0]
    if out is None:
        out = np.empty((n + m, w.shape[1]), w.dtype)
    out[:n] = w
    out[n:] = delta.rows
    if delta.retired.size:
        row = np.zeros((1, w.shape[1]), np.float32)
        row[0, -1] = RETIRED_BIAS
        out[delta.retired] = _storage(row, w.dtype.type)
    return out


def apply_arrays(arrays: dict, delta: Delta, config: SlideConfig, grow: Callable | None = None) -> dict:
    """The arrays of the version `delta` makes of `arrays` (a model's, with its label names if any); those it changes
    are new arrays, the others the same objects. config: the edited version's (its structure pinned). grow(w,
    delta): the output layer it makes (default `_grown`, a new array)."""
    from .network import layer_slots
    from .snapshot import SnapshotError
    from .text import LabelNames

    out = dict(arrays)
    layer = output_layer(arrays)
    w = np.asarray(arrays[f"w{layer}"])
    first, m = int(w.shape[0]), int(delta.rows.shape[0])
    if first != delta.first:
        raise SnapshotError(f"a delta after {delta.first} labels does not apply to a model of {first}")
    total = first + m
    if delta.retired.size and (delta.retired.min() < 0 or delta.retired.max() >= total):
        raise SnapshotError(f"a delta retires a label outside [0, {total})")
    out[f"w{layer}"] = (grow or _grown)(w, delta)
    slot = int(layer_slots(config, total)[layer])
    if slot >= 0:
        tb = Tables(*(_table(arrays, slot, name) for name in Tables._fields))
        if m:
            codes = np.asarray(delta.codes, np.int32)
            buckets = tb.offsets.shape[1] - 1
            if codes.shape[0] != tb.offsets.shape[0] or codes.min() < 0 or codes.max() >= buckets:
                raise SnapshotError(f"a delta's bucket codes do not fit {tb.offsets.shape[0]} tables of {buckets}")
            tb = insert_rows(tb, codes, first, config.sampling.bucket_size)
            hubs = tb.serve_hubs if tb.serve_hubs.size else tb.hubs
            tb = tb._replace(serve_hubs=np.concatenate([hubs, np.arange(first, total, dtype=np.int32)]))
        if delta.retired.size:
            if not m:  # insert_rows made new buckets; else copy them before dropping in place
                tb = tb._replace(offsets=np.array(tb.offsets), ids=np.array(tb.ids))
            drop = np.zeros(total, np.bool_)
            drop[delta.retired] = True
            tb = drop_from_tables(tb, drop)
        out.update({f"table{slot}_{name}": a for name, a in zip(Tables._fields, tb, strict=True)})
    if m:
        old = LabelNames.from_arrays(arrays)
        if old is None or len(old) != first:
            old = id_names(first)
        out.update(append_names(old, delta.names).to_arrays())
    return out


class _Spare:
    """An output layer with room for more rows, shared by the models successive edits make: each one's layer is
    `rows[:n]` for its own n, and an edit that only adds writes its rows past the longest of them, where no model
    reads, so the models before it are unchanged and nothing is copied. An edit that retires, or one that does not
    fit, copies the layer into a new buffer."""

    ROOM = 64
    """A new buffer has room for 1/ROOM of its rows more (at least the rows being added)."""

    def __init__(self, rows: np.ndarray, used: int):
        self.rows = rows
        self.used = used
        self.lock = threading.Lock()

    @classmethod
    def append(cls, spare: _Spare | None, w: np.ndarray, delta: Delta) -> tuple[np.ndarray, _Spare]:
        n, m = w.shape[0], delta.rows.shape[0]
        if spare is not None and not delta.retired.size:
            with spare.lock:
                at_end = spare.used == n and w.__array_interface__["data"][0] == spare.rows.ctypes.data
                if at_end and n + m <= spare.rows.shape[0]:
                    spare.rows[n : n + m] = delta.rows
                    spare.used = n + m
                    return spare.rows[: n + m], spare
        rows = np.empty((n + m + max(m, n // cls.ROOM), w.shape[1]), w.dtype)
        _grown(w, delta, rows[: n + m])
        return rows[: n + m], cls(rows, n + m)


def apply_to_model(model: SlideModel, delta: Delta, manifest: dict) -> SlideModel:
    """A new model: `model` (unchanged) with the delta of the version `manifest` describes applied."""
    from .snapshot import finish_model, manifest_config, model_arrays, model_from_arrays

    arrays = model_arrays(model)
    if model.label_names is not None:
        arrays.update(model.label_names.to_arrays())
    spare: list[_Spare] = []

    def grow(w: np.ndarray, delta: Delta) -> np.ndarray:
        grown, room = _Spare.append(getattr(model, "_spare_rows", None), w, delta)
        spare.append(room)
        return grown

    arrays = apply_arrays(arrays, delta, manifest_config(manifest), grow)
    new: SlideModel = model_from_arrays(
        manifest_config(manifest), manifest["num_features"], manifest["num_labels"], arrays
    )
    new._spare_rows = spare[0]  # type: ignore[attr-defined]
    _match_access(new)
    from .text import LabelNames

    new.featurizer = model.featurizer
    new.label_names = LabelNames.from_arrays(arrays) if delta.rows.shape[0] else model.label_names
    finish_model(new, manifest)
    return new


def _chain(path: Path, manifest: dict, stop_at: int | None) -> tuple[list[tuple[Path, dict]], Path | None]:
    """The delta versions from `path` down (newest first), and the full version under them (None when the chain
    reaches version `stop_at` first)."""
    from .snapshot import SnapshotError, read_manifest

    chain = [(path, manifest)]
    while True:
        parent = int(chain[-1][1][KEY]["parent"])
        if parent == stop_at:
            return chain, None
        if parent >= int(chain[-1][1]["version"]):  # parents are older: a chain ends
            raise SnapshotError(f"{path}: a delta chain that does not end in a full version")
        parent_path = path.parent / f"v{parent:06d}"
        parent_manifest = read_manifest(parent_path)
        if not info(parent_manifest):
            return chain, parent_path
        chain.append((parent_path, parent_manifest))


def load_model(path: Path, manifest: dict, mmap: bool, verify: bool, base: SlideModel | None) -> SlideModel:
    """The model of a delta version: the deltas applied to the full version under them, or to `base` when that is
    a version of the chain (the one a server holds)."""
    from .snapshot import load_model as load_full

    held = getattr(base, "version", None) if base is not None else None
    chain, full = _chain(path, manifest, held)
    model = base if full is None else load_full(full, mmap=mmap, verify=verify)
    assert model is not None
    for p, m in reversed(chain):
        model = apply_to_model(model, read(p, m), m)
    return model


def full_arrays(
    path: Path, manifest: dict, mmap: bool = True, verify: bool = False, model: SlideModel | None = None
) -> tuple[dict, dict]:
    """(every array of a version as a full version holds them, the training state a trainer continues from left
    out (an edit starts from the served model); name -> (file, manifest entry) of those the full version under its
    chain holds as they are, which a version written from them can link). model: the version's model when the
    caller holds it: the arrays deltas change are taken from it rather than made again."""
    from .network import layer_slots
    from .snapshot import load_full_arrays, manifest_config, read_manifest

    chain: list[tuple[Path, dict]] = []
    full = path
    if info(manifest):
        chain, found = _chain(path, manifest, None)
        assert found is not None
        full = found
    full_manifest = read_manifest(full) if chain else manifest
    arrays = load_full_arrays(full, full_manifest, mmap=mmap, verify=verify)
    if (full_manifest.get("trainer_state") or {}).get("training_arrays"):
        arrays = {n: a for n, a in arrays.items() if not n.startswith(TRAINING_PREFIX)}
    layer = output_layer(arrays)
    slot = int(layer_slots(manifest_config(manifest), int(manifest["num_labels"]))[layer])
    touched = {f"w{layer}", "label_names_data", "label_names_offsets"} | {f"table{slot}_{n}" for n in Tables._fields}
    if model is not None and getattr(model, "version", None) == int(manifest["version"]):
        from .snapshot import model_arrays

        held = model_arrays(model)
        if model.label_names is not None:
            held.update(model.label_names.to_arrays())
        arrays.update({n: a for n, a in held.items() if n in touched})
    else:
        for p, m in reversed(chain):
            arrays = apply_arrays(arrays, read(p, m), manifest_config(m))
    sources = {
        n: (full / f"{n}.npy", full_manifest["arrays"][n])
        for n in arrays
        if n not in touched and n in full_manifest["arrays"]
    }
    return arrays, sources


def compact(store: SnapshotStore, model: SlideModel | None = None) -> int | None:
    """Make the newest version, when it is a delta, a full version under its own number (SnapshotStore.rewrite):
    the same model, served as the same version, and the chain under it can go at the prune that follows. Returns
    that number, None when the newest is full already. The manifest keeps the delta entry it had as
    `compacted.delta`. A kill at any moment leaves the version loadable: as the delta it was (its chain is pruned
    only after the full manifest is in place) or as the full version. model: the newest version's model when the
    caller holds it (its edited arrays are taken from it). Serialised with edits by their lock file; the caller
    makes sure no trainer writes the store."""
    import time

    from .labels import edit_lock
    from .snapshot import read_manifest

    with edit_lock(store):
        latest = store.latest()
        if latest is None:
            return None
        version, path = latest
        manifest = read_manifest(path)
        if not info(manifest):
            return None
        arrays, sources = full_arrays(path, manifest, model=model)
        links = {n: sources[n] for n in arrays if n in sources}
        own = ("arrays", "version", "created_at", "format_version", KEY)
        meta = {k: v for k, v in manifest.items() if k not in own}
        meta["compacted"] = {"at": time.time(), KEY: manifest[KEY]}
        store.rewrite(version, {n: a for n, a in arrays.items() if n not in links}, meta, links)
        return version


def kept_parents(root: Path, versions: set[int]) -> set[int]:
    """The versions the delta versions among `versions` apply to, down to their full versions."""
    from .snapshot import SnapshotError, read_manifest

    out: set[int] = set()
    todo = list(versions)
    while todo:
        v = todo.pop()
        try:
            entry = info(read_manifest(root / f"v{v:06d}"))
        except SnapshotError:
            continue
        if entry and int(entry["parent"]) not in out:
            out.add(int(entry["parent"]))
            todo.append(int(entry["parent"]))
    return out
