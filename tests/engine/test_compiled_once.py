"""Each kernel is compiled once per kind of model, whichever memory its arrays live in, and the serial and threaded
compilations of one function keep their own entries in Numba's on-disk cache."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from engine._numba import read_only
from engine.config import ModelConfig, OptimizerConfig, PredictConfig, SamplingConfig, ScheduleConfig, SlideConfig
from engine.kernels import inference
from engine.kernels.groups import Layers
from engine.kernels.inference import predict_batch, predict_batch_serial
from engine.snapshot import SnapshotStore, load_model
from engine.sparse import load_dataset, save_dataset
from engine.trainer import Trainer

from . import naive


def test_read_only_views_every_array_of_a_group_and_keeps_its_type():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    mapped = np.zeros(3, np.float32)
    mapped.flags.writeable = False
    group = read_only(Layers((w, w[:1]), mapped, np.arange(2)))
    assert type(group) is Layers and isinstance(group.weights, tuple)
    for a in (*group.weights, group.b0, group.layer_slot):
        assert not a.flags.writeable
    assert np.shares_memory(group.weights[0], w) and group.b0 is mapped
    assert w.flags.writeable  # the caller's arrays stay as they were
    assert read_only(3) == 3


def test_predictions_from_memory_and_from_memory_maps_use_the_same_compiled_kernels(tmp_path):
    train = naive.planted_dataset(120, 70, 90, seed=6, vocab=6, noise=3)
    test = naive.planted_dataset(40, 70, 90, seed=7, vocab=6, noise=3)
    config = SlideConfig(
        model=ModelConfig(hidden=(16,), sample_output=True),
        optimizer=OptimizerConfig(batch_size=16),
        schedule=ScheduleConfig(epochs=1),
        sampling=SamplingConfig(hub_neurons=8),
        predict=PredictConfig(hubs=12),
        seed=5,
        threads=1,
    )
    store = SnapshotStore(tmp_path / "snapshots")
    trainer = Trainer(config, train, None, store=store)
    trainer.run()
    save_dataset(test, tmp_path / "test")
    mapped = load_dataset(tmp_path / "test", mmap=True)
    assert not mapped.x_values.flags.writeable

    def predict_all(model, data):  # a few points (the serial kernel) and all of them (the threaded one)
        out = []
        for n in (2, data.num_points):
            end = int(data.x_indptr[n])
            for mode in ("lsh", "exact"):
                x = (data.x_indptr[: n + 1], data.x_indices[:end], data.x_values[:end])
                out.append(model.predict(*x, k=5, mode=mode))
        return out

    want = predict_all(trainer.model, test)  # writable weights, tables and inputs
    names = ("predict_batch", "predict_batch_hubs", "last_hidden_batch")
    kernels = [getattr(inference, name + twin) for name in names for twin in ("", "_serial")]
    compiled = [set(k.signatures) for k in kernels]
    assert all(compiled)  # lsh went through the hub kernels (the output layer has hubs), exact through the others
    served = load_model(store.latest()[1], mmap=True)
    assert not served.weights[-1].flags.writeable
    got = predict_all(served, mapped)  # all of them read-only memory maps (and the hub rows packed)
    assert served._hub_pack is not None and served._hub_pack[0] is served.weights[-1]
    assert [set(k.signatures) for k in kernels] == compiled
    for (labels, scores), (want_labels, want_scores) in zip(got, want, strict=True):
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_array_equal(scores, want_scores)


KERNELS = """
from numba import prange

from engine._numba import kernel, parallel_kernel, renamed


def total(a):
    s = 0.0
    for i in prange(a.shape[0]):
        s += a[i]
    return s


threaded = parallel_kernel(total)
serial = kernel(renamed(total, "total_serial"))
"""


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_serial_and_threaded_compilations_of_one_function_are_cached_apart(tmp_path):
    """Numba keys its on-disk cache by module, function name and bytecode, not by compile options: a serial twin
    under the same name would load the threaded machine code (or the reverse), whichever was compiled first."""
    path = tmp_path / f"twin_kernels_{tmp_path.name.replace('-', '_')}.py"
    path.write_text(KERNELS)
    a = np.ones(100)
    first = _load(path, path.stem)
    assert first.serial(a) == first.threaded(a) == 100.0  # the serial twin compiled first, and cached
    assert not first.threaded.stats.cache_hits, "the threaded kernel loaded the serial one's cache entry"
    del sys.modules[path.stem]
    again = _load(path, path.stem)  # as a new process would: each loads its own entry
    assert again.threaded(a) == again.serial(a) == 100.0
    assert sum(again.threaded.stats.cache_hits.values()) == sum(again.serial.stats.cache_hits.values()) == 1
    assert again.threaded.py_func.__qualname__ != again.serial.py_func.__qualname__
    assert predict_batch.py_func.__qualname__ != predict_batch_serial.py_func.__qualname__


def test_a_short_last_batch_trains_with_the_kernels_of_the_full_ones(tmp_path):
    """120 points in batches of 50: the last has 20. Its scratch gradients (parts, 20, width) are contiguous like
    the full batches' (a strided slice of the (parts, 50, width) buffer would compile the kernels again)."""
    from numba import types

    from engine.kernels.forward import backward_batch
    from engine.kernels.optimizer import update_sampled_layer

    train = naive.planted_dataset(120, 70, 90, seed=6, vocab=6, noise=3)
    config = SlideConfig(
        model=ModelConfig(hidden=(16,), sample_output=True),
        optimizer=OptimizerConfig(batch_size=50),
        schedule=ScheduleConfig(epochs=1),
        seed=5,
        threads=2,
    )
    trainer = Trainer(config, train, None)
    trainer.run()
    assert trainer.step == 3
    for kernel in (backward_batch, update_sampled_layer):
        grad_inputs = [sig[0] if kernel is backward_batch else sig[-1] for sig in kernel.signatures]
        assert grad_inputs and all(isinstance(t, types.Array) and t.layout == "C" for t in grad_inputs), grad_inputs
