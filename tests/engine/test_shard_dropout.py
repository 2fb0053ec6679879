"""Hidden dropout on label shards, in one process (no Ray): the shards' replicated hidden layers drop the same
units, so they stay identical."""

from __future__ import annotations

import numpy as np

from engine import generate
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
