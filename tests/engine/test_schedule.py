"""The step-size schedule, the validation split and the early-stopping rule as plain functions."""

from __future__ import annotations

import numpy as np
import pytest

from engine import schedule
from engine.config import ConfigError, OptimizerConfig, ScheduleConfig, SlideConfig


def test_warmup_rises_linearly_to_the_base_step_size():
    factors = [schedule.lr_factor(t, 4, 0, 0.5) for t in range(6)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert schedule.lr_factor(0, 0, 0, 0.5) == 1.0  # no warm-up


def test_each_plateau_multiplies_the_step_size_by_the_decay():
    assert schedule.lr_factor(100, 4, 0, 0.5) == 1.0
    assert schedule.lr_factor(100, 4, 3, 0.5) == pytest.approx(0.125)
    assert schedule.lr_factor(1, 4, 2, 0.5) == pytest.approx(0.5 * 0.25)  # warm-up and decay multiply
    assert schedule.lr_factor(100, 4, 7, 1.0) == 1.0  # lr_decay 1: constant


def test_each_epoch_multiplies_the_step_size_by_the_epoch_decay_step_by_step():
    assert schedule.lr_factor(100, 4, 0, 0.5, 2.0, 0.8) == pytest.approx(0.64)
    assert schedule.lr_factor(100, 4, 0, 0.5, 0.5, 0.64) == pytest.approx(0.8)  # within an epoch
    assert schedule.lr_factor(1, 4, 2, 0.5, 3.0, 0.5) == pytest.approx(0.5 * 0.25 * 0.125)  # all three multiply
    assert schedule.lr_factor(100, 4, 0, 0.5, 9.0, 1.0) == 1.0  # lr_epoch_decay 1: none


def test_warmup_steps_resolution():
    assert schedule.warmup_steps(SlideConfig(), 8) == 2  # a quarter of an epoch
    assert schedule.warmup_steps(SlideConfig(), 3) == 1
    assert schedule.warmup_steps(SlideConfig(), 100_000) == schedule.AUTO_WARMUP_MAX
    assert schedule.warmup_steps(SlideConfig(schedule=ScheduleConfig(lr_warmup_steps="none")), 100) == 0
    assert schedule.warmup_steps(SlideConfig(schedule=ScheduleConfig(lr_warmup_steps=37)), 100) == 37


@pytest.mark.parametrize(
    ("val_points", "n", "want"),
    [
        (None, 999, 0),
        (None, 1000, 100),
        (None, 44_000, 4400),
        (None, 500_000, 5000),
        ("none", 500_000, 0),
        (7, 100, 7),
        (50, 10, 9),
    ],
)
def test_validation_size(val_points, n, want):
    assert schedule.validation_size(SlideConfig(schedule=ScheduleConfig(val_points=val_points)), n) == want


def test_validation_split_is_seeded_disjoint_and_complete():
    cfg = SlideConfig(schedule=ScheduleConfig(val_points=300), seed=5)
    train, val = schedule.validation_split(cfg, 2000)
    assert val.shape == (300,) and train.shape == (1700,)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(2000))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    again_train, again_val = schedule.validation_split(cfg, 2000)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    _, other = schedule.validation_split(cfg.replace(seed=6), 2000)
    assert not np.array_equal(val, other)
    # the held-out rows are spread over the file, not its head or tail (uniform: mean ~ 1000 +- 33)
    assert abs(val.mean() - 1000) < 150
    none_train, none_val = schedule.validation_split(SlideConfig(schedule=ScheduleConfig(val_points="none")), 50)
    assert none_val.size == 0 and np.array_equal(none_train, np.arange(50))


def test_improvement_and_patience():
    assert schedule.is_improvement(0.1, None)
    assert schedule.is_improvement(0.3, 0.2)
    assert not schedule.is_improvement(0.2, 0.2)
    assert not schedule.is_improvement(0.2 + schedule.MIN_IMPROVEMENT / 2, 0.2)
    assert not schedule.should_stop_early(2, 3)
    assert schedule.should_stop_early(3, 3)
    assert not schedule.should_stop_early(100, "never")


def test_a_new_best_by_less_than_the_plateau_margin_is_no_progress():
    margin = schedule.PLATEAU_MARGIN
    assert schedule.MIN_IMPROVEMENT < margin <= 0.01
    assert schedule.is_progress(0.1, None)
    best = 0.77
    scores = [0.5, 0.77, best + schedule.MIN_IMPROVEMENT * 2, best + margin * 0.9, best + margin * 1.1, 0.8, 0.95]
    for score in scores:
        assert schedule.is_progress(score, best) == (score - best >= margin), score
    # a new best kept (and served) that still counts as a plateau
    assert schedule.is_improvement(best + margin * 0.9, best) and not schedule.is_progress(best + margin * 0.9, best)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr_warmup_steps", 0),
        ("lr_decay", 0.0),
        ("lr_decay", 1.5),
        ("lr_epoch_decay", 0.0),
        ("lr_epoch_decay", 1.5),
        ("val_points", -1),
    ]
    + [("early_stop_patience", -1), ("early_stop_patience", 0)],
)
def test_new_settings_are_checked(field, value):
    with pytest.raises(ConfigError, match=f"schedule.{field}"):
        ScheduleConfig(**{field: value})


def test_dropout_rises_only_on_a_stall_while_the_loss_falls_and_a_higher_rate_is_left():
    auto = schedule.AUTO_DROPOUT_RATES
    assert schedule.dropout_rates(SlideConfig(), 100) == auto and schedule.dropout_rates(SlideConfig(), 0) == (0.0,)
    fixed = SlideConfig(optimizer=OptimizerConfig(hidden_dropout=0.4))
    assert schedule.dropout_rates(fixed, 100) == (0.4,)
    assert auto == (0.0, 0.5)
    stall = schedule.DROPOUT_STALL_EVALS
    assert stall == 2 and not schedule.raises_dropout(1, 0, auto, 2.0, 2.5)  # a single stall: the step size halves
    assert schedule.raises_dropout(2, 0, auto, 2.0, 2.5) and not schedule.raises_dropout(2, 1, auto, 2.0, 2.5)
    three = (0.0, 0.25, 0.5)
    assert schedule.raises_dropout(3, 1, three, 2.0, 2.5) and not schedule.raises_dropout(2, 2, three, 2.0, 2.5)
    assert not schedule.raises_dropout(2, 0, auto, 2.5, 2.5)  # the loss no longer falls
    assert not schedule.raises_dropout(2, 0, auto, 2.0, None)  # no window at this rate to compare with
    assert not schedule.raises_dropout(5, 0, (0.4,), 2.0, 2.5)
