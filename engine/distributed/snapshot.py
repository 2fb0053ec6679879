"""A sharded snapshot served on one machine: the shards' slices merged into one SlideModel.

A sharded version is an ordinary snapshot directory whose manifest lists `shards` (label range and
subdirectory of each); every shard wrote its slice, with its own manifest, into its subdirectory
(ShardTrainer.write). `engine.snapshot.load_model` calls `merge_shards` for such a version.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import lsh, tables
from ..config import SlideConfig
from ..network import SlideModel, layer_slots
from ..snapshot import SnapshotError, load_arrays, model_from_arrays
from .shard import shard_config

MERGE_SALT = 0x5A4D
"""Mixed into the seed of the hash functions a merged output layer is hashed with."""


def shard_models(path: str | os.PathLike, manifest: dict, config: SlideConfig, mmap: bool = True, verify: bool = False):
    """The served model of every shard of a sharded version, in label order (each over its own labels)."""
    path = Path(path)
    num_features, num_labels = int(manifest["num_features"]), int(manifest["num_labels"])
    cfg = shard_config(config, num_labels)
    models = []
    expect = 0
    for entry in manifest["shards"]:
        if int(entry["lo"]) != expect:
            raise SnapshotError(f"{path}: shard {entry['shard']} starts at label {entry['lo']}, expected {expect}")
        expect = int(entry["hi"])
        d = path / entry["dir"]
        names = [n for n in _array_names(d) if not n.startswith("opt_")]
        arrays = load_arrays(d, names, mmap=mmap, verify=verify)
        models.append(model_from_arrays(cfg, num_features, expect - int(entry["lo"]), arrays))
    if expect != num_labels:
        raise SnapshotError(f"{path}: the shards cover labels [0, {expect}), the model has {num_labels}")
    return models


def merge_shards(
    path: str | os.PathLike, manifest: dict, config: SlideConfig, mmap: bool = True, verify: bool = False
) -> SlideModel:
    """One model over all labels from a sharded version. One shard is taken as it is (its tables index the
    whole layer); the output rows of several are concatenated and, for a sampled output layer, hashed into
    new tables over the whole layer (the shards' tables each index their own slice)."""
    num_features, num_labels = int(manifest["num_features"]), int(manifest["num_labels"])
    models = shard_models(path, manifest, config, mmap, verify)
    first = models[0]
    if len(models) == 1:
        return SlideModel(
            config, num_features, num_labels, first.weights, first.b0, first.hashes, first.tables, first.serve_tables
        )
    out = first.depth - 1
    w_out = np.concatenate([m.weights[out] for m in models])
    if not first.weights[0].flags.writeable:
        w_out.flags.writeable = False  # one array type for every layer, as the kernels take them (read-only maps)
    weights = (*first.weights[:out], w_out)
    slots = layer_slots(config, num_labels)
    hashes, tabs = list(first.hashes), list(first.tables)
    serve = first.serve_tables.copy()
    serve[out] = all(bool(m.serve_tables[out]) for m in models)
    if slots[out] >= 0:
        hashes, tabs = hashes[:-1], tabs[:-1]  # the output layer's slot is the last one
        in_dim = weights[out].shape[1] - 1
        rng = np.random.default_rng([config.seed, MERGE_SALT])
        hf = lsh.draw_hash_functions(config, in_dim, num_labels, rng)
        tb = tables.empty_tables(
            hf.n_tables,
            num_labels,
            hf.num_buckets,
            in_dim,
            lsh.resolve_hubs(config, num_labels),
            lsh.resolve_serve_hubs(config, num_labels),
        )
        tb.query_center[:] = first.tables[-1].query_center
        hashes.append(hf)
        tabs.append(tb)
    model = SlideModel(config, num_features, num_labels, weights, first.b0, hashes, tabs, serve)
    if slots[out] >= 0:
        model.rehash_layer(out, round_id=0)
    return model


def _array_names(directory: Path) -> list[str]:
    from ..snapshot import read_manifest

    return list(read_manifest(directory)["arrays"])


__all__ = ["merge_shards", "shard_models"]
