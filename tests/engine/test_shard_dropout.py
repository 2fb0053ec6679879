"""Hidden dropout on label shards, in one process (no Ray): the shards' replicated hidden layers drop the same
units, so they stay identical, and the driver's raised auto rate and restored best model reach every shard."""

from __future__ import annotations

import numpy as np

from engine import generate, schedule
from engine.config import ModelConfig, OptimizerConfig, SamplingConfig, ScheduleConfig, SlideConfig
from engine.distributed.shard import ShardTrainer

CFG = SlideConfig(
    model=ModelConfig(hidden=(32,), sample_output=True),
    sampling=SamplingConfig(rehash_n0=5, random_negatives=8),
    optimizer=OptimizerConfig(batch_size=64, hidden_dropout=0.3),
    schedule=ScheduleConfig(epochs=1, eval_points=None),
    threads=1,
    seed=11,
)


def step(shards: list[ShardTrainer], points: np.ndarray) -> None:
    """One training step of a label-sharded model, its four stages as DistributedTrainer.train_step runs them."""
    tops = [s.forward(points, 1e-2) for s in shards]
    top = np.max(np.stack(tops), axis=0)
    total = sum(s.exps(top) for s in shards)
    parts = [s.update(total) for s in shards]
    grads = sum(p[1] for p in parts)
    for s in shards:
        s.backward(grads)


def hidden_arrays(shard: ShardTrainer) -> list[np.ndarray]:
    model = shard.model
    return [model.weights[0], model.b0, *model.weights[1 : model.depth - 1], shard.adam.m[0], shard.adam.v[0]]


def test_shards_drop_the_same_hidden_units():
    train, _ = generate("tiny", seed=5)
    shards = [ShardTrainer(CFG, train, p, 2) for p in range(2)]
    assert shards[0]._seed != shards[1]._seed  # their own negatives...
    order = shards[0].epoch_order(0)
    for b in range(6):
        step(shards, order[b * 64 : (b + 1) * 64])
    for a, b in zip(hidden_arrays(shards[0]), hidden_arrays(shards[1]), strict=True):
        np.testing.assert_array_equal(a, b)  # ...but the same dropout: the replicas stay identical


def test_shards_take_the_driver_s_auto_rate_and_restore_the_best_model():
    train, _ = generate("tiny", seed=5)
    auto = CFG.replace(optimizer=CFG.optimizer.replace(hidden_dropout=None))
    shards = [ShardTrainer(auto, train, p, 2) for p in range(2)]
    order = shards[0].epoch_order(0)
    for raises, rate in enumerate(schedule.AUTO_DROPOUT_RATES):
        for s in shards:
            s.sync(0, 0, False, raises)  # as DistributedTrainer.validate passes a raise on
            assert s.hidden_dropout == rate
        for b in range(2):
            step(shards, order[(2 * raises + b) * 64 : (2 * raises + b + 1) * 64])
        for a, b in zip(hidden_arrays(shards[0]), hidden_arrays(shards[1]), strict=True):
            np.testing.assert_array_equal(a, b)
    before = [np.array(w, copy=True) for w in hidden_arrays(shards[0])]
    for s in shards:
        s.set_best({"val_p_at_1": 0.5, "step": s.step, "epoch": 0, "samples": s.samples_seen}, keep=True)
    step(shards, order[:64])
    assert not np.array_equal(shards[0].model.weights[0], before[0])
    for s in shards:
        s.restore_best()
    for a, b in zip(hidden_arrays(shards[0])[:2], before[:2], strict=True):  # weights back, Adam's state goes on
        np.testing.assert_array_equal(a, b)
    assert all(np.array_equal(s.model.weights[-1], s._best_arrays[f"w{s.model.depth - 1}"]) for s in shards)
