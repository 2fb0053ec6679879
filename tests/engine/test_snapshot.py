"""Snapshots: versioned atomic publish, mmap round trip, torn writes, corruption, bit-exact resume."""

from __future__ import annotations

import json
import mmap

import numpy as np
import pytest

from engine.config import (
    FLAT_NAMES,
    LEGACY,
    ModelConfig,
    OptimizerConfig,
    PredictConfig,
    SamplingConfig,
    ScheduleConfig,
    SlideConfig,
)
from engine.snapshot import (
    FORMAT_VERSION,
    MANIFEST,
    SnapshotError,
    SnapshotStore,
    load_arrays,
    load_model,
    manifest_resolved,
    read_manifest,
)
from engine.trainer import Trainer

from . import naive

CFG = SlideConfig(
    model=ModelConfig(hidden=(16,), sample_output=True, init_std=0.05),
    sampling=SamplingConfig(
        hash_family="simhash",
        hash_k=4,
        hash_l=5,
        bucket_size=32,
        min_active=4,
        rehash_n0=3,
        rehash_lambda=0.3,
        rebuild_every=2,
    ),
    optimizer=OptimizerConfig(batch_size=16, lr=5e-3),
    schedule=ScheduleConfig(epochs=2),
    seed=5,
    threads=1,
)


@pytest.fixture(scope="module")
def data():
    train = naive.planted_dataset(120, 70, 90, seed=6, vocab=6, noise=3)
    test = naive.planted_dataset(40, 70, 90, seed=7, vocab=6, noise=3)
    return train, test


def arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((4, 3)).astype(np.float32), "b": np.arange(5, dtype=np.int64)}


def predict_both(model, test, mode):
    return model.predict(test.x_indptr, test.x_indices, test.x_values, k=5, mode=mode)


def is_memory_mapped(arr) -> bool:
    base = arr
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = getattr(base, "base", None)
    return False


# ---- the store ----------------------------------------------------------------------------------------
def test_publish_latest_versions_and_prune(tmp_path):
    store = SnapshotStore(tmp_path / "snaps", keep=2)
    assert store.versions() == [] and store.latest() is None
    published = [store.publish(arrays(i), {"note": i}) for i in range(3)]
    assert [v for v, _ in published] == [1, 2, 3]
    assert store.versions() == [2, 3]  # keep=2 pruned v1
    assert not (tmp_path / "snaps" / "v000001").exists()
    assert store.latest() == (3, tmp_path / "snaps" / "v000003")
    manifest = read_manifest(store.path(3))
    assert manifest["version"] == 3 and manifest["note"] == 2
    assert manifest["arrays"]["a"]["shape"] == [4, 3] and manifest["arrays"]["a"]["dtype"] == "float32"
    loaded = load_arrays(store.path(3), verify=True)
    for name, arr in arrays(2).items():
        np.testing.assert_array_equal(loaded[name], arr)
    assert not any(p.name.startswith(".publish-") for p in (tmp_path / "snaps").iterdir())
    # Versions keep increasing after a prune.
    assert store.publish(arrays(9), {})[0] == 4


def test_half_written_publishes_are_ignored(tmp_path):
    store = SnapshotStore(tmp_path, keep=5)
    store.publish(arrays(1), {"note": "good"})
    # A crash mid-publish leaves a hidden temp dir; a torn copy leaves a version dir without manifest.
    torn_tmp = tmp_path / ".publish-abc123"
    torn_tmp.mkdir()
    np.save(torn_tmp / "a.npy", np.zeros(3))
    torn = tmp_path / "v000007"
    torn.mkdir()
    np.save(torn / "a.npy", np.zeros(3))
    (tmp_path / "v12").mkdir()  # not a version name
    assert store.versions() == [1]
    version, path = store.latest()
    assert version == 1
    assert read_manifest(path)["note"] == "good"
    np.testing.assert_array_equal(load_arrays(path)["a"], arrays(1)["a"])
    with pytest.raises(SnapshotError, match="manifest"):
        read_manifest(torn)


def test_publish_after_a_torn_version_directory(tmp_path):
    """A version directory left without its manifest (a crash while an older version was being pruned,
    a partial copy) must not block every later publish."""
    store = SnapshotStore(tmp_path, keep=5)
    store.publish(arrays(1), {})
    torn = tmp_path / "v000002"
    torn.mkdir()
    np.save(torn / "a.npy", np.zeros(3))
    version, path = store.publish(arrays(2), {})
    assert version > 1 and store.latest() == (version, path)
    np.testing.assert_array_equal(load_arrays(path)["a"], arrays(2)["a"])


def test_corrupt_array_fails_verification(tmp_path):
    store = SnapshotStore(tmp_path)
    _, path = store.publish(arrays(3), {})
    load_arrays(path, verify=True)
    f = path / "a.npy"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF  # flip a byte of the data, not of the .npy header
    f.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="checksum"):
        load_arrays(path, verify=True)
    # Without verification the (wrong) data loads: verification is what catches it.
    assert load_arrays(path, verify=False)["a"].shape == (4, 3)
    # A file whose shape disagrees with the manifest is refused even without verify.
    np.save(f, np.zeros((2, 2), np.float32))
    with pytest.raises(SnapshotError, match="shape"):
        load_arrays(path)


def test_unsupported_format_is_refused(tmp_path):
    store = SnapshotStore(tmp_path)
    _, path = store.publish(arrays(), {})
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["format_version"] = 999
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="format"):
        read_manifest(path)


# ---- models -----------------------------------------------------------------------------------------
def test_model_round_trip_through_mmap(tmp_path, data):
    train, test = data
    store = SnapshotStore(tmp_path)
    trainer = Trainer(CFG, train, test, store=store)
    trainer.run()
    version, path = store.latest()
    served = load_model(path, mmap=True, verify=True)
    assert served.version == version
    assert served.trainer_state["step"] == trainer.step
    assert served.config == trainer.model.config
    for w in (*served.weights, served.b0, *served.tables[0], *served.hashes[0]):
        assert not w.flags.writeable
        assert is_memory_mapped(w)
    for mode in ("lsh", "exact"):
        want = predict_both(trainer.model, test, mode)
        got = predict_both(served, test, mode)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    # No optimizer state is mapped for serving.
    assert not hasattr(served, "m")
    # Loading into memory gives the same predictions too.
    in_memory = load_model(path, mmap=False)
    assert in_memory.weights[-1].flags.writeable
    np.testing.assert_array_equal(predict_both(in_memory, test, "lsh")[0], predict_both(trainer.model, test, "lsh")[0])


def run_until(trainer, steps):
    return trainer.run(should_stop=lambda: trainer.step >= steps)


@pytest.mark.parametrize("split", [5, 8, 11])  # mid-epoch (before / after a rehash), across the epoch end
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, data, split):
    train, test = data
    straight = Trainer(CFG, train, test)
    straight.run()
    total = straight.step
    assert total == 16  # 2 epochs of 8 batches

    store = SnapshotStore(tmp_path / "run")
    first = Trainer(CFG, train, test, store=store)
    result = run_until(first, split)
    assert result["stopped"] and first.step == split
    resumed = Trainer.resume(store, train, test)
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch, resumed.rehash_round) == (
        first.step,
        first.epoch,
        first.batch_in_epoch,
        first.rehash_round,
    )
    resumed.run()
    assert resumed.step == total
    want, got = straight.arrays(), resumed.arrays()
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert resumed.samples_seen == straight.samples_seen


def test_snapshot_from_before_serving_hubs_serves_with_the_training_hubs(tmp_path, data):
    from engine.snapshot import model_arrays, model_from_arrays

    train, test = data
    cfg = SlideConfig(
        model=ModelConfig(hidden=(8,), sample_output=True),
        sampling=SamplingConfig(hash_k=3, hash_l=4, hub_neurons=3),
        schedule=ScheduleConfig(epochs=1),
        predict=PredictConfig(hubs=6),
        seed=2,
    )
    trainer = Trainer(cfg, train)
    trainer.train_step(np.arange(16))
    arrays = model_arrays(trainer.model)
    assert arrays["table0_serve_hubs"].shape == (6,)
    del arrays["table0_serve_hubs"]
    old = model_from_arrays(cfg, train.num_features, train.num_labels, arrays)
    assert old.tables[0].serve_hubs.shape == (0,)
    np.testing.assert_array_equal(old.kernel_tables(serving=True).hubs[0], trainer.model.tables[0].hubs)
    labels, _ = predict_both(old, test, "lsh")
    assert labels.shape == (test.num_points, 5)


def test_resume_without_snapshot_or_with_other_data(tmp_path, data):
    train, _ = data
    with pytest.raises(FileNotFoundError):
        Trainer.resume(SnapshotStore(tmp_path / "empty"), train)
    store = SnapshotStore(tmp_path / "s")
    Trainer(CFG.replace(schedule=CFG.schedule.replace(epochs=1)), train, store=store).run()
    other = naive.planted_dataset(30, 71, 90, seed=1)
    with pytest.raises(ValueError, match="dimensions"):
        Trainer.resume(store, other)


def test_snapshot_from_before_moment_dtype_resumes_with_float32_moments(tmp_path, data):
    train, test = data
    store = SnapshotStore(tmp_path / "old")
    run_until(
        Trainer(CFG.replace(optimizer=CFG.optimizer.replace(moment_dtype="float32")), train, test, store=store), 4
    )
    _, path = store.latest()
    manifest = json.loads((path / MANIFEST).read_text())
    flat = _as_format_2(manifest["config"])  # moment_dtype came before the groups: the snapshot is format 2
    del flat["moment_dtype"]
    (path / MANIFEST).write_text(json.dumps({**manifest, "format_version": 2, "config": flat}))
    resumed = Trainer.resume(store, train, test)
    assert resumed.config.optimizer.moment_dtype == "float32" and resumed.adam.m[1].dtype == np.float32
    resumed.run()
    assert resumed.step == 16


def test_snapshot_from_before_weight_dtype_serves_and_resumes_with_float32_weights(tmp_path, data):
    train, test = data
    store = SnapshotStore(tmp_path / "old")
    old = Trainer(CFG.replace(model=CFG.model.replace(weight_dtype="float32")), train, test, store=store)
    run_until(old, 4)
    _, path = store.latest()
    manifest = json.loads((path / MANIFEST).read_text())
    flat = _as_format_2(manifest["config"])
    del flat["weight_dtype"]
    (path / MANIFEST).write_text(json.dumps({**manifest, "format_version": 2, "config": flat}))
    served = load_model(path)
    assert served.config.model.weight_dtype == "float32" and served.weights[-1].dtype == np.float32
    np.testing.assert_array_equal(predict_both(served, test, "exact")[0], predict_both(old.model, test, "exact")[0])
    resumed = Trainer.resume(store, train, test)
    assert resumed.config.model.weight_dtype == "float32" and resumed.model.weights[0].dtype == np.float32
    resumed.run()
    assert resumed.step == 16


def test_bfloat16_weights_are_stored_as_they_are(tmp_path, data):
    """A bfloat16 model's snapshot holds uint16 weights (half the bytes) and serves the same answers."""
    train, test = data
    store = SnapshotStore(tmp_path)
    trainer = Trainer(CFG.replace(model=CFG.model.replace(weight_dtype="bfloat16")), train, test, store=store)
    run_until(trainer, 4)
    _, path = store.latest()
    manifest = read_manifest(path)
    assert manifest["arrays"]["w1"]["dtype"] == "uint16" and manifest["arrays"]["opt_v1"]["dtype"] == "float32"
    served = load_model(path)
    for mode in ("lsh", "exact"):
        np.testing.assert_array_equal(predict_both(served, test, mode)[1], predict_both(trainer.model, test, mode)[1])
    arrays = load_arrays(path, ["w1"], mmap=False)
    with pytest.raises(ValueError, match="weight_dtype"):
        type(served)(
            CFG.replace(model=CFG.model.replace(weight_dtype="float32")),
            served.num_features,
            served.num_labels,
            (served.weights[0], arrays["w1"]),
            served.b0,
            served.hashes,
            served.tables,
        )


def _as_format_2(config: dict) -> dict:
    """A config as a format 2 manifest wrote it: flat names (engine.config.FLAT_NAMES), 0 for never."""
    out = {"threads": config["threads"], "seed": config["seed"]}
    for name, path in FLAT_NAMES.items():
        group, leaf = path.split(".")
        value = config[group][leaf]
        out[name] = 0 if value == "never" else value
    return out


def _as_format_1(config: dict) -> dict:
    """A config as a format 1 manifest wrote it: flat, 0 for auto, -1 for a switched-off count
    (engine.config.LEGACY)."""
    out = _as_format_2(config)
    names = {path: name for name, path in FLAT_NAMES.items()}
    for path, old in LEGACY.items():
        name = names.get(path, path)
        for number, meaning in old.items():
            if out[name] == meaning:
                out[name] = number
                break
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_a_snapshot_of_an_older_format_is_migrated_when_read(tmp_path, data, version):
    """A snapshot written before the settings groups (format 2: flat names, 0 = never) or also before auto became
    null (format 1: 0 = auto, -1 = none / all) loads, serves and resumes as the run it was; the resolved settings
    it recorded (without per-layer plans) are completed from its config."""
    train, test = data
    store = SnapshotStore(tmp_path)
    trainer = Trainer(
        CFG.replace(
            sampling=CFG.sampling.replace(hash_k=None, hard_negatives="all"),
            schedule=CFG.schedule.replace(val_points="none", epochs=1, early_stop_patience="never"),
        ),
        train,
        test,
        store,
    )
    trainer.run()
    _, path = store.latest()
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 3
    assert manifest["config"]["sampling"]["hard_negatives"] == "all"
    config = (_as_format_1 if version == 1 else _as_format_2)(manifest["config"])
    old = {**manifest, "format_version": version, "config": config}
    old["trainer_state"] = {**manifest["trainer_state"], "resolved": {"train_points": 120, "val_points": 0}}
    assert config["early_stop_patience"] == 0 and config["hidden"] == manifest["config"]["model"]["hidden"]
    if version == 1:
        assert (config["hash_k"], config["hard_negatives"], config["predict_probes"]) == (0, -1, -1)
    else:
        assert (config["hash_k"], config["hard_negatives"], config["predict_probes"]) == (None, "all", None)
    (path / MANIFEST).write_text(json.dumps(old))

    read = read_manifest(path)
    assert read["format_version"] == FORMAT_VERSION and read["config"] == manifest["config"]
    model = load_model(path)
    assert model.config == trainer.config
    for mode in ("lsh", "exact"):
        np.testing.assert_array_equal(predict_both(model, test, mode)[0], predict_both(trainer.model, test, mode)[0])
    resumed = Trainer.resume(store, train, test)
    assert resumed.config == trainer.config and resumed.step == trainer.step
    resolved = manifest_resolved(read)
    assert resolved["train_points"] == 120 and resolved["layers"]["1"]["hash_l"] == CFG.sampling.hash_l
