"""The memory estimate: its parts equal the arrays a Trainer allocates, and its total is within 25% of the peak
resident size of real trainer processes (a memory-accuracy check, not a timing test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest

from engine import (
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    SlideConfig,
    SnapshotStore,
    Trainer,
    generate,
    load_dataset,
    save_dataset,
)
from engine.config import with_settings
from engine.memory import estimate_for, estimate_memory, format_bytes
from engine.snapshot import model_arrays

ROOT = Path(__file__).resolve().parents[2]


def _nbytes(arrays) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays))


@pytest.mark.parametrize(
    "settings",
    [
        {"model.hidden": (32,)},
        {"model.hidden": (24, 40), "model.sample_hidden": True, "sampling.probes": 1, "optimizer.batch_size": 64},
        {
            "model.hidden": (32,),
            "model.weight_dtype": "float32",
            "optimizer.moment_dtype": "float32",
            "sampling.hash_family": "dwta",
        },
        {"model.hidden": (16,), "model.sample_output": False},
        {
            "model.hidden": (32,),
            "sampling.hash_l": 7,
            "sampling.table_bits": 6,
            "sampling.bucket_size": 9,
            "sampling.min_active": 40,
            "sampling.hub_neurons": 5,
        },
    ],
)
def test_parts_are_the_arrays_a_trainer_allocates(settings):
    """Weights, optimizer state, tables and step buffers, byte for byte, for the engine's own resolution of the
    auto settings; serving is the snapshot's model arrays."""
    train, test = generate("tiny", seed=3, num_train=300, num_test=50)
    cfg = with_settings(SlideConfig(threads=1), settings)
    trainer = Trainer(cfg, train, test)
    bufs = trainer._buffers(cfg.optimizer.batch_size)
    est = estimate_for(cfg, train, test, threads=numba.config.NUMBA_NUM_THREADS)  # the pool the buffers are for
    model = trainer.model
    assert est.parts["weights"] == _nbytes(model.weights) + model.b0.nbytes
    assert est.parts["optimizer"] == _nbytes(trainer.adam.to_arrays().values())
    tables = [a for t in model.tables for a in t] + [a for h in model.hashes for a in h]
    assert est.parts["tables"] == _nbytes(tables)
    flat = list(_leaves(bufs))
    assert est.parts["step_buffers"] == _nbytes(flat) + _nbytes(trainer._group_of_row) + trainer._grad_inputs.nbytes
    assert est.serving == _nbytes(model_arrays(model).values())
    assert est.total == est.trainer + est.serving > est.parts["baseline"]


def _leaves(x):
    """The arrays of nested tuples (the step buffers' groups of per-layer tuples)."""
    if isinstance(x, tuple):
        for y in x:
            yield from _leaves(y)
    else:
        yield x


def test_estimate_grows_with_what_drives_it():
    base = dict(num_points=10_000, num_features=6, num_labels=3)
    small = estimate_memory(SlideConfig(), **base)
    wide = estimate_memory(SlideConfig(model=ModelConfig(hidden=(200_000,), sample_output=True)), **base)
    assert wide.parts["weights"] >= 200_000 * (6 + 4) * 2  # W0 (6 x 200k) and the output layer (3 x 200,001)
    assert wide.total > small.total
    f32 = estimate_memory(
        SlideConfig(model=ModelConfig(hidden=(200_000,), sample_output=True, weight_dtype="float32")), **base
    )
    b0 = 200_000 * 4  # the input layer's biases stay float32
    assert f32.parts["weights"] - b0 == 2 * (wide.parts["weights"] - b0)
    more_threads = estimate_memory(SlideConfig(), **base, threads=64)
    assert more_threads.trainer > estimate_memory(SlideConfig(), **base, threads=1).trainer
    # grad_inputs: 16 update chunks x 128 points x 200,000 floats
    assert wide.parts["step_buffers"] > 16 * 128 * 200_000 * 4 and "step buffers" in wide.describe()
    assert format_bytes(1_230_000_000) == "1.23 GB"


def test_a_trainer_that_spills_is_not_charged_for_a_copy_of_the_best_model():
    """With a validation split a trainer keeps the best model so far: a copy in memory, or in files when it spills
    (a snapshot store or spill_dir); without a split there is no best model to keep."""
    shape = dict(num_points=20_000, num_features=500, num_labels=50_000, nnz=200_000, label_entries=60_000)
    cfg = SlideConfig(model=ModelConfig(hidden=(64,)))
    held, spilled = estimate_memory(cfg, **shape), estimate_memory(cfg, **shape, spill=True)
    assert held.parts["validation"] - spilled.parts["validation"] == held.serving == spilled.serving > 0
    assert held.trainer - spilled.trainer == held.serving
    no_split = cfg.replace(schedule=cfg.schedule.replace(val_points="none"))
    assert estimate_memory(no_split, **shape).total == estimate_memory(no_split, **shape, spill=True).total


_PROBE = textwrap.dedent(
    """
    import json, sys
    import numba
    from engine import SlideConfig, SnapshotStore, Trainer, load_dataset
    from engine.memory import estimate_for
    args = json.loads(sys.argv[1])
    train, test = load_dataset(args["train"]), load_dataset(args["test"])
    cfg = SlideConfig.from_dict(args["config"])
    trainer = Trainer(cfg, train, test, SnapshotStore(args["store"]))
    trainer.run(snapshot_every_s=0.5, should_stop=lambda: trainer.step >= args["steps"])
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    est = estimate_for(cfg, train, test, threads=numba.config.NUMBA_NUM_THREADS, spill=True)
    print(json.dumps({"peak": peak, "estimate": est.trainer, "steps": trainer.step}))
    """
)

# (dataset shape, config): small models where the interpreter dominates, wide output layers where the arrays do.
SHAPES = [
    ({"num_train": 2000, "num_test": 300}, {"model.hidden": (64,)}),
    ({"num_train": 3000, "num_test": 300, "num_labels": 60_000, "num_features": 5000}, {"model.hidden": (128,)}),
    (
        {"num_train": 3000, "num_test": 300, "num_labels": 30_000, "num_features": 5000},
        {
            "model.hidden": (256,),
            "model.weight_dtype": "float32",
            "optimizer.moment_dtype": "float32",
            "optimizer.batch_size": 256,
        },
    ),
]


@pytest.mark.parametrize("shape,config", SHAPES, ids=["tiny", "60k-labels", "float32-256"])
def test_estimate_is_within_25_percent_of_measured_peak_rss(tmp_path, warm_engine, shape, config):
    # Compile this config's kernels here first: a cold compile in the probe would add LLVM's ~260 MB to its peak. The
    # warm-up's data has the probe's labels and features (the same layers sampled) and is read from disk as the
    # probe's is, so that the kernels it compiles take the same array types.
    sizes = {k: v for k, v in shape.items() if k in ("num_labels", "num_features")}
    warm = generate("small", seed=5, num_train=300, num_test=50, **sizes)
    for name, data in zip(("warm-train", "warm-test"), warm, strict=True):
        save_dataset(data, tmp_path / name)
    warm_train, warm_test = load_dataset(tmp_path / "warm-train"), load_dataset(tmp_path / "warm-test")
    warm_cfg = with_settings(SlideConfig(), {**config, "schedule.epochs": 1, "threads": 1, "optimizer.batch_size": 64})
    Trainer(warm_cfg, warm_train, warm_test, SnapshotStore(tmp_path / "warm")).run()
    train, test = generate("small", seed=5, **shape)
    save_dataset(train, tmp_path / "train")
    save_dataset(test, tmp_path / "test")
    args = {
        "train": str(tmp_path / "train"),
        "test": str(tmp_path / "test"),
        "store": str(tmp_path / "store"),
        "config": with_settings(SlideConfig(), {**config, "schedule.epochs": 1, "threads": 1}).to_dict(),
        "steps": 8,
    }
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps"] >= 8
    ratio = result["estimate"] / result["peak"]
    print(f"{shape} {config}: estimate {result['estimate'] >> 20} MiB, peak {result['peak'] >> 20} MiB, {ratio:.2f}")
    assert 0.75 <= ratio <= 1.25, result


def test_slide_train_prints_the_estimate_first(tmp_path, capsys, warm_engine):
    from engine import write_xmc
    from engine.cli import main

    train, test = generate("tiny", seed=2, num_train=200, num_test=40)
    write_xmc(train, tmp_path / "train.txt")
    args = ["train", "--train", str(tmp_path / "train.txt"), "--out", str(tmp_path / "m"), "--quiet"]
    assert main([*args, "--hidden", "16", "--epochs", "1", "--threads", "1"]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    expected = estimate_for(
        SlideConfig(model=ModelConfig(hidden=(16,)), schedule=ScheduleConfig(epochs=1), threads=1),
        train,
        threads=numba.config.NUMBA_NUM_THREADS,
    )
    assert first["estimated_memory_bytes"] == expected.total
    assert first["estimated_memory"].startswith(format_bytes(expected.total))


def test_resume_holds_one_copy_of_the_optimizer_state(tmp_path):
    """A resumed trainer takes Adam's state from the snapshot as loaded: a zeroed copy made first and then replaced
    would count against the trainer's memory ceiling (RLIMIT_DATA counts allocated, not touched, memory)."""
    import tracemalloc

    train, test = generate("small", seed=4, num_train=400, num_test=50, num_labels=20_000)
    store = SnapshotStore(tmp_path / "store")
    first = Trainer(
        SlideConfig(
            model=ModelConfig(hidden=(64,)),
            optimizer=OptimizerConfig(batch_size=200),
            schedule=ScheduleConfig(epochs=1),
            threads=1,
        ),
        train,
        test,
        store,
    )
    first.run()
    optimizer = _nbytes([*first.adam.m, *first.adam.v, *first.adam.steps, *first.adam.drift])
    snapshot = sum(f.stat().st_size for f in store.latest()[1].glob("*.npy"))
    del first
    tracemalloc.start()
    try:
        resumed = Trainer.resume(store, train, test)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert resumed.step > 0
    assert peak < snapshot + optimizer / 2, (peak, snapshot, optimizer)
