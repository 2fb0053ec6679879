"""The model a trainer is not using kept in files (engine.spill): the best model so far while training, and the
training state after run() while the best one is the trainer's model. The files change nothing a trainer
publishes or how it trains, and they go when they are replaced and when the trainer is done."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine import schedule
from engine.snapshot import SnapshotStore, load_arrays, model_arrays, read_manifest
from engine.spill import SPILL_DIR, Spill
from engine.trainer import TRAINING_ARRAYS, Trainer

from . import naive
from .test_selection import AUTO, CFG, LOSSES, VALS, Scripted, ScriptedLoss, kept_best

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data():
    train = naive.planted_dataset(168, 70, 90, seed=6, vocab=6, noise=3)
    test = naive.planted_dataset(40, 70, 90, seed=7, vocab=6, noise=3)
    return train, test


def points(data, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a dataset as one CSR point set (the examples of a label added)."""
    sub = data.row_slice(rows[0], rows[-1] + 1)
    return np.asarray(sub.x_indptr), np.asarray(sub.x_indices), np.asarray(sub.x_values)


def spills(trainer: Trainer) -> list[Path]:
    """The directories of spilled models the trainer holds now (one per kept model)."""
    assert trainer._spill is not None
    return sorted(p for p in trainer._spill.directory.iterdir() if p.is_dir())


# a new best at the 2nd evaluation, none at the 3rd and 4th (run() ends serving step 16's), one at the 5th in the
# second run(), then none: early stopping
PLATEAUS = [0.1, 0.3, 0.2, 0.25, 0.4, 0.3, 0.3, 0.3, 0.3]


def scripted(kind: str, data, **kw) -> Scripted:
    if kind == "auto":  # hidden dropout raised twice: training goes on from the best model kept
        trainer: Scripted = ScriptedLoss(AUTO.replace(schedule=AUTO.schedule.replace(epochs=4)), *data, **kw)
        trainer.script, trainer.losses = VALS + [0.3], LOSSES + [2.0]
    else:
        trainer = Scripted(CFG.replace(schedule=CFG.schedule.replace(epochs=4)), *data, **kw)
        trainer.script = PLATEAUS
    return trainer


def train_with_edits(trainer: Scripted, train, on_metrics=None) -> None:
    """Two runs with labels added and retired during the first and between them, a snapshot at every step."""
    edited = []

    def edit():
        if trainer.step == 20 and not edited:  # the best model (step 16's) is kept: it is edited too
            edited.append(trainer.add_labels([points(train, [3, 4, 5])], ["during"]))
            trainer.retire_labels([7])

    trainer.run(snapshot_every_s=0.0, before_step=edit, on_metrics=on_metrics)
    assert edited and trainer._serves_best()  # run() ended serving step 16's model: the training state is kept
    trainer.add_labels([points(train, [10, 11])], ["after"])
    trainer.retire_labels([9])
    trainer.publish()
    trainer.config = trainer.config.replace(schedule=trainer.config.schedule.replace(epochs=8))
    trainer.run(snapshot_every_s=0.0, on_metrics=on_metrics)


def same_version(path: Path, other: Path) -> str:
    """A version's manifest without the times in it (when it was written, how long training took), as text, once
    its arrays are checked to be other's: the same bytes."""
    manifest = read_manifest(path)
    manifest.pop("created_at")
    state = manifest["trainer_state"]
    state.pop("train_seconds")
    for h in state["history"]:
        h.pop("elapsed_s"), h.pop("samples_per_s")
    for name in manifest["arrays"]:
        assert (path / f"{name}.npy").read_bytes() == (other / f"{name}.npy").read_bytes(), (path, name)
    return json.dumps(manifest, sort_keys=True)


@pytest.mark.parametrize("kind", ["plateaus", "auto"])
def test_spilled_trainer_publishes_and_trains_as_one_holding_the_copies_in_memory(tmp_path, data, kind):
    train, _ = data
    in_memory = scripted(kind, data)
    assert in_memory._spill_parent is None
    in_memory.store = SnapshotStore(tmp_path / "memory", keep=1000)  # publishes, still keeping its copies in memory
    train_with_edits(in_memory, train)
    store = SnapshotStore(tmp_path / "files", keep=1000)
    trainer = scripted(kind, data, store=store)
    seen = []

    def on_metrics(m):
        if trainer.best is None:
            return
        # while training: no copy of the best model in memory, its files in the store's spill directory
        assert trainer._best_arrays is None and trainer._best_files is not None
        assert all(path.is_file() for path, _ in trainer._best_files.files.values())
        assert trainer._best_files.directory.parent.parent == store.root / SPILL_DIR
        assert len(spills(trainer)) == 1  # the previous best's files are gone
        seen.append(m.step)

    train_with_edits(trainer, train, on_metrics)
    assert seen
    if kind == "auto":
        assert trainer.dropout_raises == in_memory.dropout_raises == len(schedule.AUTO_DROPOUT_RATES) - 1
    # the same versions: same manifests, same bytes in every array
    assert store.versions() == in_memory.store.versions() and len(store.versions()) > 40
    for version in store.versions():
        a, b = store.path(version), in_memory.store.path(version)
        assert same_version(a, b) == same_version(b, a), version
    # the same end: the best model as `model`, the training state (now in files) behind it
    assert trainer._training_model is None and trainer._training_files is not None
    assert in_memory._training_model is not None
    for name, want in model_arrays(in_memory.model).items():
        np.testing.assert_array_equal(model_arrays(trainer.model)[name], want, err_msg=name)
    want, got = in_memory.arrays(), trainer.arrays()
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert len(spills(trainer)) == 2  # the best model's files and the training state's
    # the versions' files were never changed after they were published (each still matches its checksum), and one
    # published now links the spilled files rather than holding copies
    for version in store.versions():
        load_arrays(store.path(version), verify=True)
    newest = trainer.publish()[1]
    assert os.path.samefile(newest / "w1.npy", trainer._best_files.files["w1"][0])
    assert os.path.samefile(newest / f"{TRAINING_ARRAYS}w1.npy", trainer._training_files.arrays.files["w1"][0])
    # done: the spill directory goes, the versions keep their files
    directory = trainer._spill.directory
    trainer.close()
    assert not directory.exists() and not list((store.root / SPILL_DIR).glob("spill-*"))
    load_arrays(newest, verify=True)
    with pytest.raises(RuntimeError, match="closed"):
        trainer.run()
    with pytest.raises(RuntimeError, match="closed"):
        trainer.publish()


def test_resume_links_the_served_model_and_trains_as_an_uninterrupted_run(tmp_path, data):
    cfg = CFG.replace(schedule=CFG.schedule.replace(epochs=4, early_stop_patience="never"))
    straight = Trainer(cfg, *data, store=SnapshotStore(tmp_path / "straight"))
    straight.run()
    store = SnapshotStore(tmp_path / "run")
    first = Trainer(cfg, *data, store=store)
    first.run(should_stop=lambda: first.step >= 21)
    path = store.latest()[1]
    assert read_manifest(path)["trainer_state"]["training_arrays"] == TRAINING_ARRAYS
    resumed = Trainer.resume(store, *data)
    # the best model the snapshot serves is taken as its files are, not read into memory
    assert resumed._best_arrays is None and resumed._serves_best()
    for name, (file, info) in resumed._best_files.files.items():
        assert os.path.samefile(file, path / f"{name}.npy") and info == read_manifest(path)["arrays"][name]
    resumed.run()
    assert resumed.best == straight.best
    for name, want in straight.arrays().items():
        np.testing.assert_array_equal(resumed.arrays()[name], want, err_msg=name)
    for name, want in model_arrays(straight.model).items():
        np.testing.assert_array_equal(model_arrays(resumed.model)[name], want, err_msg=name)
    # the version resumed from is intact, though its files were linked into the spill directory
    load_arrays(path, verify=True)


def test_without_a_store_the_copies_stay_in_memory_unless_given_a_spill_dir(tmp_path, data):
    trainer = scripted("plateaus", data)
    trainer.run()
    assert trainer._best_arrays is not None and trainer._training_model is not None and trainer._spill is None
    spilled = scripted("plateaus", data, spill_dir=tmp_path / "spill")
    spilled.run()
    assert spilled._best_arrays is None and spilled._training_model is None
    assert len(spills(spilled)) == 2
    assert spilled._spill.directory.parent == tmp_path / "spill"
    for name, want in model_arrays(trainer.model).items():
        np.testing.assert_array_equal(model_arrays(spilled.model)[name], want, err_msg=name)
    # collected with the trainer: nothing left on disk
    directory = spilled._spill.directory
    del spilled
    gc.collect()
    assert not directory.exists()


_HOLD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from engine.spill import Spill
    spill = Spill(sys.argv[1])
    spill.write({"w1": np.ones(1000, np.float32)})
    print(spill.directory, flush=True)
    time.sleep(600)
    """
)


def test_the_spill_of_a_killed_trainer_is_removed_by_the_next_one(tmp_path, data):
    store = SnapshotStore(tmp_path / "store")
    parent = store.root / SPILL_DIR
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(parent)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        killed = Path(proc.stdout.readline().strip())
        assert (killed / "000001" / "w1.npy").is_file()
        live = Spill(parent)  # another trainer's, alive
        live.write({"w1": np.zeros(3, np.float32)})
        Trainer(CFG, *data, store=store)
        assert killed.exists()  # its owner still runs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    Trainer(CFG, *data, store=store)
    assert not killed.exists() and live.directory.exists()
    other = parent / "kept"  # not a spill: left alone
    other.mkdir()
    Trainer(CFG, *data, store=store)
    assert other.exists() and store.versions() == []
    live.close()
    assert not live.directory.exists()


@pytest.mark.parametrize("in_files", [False, True])
def test_training_on_from_a_restored_best_model_leaves_the_kept_one_as_it_was(tmp_path, data, in_files):
    trainer = ScriptedLoss(AUTO, *data, spill_dir=tmp_path if in_files else None)
    # the best at the 2nd evaluation; the 4th raises hidden dropout (the loss fell), going on from it; no new best
    trainer.script, trainer.losses = [0.1, 0.3, 0.2, 0.25, 0.2, 0.2, 0.2, 0.2], LOSSES
    kept: list[dict] = []

    def on_metrics(m):
        if m.epoch >= 2:
            kept.append({k: np.array(a) for k, a in kept_best(trainer).items()})

    trainer.run(on_metrics=on_metrics)
    assert trainer.dropout_raises >= 1 and trainer.best["step"] == 16
    for later in kept[1:]:
        for name, want in kept[0].items():
            np.testing.assert_array_equal(later[name], want, err_msg=name)
    np.testing.assert_array_equal(trainer.model.weights[1], kept[0]["w1"])  # the final model is the best one
