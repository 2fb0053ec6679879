"""Label-sharded training on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster).

The shards run on the worker node (a custom `shard` resource), so removing that node kills them all.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from engine import ModelConfig, OptimizerConfig, SamplingConfig, ScheduleConfig, SlideConfig, generate  # noqa: E402
from engine.config import with_settings  # noqa: E402
from engine.distributed import DistributedTrainer, ShardLostError  # noqa: E402
from engine.metrics import precision_at_k  # noqa: E402
from engine.snapshot import SnapshotStore, load_arrays, load_model, read_manifest  # noqa: E402
from engine.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.slow

ON_WORKER = {"resources": {"shard": 1}}
NODE = {"num_cpus": 2, "resources": {"shard": 2}, "object_store_memory": 80 * 2**20}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 * 2**20})
    c.add_node(**NODE)
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def data():
    return generate("tiny", seed=5)


def config(over: dict) -> SlideConfig:
    base = SlideConfig(
        model=ModelConfig(
            hidden=(32,), output_init="random", loss="softmax"
        ),  # the single-process twins train as shards do
        sampling=SamplingConfig(rehash_n0=5),
        optimizer=OptimizerConfig(batch_size=64),
        schedule=ScheduleConfig(epochs=1, eval_points=None),
        threads=1,
        seed=11,
    )
    return with_settings(base, over)


@pytest.mark.parametrize("sample_output, dropout", [(True, 0.0), (False, 0.0), (True, 0.3)])
def test_one_shard_is_the_single_process_trainer(cluster, data, tmp_path, sample_output, dropout):
    """P=1 runs the sharded stages and reproduces Trainer bit for bit: metrics, model and optimizer (hidden dropout
    draws the same units in both)."""
    train, test = data
    cfg = config({"model.sample_output": sample_output, "schedule.epochs": 2, "optimizer.hidden_dropout": dropout})
    single = Trainer(cfg, train, test, SnapshotStore(tmp_path / "single"))
    want = single.run()
    with DistributedTrainer(
        cfg, train, test, SnapshotStore(tmp_path / "sharded"), shards=1, actor_options=ON_WORKER
    ) as sharded:
        got = sharded.run()
        assert sharded.group.bytes_sent > 0
    for key in ("loss", "p_at_1", "p_at_5", "val_p_at_1", "best_val_p_at_1", "step", "samples"):
        assert got[key] == want[key], key
    assert [m.loss for m in sharded.history] == [m.loss for m in single.history]
    single_version = SnapshotStore(tmp_path / "single").latest()[1]
    sharded_version = SnapshotStore(tmp_path / "sharded").latest()[1]
    a = load_arrays(single_version)
    b = load_arrays(sharded_version / "shard-000")
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name
    merged = load_model(sharded_version)
    x = test.row_slice(0, 200)
    want_pred = load_model(single_version).predict(x.x_indptr, x.x_indices, x.x_values, k=5)
    got_pred = merged.predict(x.x_indptr, x.x_indices, x.x_values, k=5)
    assert np.array_equal(want_pred[0], got_pred[0]) and np.array_equal(want_pred[1], got_pred[1])


VALS = [0.1, 0.3, 0.2, 0.25, 0.35, 0.3]
LOSSES = [5.0, 4.0, 3.0, 2.5, 2.6, 2.4]


def scripted(cls: type) -> type:
    """`cls` with a scripted validation P@1 (VALS, one per evaluation) and training loss (LOSSES[epoch])."""

    class Scripted(cls):  # type: ignore[misc, valid-type]
        def _validation_scores(self, val):
            score = VALS[len([h for h in self.history if h.val_p_at_1 is not None])]
            return {"val_p_at_1": score, "val_p_at_5": score / 2, "val_eval_mode": "exact"}

        def train_step(self, points):
            epoch = self.epoch
            _, labelled, active = super().train_step(points)
            return LOSSES[epoch] * labelled, labelled, active

    return Scripted


def test_one_shard_raises_auto_dropout_from_the_best_model_as_the_single_process_trainer(cluster, data, tmp_path):
    """A raise of auto hidden dropout (epoch 4: a second stall while the loss falls) reaches the shard, which goes
    back to its best model: the sharded run stays the single-process one, bit for bit."""
    train, test = data
    cfg = config({"schedule.epochs": 6, "schedule.val_points": 300, "schedule.early_stop_patience": "never"})
    single = scripted(Trainer)(cfg, train, test, SnapshotStore(tmp_path / "single"))
    single.run()
    assert [h.hidden_dropout for h in single.history] == [0.0] * 4 + [0.5] * 2 and single.best["epoch"] == 5
    with scripted(DistributedTrainer)(
        cfg, train, test, SnapshotStore(tmp_path / "sharded"), shards=1, actor_options=ON_WORKER
    ) as sharded:
        sharded.run()
        assert [h.hidden_dropout for h in sharded.history] == [h.hidden_dropout for h in single.history]
        assert [h.p_at_1 for h in sharded.history] == [h.p_at_1 for h in single.history]
    a = load_arrays(SnapshotStore(tmp_path / "single").latest()[1])
    b = load_arrays(SnapshotStore(tmp_path / "sharded").latest()[1] / "shard-000")
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def two_shards(cluster, data, tmp_path_factory):
    """A model trained on two shards (its run's result, the exact top-5 its shards serve for the first 300 test
    points, its snapshot store) and the single-process run's result at the same seed. The shards stop here, so
    that the next tests find the worker node free."""
    train, test = data
    cfg = config(
        {
            "model.sample_output": True,
            "schedule.epochs": 4,
            "schedule.val_points": "none",
            "sampling.random_negatives": 100,
        }
    )
    root = tmp_path_factory.mktemp("two")
    single_result = Trainer(cfg, train, test).run()
    x = test.row_slice(0, 300)
    with DistributedTrainer(cfg, train, test, SnapshotStore(root), shards=2, actor_options=ON_WORKER) as trainer:
        assert trainer.group.shards == 2
        result = trainer.run()
        served = trainer.model.predict(x.x_indptr, x.x_indices, x.x_values, k=5, mode="exact")
    return result, served, single_result, root


def test_two_shards_reach_the_single_process_p_at_1(two_shards):
    result, _, single_result, _ = two_shards
    assert result["p_at_1"] > 0.3
    # reaches the single-process P@1 within 0.01 (two shards draw their own negatives: it may also do better)
    assert result["p_at_1"] >= single_result["p_at_1"] - 0.01


def test_merged_predictions_are_the_whole_models(two_shards, data):
    """Fanned-out predictions (P x k candidates merged) equal exact predictions of the merged snapshot."""
    _, (labels, scores), _, root = two_shards
    _, test = data
    version = SnapshotStore(root).latest()[1]
    manifest = read_manifest(version)
    assert [(s["lo"], s["hi"]) for s in manifest["shards"]] == [(0, 250), (250, 500)]
    whole = load_model(version)
    assert whole.num_labels == 500
    x = test.row_slice(0, 300)
    want_labels, want_scores = whole.predict(x.x_indptr, x.x_indices, x.x_values, k=5, mode="exact")
    assert np.array_equal(scores, want_scores)
    assert np.array_equal(labels, want_labels)
    assert (labels >= 250).any() and (labels < 250).any()
    # the merged model's own tables serve it too
    lsh_labels, _ = whole.predict(x.x_indptr, x.x_indices, x.x_values, k=5, mode="lsh")
    assert precision_at_k(lsh_labels, x.y_indptr, x.y_indices, 1) > 0.2


def test_cli_trains_on_shards_and_resumes(cluster, data, tmp_path, capsys):
    from engine import write_xmc
    from engine.cli import main

    train, test = data
    files = [str(write_xmc(d, tmp_path / f"{name}.txt")) for d, name in ((train, "train"), (test, "test"))]
    common = ["train", "--train", files[0], "--test", files[1], "--out", str(tmp_path / "m"), "--quiet"]
    settings = ["--hidden", "32", "--threads", "1", "--batch-size", "64", "--sample-output", "true"]
    assert main([*common, *settings, "--epochs", "1", "--shards", "2"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert '"shard_labels": [250, 250]' in first[0] and '"done": true' in first[-1]
    assert main([*common, "--epochs", "2", "--shards", "2", "--resume"]) == 0  # the snapshot's config: 1 epoch
    version = SnapshotStore(tmp_path / "m").latest()[1]
    assert len(read_manifest(version)["shards"]) == 2
    assert main(["eval", "--model", str(tmp_path / "m"), "--test", files[1], "--mode", "exact"]) == 0
    assert '"p_at_1"' in capsys.readouterr().out


def test_losing_a_node_stops_training_and_resume_completes(cluster, data, tmp_path):
    train, test = data
    cfg = config({"model.sample_output": True, "schedule.epochs": 6, "schedule.val_points": "none"})
    store = SnapshotStore(tmp_path / "job")
    trainer = DistributedTrainer(cfg, train, test, store, shards=2, actor_options=ON_WORKER)
    failure: list[BaseException] = []

    def train_until_lost() -> None:
        try:
            trainer.run(snapshot_every_s=0.0)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            failure.append(exc)

    thread = threading.Thread(target=train_until_lost)
    thread.start()
    deadline = time.monotonic() + 120
    while (store.latest() is None or store.latest()[0] < 3) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker = next(n for n in cluster.worker_nodes)
    cluster.remove_node(worker)
    thread.join(120)
    assert not thread.is_alive()
    trainer.close()
    assert failure and isinstance(failure[0], ShardLostError), failure
    assert "resume" in str(failure[0])
    last = read_manifest(store.latest()[1])["trainer_state"]["step"]
    assert 0 < last < 6 * 32

    cluster.add_node(**NODE)
    with DistributedTrainer.resume(store, train, test, actor_options=ON_WORKER) as resumed:
        assert resumed.step == last
        result = resumed.run()
    assert result["stopped"] is False
    assert result["step"] == 6 * 32  # 2,000 points in batches of 64, six epochs
