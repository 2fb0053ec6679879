"""Label-sharded training and serving on a Ray cluster (Ray is an optional extra: pip install -e '.[ray]').

`DistributedTrainer` trains a model whose output layer is split by label over P Ray actors; a sharded
snapshot is served merged on one machine by `engine.snapshot.load_model`. Importing this package does not
import Ray; starting shards does.
"""

from __future__ import annotations

from .shard import ShardTrainer, label_ranges
from .trainer import DistributedTrainer, ShardedModel, ShardGroup, ShardLostError, connect, is_sharded

__all__ = [
    "DistributedTrainer",
    "ShardGroup",
    "ShardLostError",
    "ShardTrainer",
    "ShardedModel",
    "connect",
    "is_sharded",
    "label_ranges",
]
