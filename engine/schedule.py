"""Plain functions for what a run derives from its config and data size: the step-size schedule, the
validation split and the early-stopping rule. The trainer calls them; tests check them without training.
"""

from __future__ import annotations

import numpy as np

from .config import SlideConfig

AUTO_WARMUP_MAX = 500
"""Most warm-up steps `lr_warmup_steps = None` (auto) chooses."""
AUTO_VAL_FRACTION = 0.1
AUTO_VAL_MAX = 5000
AUTO_VAL_MIN_TRAIN = 1000
"""Training sets smaller than this get no automatic validation split (too few points to rank snapshots)."""
MIN_IMPROVEMENT = 1e-4
"""A validation P@1 counts as a new best (the model kept and served) only if it beats the best so far by more
than this."""
PLATEAU_MARGIN = 0.003
"""A validation P@1 that beats the best so far by less than this is a plateau: it still becomes the best model
kept, but counts like an evaluation without a new best for the step size, hidden dropout and early stopping (a
validation P@1 that creeps up by a few points of the split an epoch is a model that has stopped learning)."""
AUTO_DROPOUT_RATES = (0.0, 0.5)
"""The hidden dropout rates `optimizer.hidden_dropout = None` (auto) steps through, one step at each raise."""
DROPOUT_STALL_EVALS = 2
"""Evaluations in a row without progress (see is_progress) at which auto raises hidden dropout. The first one
reduces the step size as before: a model that still underfits has single stalled evaluations too."""


def warmup_steps(config: SlideConfig, steps_per_epoch: int) -> int:
    """Warm-up length in steps: lr_warmup_steps, or auto a quarter of an epoch capped at AUTO_WARMUP_MAX."""
    if config.schedule.lr_warmup_steps == "none":
        return 0
    if config.schedule.lr_warmup_steps is not None:
        return int(config.schedule.lr_warmup_steps)
    return int(min(AUTO_WARMUP_MAX, max(1, steps_per_epoch // 4)))


def lr_factor(
    step: int, warmup: int, decays: int, decay: float, epochs: float = 0.0, epoch_decay: float = 1.0
) -> float:
    """Multiplier of the base step size for step `step` (0-based) after `decays` evaluations without a new
    best and `epochs` epochs of training: decay ** decays * epoch_decay ** epochs, times (step + 1) / warmup over
    the first `warmup` steps (a linear warm-up)."""
    ramp = (step + 1) / warmup if step < warmup else 1.0
    return float(ramp * decay**decays * epoch_decay**epochs)


def validation_size(config: SlideConfig, num_points: int) -> int:
    """Training points the validation split holds (see ScheduleConfig.val_points); always leaves one to train on."""
    if config.schedule.val_points == "none" or num_points < 2:
        return 0
    if config.schedule.val_points is not None:
        return int(min(int(config.schedule.val_points), num_points - 1))
    if num_points < AUTO_VAL_MIN_TRAIN:
        return 0
    return int(min(AUTO_VAL_MAX, round(AUTO_VAL_FRACTION * num_points)))


def validation_split(config: SlideConfig, num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows), both sorted int64: a seeded random subset of the training set's rows
    is held out. A function of (seed, num_points, val_points) only, so a resumed run holds out the same rows
    and baselines can train on the same split."""
    n_val = validation_size(config, num_points)
    if n_val == 0:
        return np.arange(num_points, dtype=np.int64), np.zeros(0, dtype=np.int64)
    held = np.zeros(num_points, dtype=np.bool_)
    held[np.random.default_rng([config.seed, 23]).choice(num_points, size=n_val, replace=False)] = True
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)


def is_improvement(score: float, best: float | None) -> bool:
    """Whether a validation score is a new best (by more than MIN_IMPROVEMENT)."""
    return best is None or score > best + MIN_IMPROVEMENT


def is_progress(score: float, best: float | None) -> bool:
    """Whether a validation score beats the best so far by at least PLATEAU_MARGIN (the first one always does):
    an evaluation without progress reduces the step size, counts towards early stopping or raises hidden
    dropout, even when its model is a new best (is_improvement)."""
    return best is None or score >= best + PLATEAU_MARGIN


def should_stop_early(evals_since_best: int, patience: int | str) -> bool:
    """Whether `patience` evaluations in a row ("never": never) brought no progress (see is_progress)."""
    return patience != "never" and evals_since_best >= int(patience)


def dropout_rates(config: SlideConfig, val_points: int) -> tuple[float, ...]:
    """The hidden dropout rates a run may train at, in the order it raises them: the configured rate alone, or
    (None = auto) AUTO_DROPOUT_RATES with a validation split and no dropout without one."""
    rate = config.optimizer.hidden_dropout
    if rate is not None:
        return (float(rate),)
    return AUTO_DROPOUT_RATES if val_points > 0 else (0.0,)


def raises_dropout(
    evals_without_best: int,
    raises: int,
    rates: tuple[float, ...],
    loss: float | None,
    previous_loss: float | None,
) -> bool:
    """Whether an evaluation that brought no progress (see is_progress) raises hidden dropout to the next of
    `rates` (instead of reducing the step size and counting towards early stopping): when it is at least the
    DROPOUT_STALL_EVALS-th such evaluation in a row (evals_without_best counts it), a higher rate is left, and
    the training loss still falls (`loss`, the mean loss since the previous evaluation, below `previous_loss`,
    that of the window before it at the same rate; None when unknown): validation stalls while training fits
    on, the sign of overfitting."""
    falling = loss is not None and previous_loss is not None and loss < previous_loss
    return evals_without_best >= DROPOUT_STALL_EVALS and raises + 1 < len(rates) and falling
