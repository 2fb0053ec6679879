"""What a training run reports as it goes: one `TrainingMetrics` record per evaluation.

`Trainer.run` passes each record to its `on_metrics` callback and keeps them in `Trainer.history`; the service
stores them in its metrics table and returns them as a job's metric points, under the same names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class TrainingMetrics:
    """One progress record of a training run."""

    step: int
    """Optimizer steps (batches) done."""
    epoch: int
    """Epochs completed (while training, the index of the epoch in progress)."""
    samples: int
    """Training points processed so far."""
    loss: float | None
    """Mean cross-entropy per labelled point since the previous record (None if none was labelled)."""
    p_at_1: float | None
    """Precision@1 on the evaluation points of the eval set (None without an eval set)."""
    p_at_5: float | None
    """Precision@5 on the evaluation points of the eval set (None without an eval set)."""
    samples_per_s: float | None
    """Training throughput since the previous record."""
    active_fraction: float | None
    """Mean share of the output layer computed per batch since the previous record."""
    elapsed_s: float | None
    """Seconds spent in training steps so far (over every run of the job)."""
    eval_mode: str | None = None
    """How p_at_1 and p_at_5 were scored: `lsh` (hash-table candidates) or `exact` (None without an eval set)."""
    lr: float | None = None
    """The learning rate the steps since the previous record used."""
    hidden_dropout: float | None = None
    """The hidden dropout rate the steps since the previous record used (optimizer.hidden_dropout)."""
    val_p_at_1: float | None = None
    """Precision@1 on the validation split of the training data, as served (None without a split or when the
    record does not validate, e.g. the last one of an interrupted run)."""
    val_p_at_5: float | None = None
    """Precision@5 on the validation split, as served."""
    val_eval_mode: str | None = None
    """How the validation scores were computed (`lsh` or `exact`)."""
    best_val_p_at_1: float | None = None
    """The best val_p_at_1 so far: the model that scored it is the one served at the end."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The record's field names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> TrainingMetrics:
        """A record from `to_dict`'s output; a missing name is None (records saved before it existed)."""
        values: dict[str, Any] = {name: record.get(name) for name in cls.names()}
        return cls(**values)
