"""Warm starts: a training run that begins from another model's snapshot (fine-tuning on new data).

The new run takes the source's weights, hash functions and tables, Adam's state and text featurizer, and
its own data. The label and feature spaces may grow: a dataset with label names is matched to the source's
labels by name (new names get new ids after the source's), an XMC dataset by id; labels beyond the source's
get rows imprinted from the training points that carry them (engine.labels), in the tables from the first
step; features beyond the source's get random rows. A text dataset's terms are matched to the source
featurizer's, whose vocabulary grows by the new terms. The source snapshot is only read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import labels
from .adam import LazyAdamState
from .config import SlideConfig, setting, with_settings
from .memory import MemoryEstimate, estimate_memory
from .network import SlideModel, layer_slots
from .resolve import hidden_widths, output_loss
from .snapshot import SnapshotStore, attach_text, load_arrays, manifest_config, model_from_arrays, read_manifest
from .sparse import Dataset

if TYPE_CHECKING:
    from .text import TextFeaturizer

STRUCTURE_FIELDS = (
    "model.hidden",
    "model.sample_hidden",
    "model.sample_output",
    "sampling.hash_family",
    "sampling.hash_k",
    "sampling.hash_l",
    "sampling.bin_size",
    "sampling.simhash_density",
    "sampling.table_bits",
    "sampling.bucket_size",
    "sampling.insertion",
    "model.weight_dtype",
    "optimizer.moment_dtype",
    "model.normalize_input",
)
"""Settings (paths) a warm start takes from its source (the arrays are shaped by them); the rest come from the new
run."""
IMPRINT_POINTS = 32
"""Training points a new label's row is imprinted from, at most."""
_TRAINING_PREFIX = "opt_cur_"


class WarmStart(NamedTuple):
    """What a Trainer starts from: the config (structure from the source), the model and Adam's state grown
    to the data, and the data with its label and feature ids mapped to the model's."""

    config: SlideConfig
    model: SlideModel
    optimizer: LazyAdamState
    train: Dataset
    test: Dataset | None
    lr_decays: int = 0
    """The step-size decays of the source's run (engine.schedule.lr_factor), which the new run continues from."""
    lr_epochs: float = 0.0
    """The epochs of step-size decay of the source's run (Trainer.lr_epochs), which the new run continues from."""


def snapshot_path(init_from: str | os.PathLike | SnapshotStore) -> Path:
    """The version a warm start reads: a version directory itself, or the newest one of a store (or its root)."""
    if isinstance(init_from, SnapshotStore):
        store = init_from
    else:
        path = Path(init_from)
        if (path / "manifest.json").is_file():
            return path
        store = SnapshotStore(path)
    latest = store.latest()
    if latest is None:
        raise FileNotFoundError(f"no snapshot to start from in {store.root}")
    return latest[1]


def warm_start_config(source: SlideConfig, config: SlideConfig, num_labels: int) -> SlideConfig:
    """config with the source's structure settings (sample_output fixed to what the source does), and its loss
    unless config names one."""
    sampled = bool(layer_slots(source, num_labels)[-1] >= 0)
    kept = {path: setting(source, path) for path in STRUCTURE_FIELDS}
    if config.model.loss is None:
        kept["model.loss"] = output_loss(source, num_labels)
    return with_settings(config, {**kept, "model.sample_output": sampled})


def _remap(data: Dataset | None, label_map, feature_map, num_labels: int, num_features: int) -> Dataset | None:
    if data is None:
        return None
    y = np.asarray(data.y_indices)
    x = np.asarray(data.x_indices)
    return Dataset(
        np.asarray(data.x_indptr),
        feature_map[x].astype(np.int32) if feature_map is not None else x,
        np.asarray(data.x_values),
        np.asarray(data.y_indptr),
        label_map[y].astype(np.int32) if label_map is not None else y,
        num_features,
        num_labels,
    )


def merge_featurizers(old: TextFeaturizer, new: TextFeaturizer) -> tuple[np.ndarray, TextFeaturizer]:
    """(int64 map from new's feature ids to the merged one's, the merged featurizer: old's terms and weights,
    then new's unknown terms with new's weights)."""
    from .text import TextFeaturizer

    index = dict(old.vocabulary)
    terms = list(old.terms)
    idf = [old.idf]
    extra = []
    mapping = np.empty(len(new.terms), np.int64)
    for i, term in enumerate(new.terms):
        j = index.get(term)
        if j is None:
            j = index[term] = len(terms)
            terms.append(term)
            extra.append(i)
        mapping[i] = j
    idf.append(new.idf[np.asarray(extra, np.int64)])
    return mapping, TextFeaturizer(old.params, terms, np.concatenate(idf))


def points_of_labels(data: Dataset, wanted: np.ndarray, per_label: int) -> list[np.ndarray]:
    """For each label of `wanted`, up to per_label rows of data that carry it (first ones)."""
    y = np.asarray(data.y_indices)
    rows = np.repeat(np.arange(data.num_points), np.diff(np.asarray(data.y_indptr)))
    order = np.argsort(y, kind="stable")
    ys = y[order]
    out = []
    for label in wanted:
        a, b = np.searchsorted(ys, label), np.searchsorted(ys, label, side="right")
        out.append(rows[order[a : min(b, a + per_label)]])
    return out


class MappedData(NamedTuple):
    """A dataset pair in a model's label and feature ids, with the model's names and featurizer grown to it."""

    train: Dataset
    test: Dataset | None
    names: list[str] | None
    featurizer: TextFeaturizer | None


def map_data(
    source: SlideModel,
    train: Dataset,
    test: Dataset | None,
    label_names: Sequence[str] | None,
    featurizer: TextFeaturizer | None,
) -> MappedData:
    """Map a dataset pair to the labels (by name) and features (by term) of the source model; labels and
    terms it lacks get ids after its own."""
    label_map = None
    names: list[str] | None = None
    num_labels = source.num_labels
    if label_names is not None:
        label_map, names = labels.merge_label_names(source.label_names, num_labels, label_names)
        total_labels = max(num_labels, len(names))
    else:
        total_labels = max(num_labels, train.num_labels)
        if source.label_names is not None:
            names = [*source.label_names.to_list(), *(str(i) for i in range(len(source.label_names), total_labels))]
    feature_map = None
    merged = source.featurizer or featurizer
    total_features = max(source.num_features, train.num_features)
    if featurizer is not None and source.featurizer is not None:
        feature_map, merged = merge_featurizers(source.featurizer, featurizer)
        total_features = merged.num_features
    train_mapped = _remap(train, label_map, feature_map, total_labels, total_features)
    assert train_mapped is not None
    return MappedData(train_mapped, _remap(test, label_map, feature_map, total_labels, total_features), names, merged)


def warm_start(
    init_from: str | os.PathLike | SnapshotStore,
    config: SlideConfig,
    train: Dataset,
    test: Dataset | None = None,
    label_names: Sequence[str] | None = None,
    featurizer: TextFeaturizer | None = None,
) -> WarmStart:
    """Read the source snapshot and grow its model and optimizer to the data (see the module doc).

    label_names: the training set's label names (matched by name; None = by id). featurizer: the training
    set's text featurizer (its terms are matched to the source's; None = feature ids are the source's)."""
    path = snapshot_path(init_from)
    manifest = read_manifest(path)
    source_cfg = manifest_config(manifest)
    src_labels = int(manifest["num_labels"])
    cfg = warm_start_config(source_cfg, config, src_labels)
    arrays = load_arrays(path, mmap=False, verify=True)  # copies: the source stays as it is
    arrays = {n: a for n, a in arrays.items() if not n.startswith(_TRAINING_PREFIX)}
    model = model_from_arrays(cfg, manifest["num_features"], src_labels, arrays)
    attach_text(model, manifest, arrays)

    mapped = map_data(model, train, test, label_names, featurizer)
    train, test, names = mapped.train, mapped.test, mapped.names
    total_labels = train.num_labels
    model.featurizer = mapped.featurizer
    labels.grow_features(model, train.num_features, np.random.default_rng([cfg.seed, 23]))
    if total_labels > src_labels:
        new = np.arange(src_labels, total_labels)
        examples = []
        for rows in points_of_labels(train, new, IMPRINT_POINTS):
            starts, stops = np.asarray(train.x_indptr)[rows], np.asarray(train.x_indptr)[rows + 1]
            indptr = np.concatenate(([0], np.cumsum(stops - starts))).astype(np.int64)
            cols = [np.arange(s, e) for s, e in zip(starts, stops, strict=True)]
            take = np.concatenate(cols) if cols else np.zeros(0, np.int64)
            examples.append((indptr, np.asarray(train.x_indices)[take], np.asarray(train.x_values)[take]))
        labels.append_output_rows(model, labels.imprint_rows(model, examples))
    if names is not None:
        from .text import LabelNames

        model.label_names = LabelNames.from_list(names)
    optimizer = LazyAdamState.from_arrays(arrays).grown([w.shape[0] for w in model.weights])
    state = manifest.get("trainer_state") or {}
    steps_per_epoch = (state.get("resolved") or {}).get("steps_per_epoch") or 0
    epochs = float(state.get("lr_epochs_before", 0.0)) + (
        int(state.get("step", 0)) / steps_per_epoch if steps_per_epoch else 0.0
    )
    return WarmStart(cfg, model, optimizer, train, test, int(state.get("lr_decays", 0)), epochs)


class WarmShape(NamedTuple):
    """The shape of a run that starts from a snapshot: its config (structure from the source), its feature and
    label counts (grown to the data), and the bytes growing holds at once beside the trainer's arrays."""

    config: SlideConfig
    num_features: int
    num_labels: int
    extra_bytes: int


def warm_start_shape(
    init_from: str | os.PathLike | SnapshotStore,
    config: SlideConfig,
    num_features: int,
    num_labels: int,
    named: bool = False,
    label_entries: int = 0,
    nnz: int = 0,
) -> WarmShape:
    """See WarmShape. named: the data's labels are matched by name (then all of them may be new: counted as
    such). label_entries / nnz: the data's label and feature entries (training and evaluation), which warm
    starts hold in memory mapped to the model's ids (features only for text, whose terms are remapped)."""
    manifest = read_manifest(snapshot_path(init_from))
    src_labels, src_features = int(manifest["num_labels"]), int(manifest["num_features"])
    cfg = warm_start_config(manifest_config(manifest), config, src_labels)
    labels_out = src_labels + num_labels if named else max(src_labels, num_labels)
    width = hidden_widths(cfg, src_labels)[-1] + 1
    weight_bytes = 2 if cfg.model.weight_dtype == "bfloat16" else 4
    moment_bytes = 2 if cfg.optimizer.moment_dtype == "bfloat16" else 4
    # the source's output layer, its moments and step counts beside their grown copies; the remapped data
    extra = src_labels * (width * (weight_bytes + moment_bytes + 4) + 8) + 4 * label_entries
    if manifest.get("text"):
        extra += 4 * nnz
    return WarmShape(cfg, max(src_features, num_features), labels_out, int(extra))


def estimate_warm_start(
    init_from: str | os.PathLike | SnapshotStore,
    config: SlideConfig,
    train: Dataset,
    test: Dataset | None = None,
    threads: int | None = None,
    label_names: Sequence[str] | None = None,
    spill: bool = False,
) -> MemoryEstimate:
    """memory.estimate_for a run that starts from `init_from`, with a `warm_start` part (see warm_start_shape);
    spill: as estimate_memory's."""
    y = np.asarray(train.y_indptr)
    entries = int(y[-1]) if len(y) else 0
    test_entries = int(test.y_indptr[-1]) if test is not None and test.num_points else 0
    shape = warm_start_shape(
        init_from,
        config,
        train.num_features,
        train.num_labels,
        named=label_names is not None,
        label_entries=entries + test_entries,
        nnz=train.nnz + (test.nnz if test is not None else 0),
    )
    est = estimate_memory(
        shape.config,
        train.num_points,
        shape.num_features,
        shape.num_labels,
        nnz=train.nnz,
        label_entries=entries,
        max_labels_per_point=int(np.diff(y).max(initial=0)) if len(y) > 1 else 0,
        eval_points=test.num_points if test is not None else 0,
        eval_nnz=test.nnz if test is not None else 0,
        eval_label_entries=test_entries,
        threads=threads,
        spill=spill,
    )
    return with_warm_start(est, shape.extra_bytes)


def with_warm_start(est: MemoryEstimate, extra_bytes: int) -> MemoryEstimate:
    """est with a `warm_start` part of extra_bytes."""
    return MemoryEstimate({**est.parts, "warm_start": int(extra_bytes)}, est.serving, {**est.fields, "warm_start": ()})
