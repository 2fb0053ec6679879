"""The output layer's loss (`model.loss`): the auto rule, what a model and its snapshots record, what resumed runs,
warm starts and shards train with, and that the sigmoid loss learns (a statistical check with fixed seeds). Its
gradients against the naive twin are in test_kernels.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine import ModelConfig, ScheduleConfig, SlideConfig, SnapshotStore, Trainer
from engine.config import ConfigError
from engine.distributed.shard import shard_config
from engine.metrics import precision_at_k
from engine.network import SlideModel
from engine.resolve import output_loss, resolve
from engine.snapshot import MANIFEST, manifest_config, read_manifest

from . import naive

CFG = SlideConfig(
    model=ModelConfig(hidden=(16,), weight_dtype="float32"),
    schedule=ScheduleConfig(epochs=1, eval_points=None),
    threads=1,
    seed=3,
)


@pytest.fixture(scope="module")
def data():
    return naive.planted_dataset(400, 60, 30, seed=4, vocab=6, noise=2)


def _with_loss(loss: str | None) -> SlideConfig:
    return CFG.replace(model=CFG.model.replace(loss=loss))


def test_auto_is_sigmoid_up_to_wide_layers_and_shows_what_it_chose():
    assert output_loss(SlideConfig(), 20_000) == "sigmoid"
    assert output_loss(SlideConfig(), 20_001) == output_loss(SlideConfig(), 670_091) == "softmax"
    assert output_loss(_with_loss("sigmoid"), 670_091) == "sigmoid"
    assert resolve(SlideConfig(), 100, 500).to_dict()["loss"] == "sigmoid"
    assert resolve(SlideConfig(), 100, 30_000).to_dict()["loss"] == "softmax"
    assert resolve(_with_loss("softmax"), 100, 500).loss == "softmax"
    assert SlideConfig.from_dict({"model": {"loss": None}}).model.loss is None
    with pytest.raises(ConfigError, match="model.loss") as err:
        SlideConfig.from_dict({"model": {"loss": "bce"}})
    assert err.value.field == "model.loss"


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_sigmoid_output_biases_start_at_minus_log_labels(weight_dtype):
    """Each label's first probability is about 1 / labels rather than 1/2; hidden biases, and the softmax's
    output biases, start at zero."""
    for loss, bias in (("sigmoid", -math.log(300)), ("softmax", 0.0)):
        cfg = CFG.replace(model=CFG.model.replace(hidden=(8, 6), loss=loss, weight_dtype=weight_dtype))
        model = SlideModel.initialize(cfg, 20, 300)
        np.testing.assert_allclose(model.float_weights(2)[:, -1], bias, rtol=2**-8)
        np.testing.assert_array_equal(model.float_weights(1)[:, -1], 0.0)
        assert model.config.model.loss == loss


def test_snapshots_record_the_loss_and_resumed_runs_keep_it(tmp_path, data):
    store = SnapshotStore(tmp_path)
    trainer = Trainer(_with_loss(None), data, store=store)
    assert trainer.config.model.loss == "sigmoid"
    trainer.run()
    path = store.latest()[1]
    assert read_manifest(path)["config"]["model"]["loss"] == "sigmoid"
    assert Trainer.resume(store, data).config.model.loss == "sigmoid"


def test_a_snapshot_from_before_the_setting_trained_softmax(tmp_path, data):
    """A manifest without model.loss was written by a softmax run: it reads, resumes and warm-starts as one."""
    store = SnapshotStore(tmp_path / "old")
    Trainer(_with_loss("softmax"), data, store=store).run()
    path = store.latest()[1]
    manifest = json.loads((path / MANIFEST).read_text())
    del manifest["config"]["model"]["loss"]
    (path / MANIFEST).write_text(json.dumps(manifest))
    assert manifest_config(read_manifest(path)).model.loss == "softmax"
    assert Trainer.resume(store, data).config.model.loss == "softmax"
    assert Trainer(_with_loss(None), data, init_from=path).config.model.loss == "softmax"


def test_a_warm_start_keeps_its_sources_loss_unless_told(tmp_path, data):
    store = SnapshotStore(tmp_path)
    Trainer(_with_loss("softmax"), data, store=store).run()
    assert Trainer(_with_loss(None), data, init_from=store).config.model.loss == "softmax"
    assert Trainer(_with_loss("sigmoid"), data, init_from=store).config.model.loss == "sigmoid"


def test_shards_train_the_softmax_and_refuse_sigmoid():
    assert shard_config(SlideConfig(), 1000).model.loss == "softmax"
    with pytest.raises(ConfigError, match="model.loss"):
        shard_config(_with_loss("sigmoid"), 1000)


def test_sigmoid_learns_the_planted_labels():
    """Seeded check on held-out planted points: the sigmoid loss learns far above the popularity baseline and
    matches the softmax within noise (it starts slower: its biases climb from -log(labels))."""
    data = naive.planted_dataset(1200, 60, 30, seed=4, vocab=6, noise=2)
    train, test = data.row_slice(0, 900), data.row_slice(900, 1200)
    scores = {}
    for loss in ("softmax", "sigmoid"):
        cfg = CFG.replace(
            model=CFG.model.replace(hidden=(32,), loss=loss),
            optimizer=CFG.optimizer.replace(batch_size=32),
            schedule=CFG.schedule.replace(epochs=12, val_points="none"),
        )
        trainer = Trainer(cfg, train)
        trainer.run()
        pred, _ = trainer.model.predict(test.x_indptr, test.x_indices, test.x_values, k=1, mode="exact")
        scores[loss] = precision_at_k(pred, test.y_indptr, test.y_indices, 1)
    popular = np.bincount(train.y_indices, minlength=train.num_labels).argmax()
    carry = [popular in test.y_indices[test.y_indptr[i] : test.y_indptr[i + 1]] for i in range(test.num_points)]
    baseline = float(np.mean(carry))
    assert scores["sigmoid"] > baseline + 0.4, (scores, baseline)
    assert scores["sigmoid"] >= scores["softmax"] - 0.03, scores
