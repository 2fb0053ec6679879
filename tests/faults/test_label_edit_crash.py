"""A kill during a label edit leaves the model as it was before the edit or as it is after it, never anything else.

A subprocess edits a trained model's store again and again (edit i adds the label `n{i}` and retires label i), the
edits published as delta versions (engine.delta) and, when the chain is full, as a full version; it is SIGKILLed
before the rename that commits an edit, just after it (before pruning), or at moments of an unhooked run. A fresh
reader then serves the newest version, read from disk with its checksums verified: it holds every edit that was
committed and none of the one cut short, and the next edit publishes on top of it.

A compaction (engine.delta.compact: the newest delta version rewritten as a full version under its own number) is
killed after some of its files, before its manifest replaces the delta's, or after that (before pruning): the
newest version keeps its number and its model, and compacting again or editing picks up from there.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

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
    load_model,
)
from engine.labels import edit_snapshot
from engine.snapshot import read_manifest
from tests.faults import scripted

EDITOR = r"""
from engine import SnapshotStore, delta
from engine.labels import edit_snapshot

root, stage, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
delta.MAX_DEPTH = 2
store = SnapshotStore(root, keep=1)
edit = 0

real_rename, real_prune = os.rename, SnapshotStore.prune
def rename(src, dst):
    if stage == "before-rename" and edit == at:
        hold()
    real_rename(src, dst)
def prune(self):
    if stage == "after-rename" and edit == at:
        hold()
    real_prune(self)
os.rename, SnapshotStore.prune = rename, prune

say("editing")
for edit in range(at + 1 if stage != "unhooked" else 10**9):  # unhooked: until the kill
    edit_snapshot(store, add=[(f"n{edit}", [([1, 2, 3], [1.0, 0.5, 0.25]), ([2, 4], [1.0, 1.0])])], retire=[edit])
    say(f"done {edit}")
"""

COMPACTOR = r"""
from engine import SnapshotStore, delta

root, stage = sys.argv[1], sys.argv[2]
store = SnapshotStore(root, keep=1)

real_replace, real_prune, replaced = os.replace, SnapshotStore.prune, []
def replace(src, dst):
    if stage == "before-manifest" and str(dst).endswith("manifest.json"):
        hold()
    real_replace(src, dst)
    replaced.append(dst)
    if stage == "mid-files" and len(replaced) == 2:
        hold()
def prune(self):
    if stage == "after-manifest":
        hold()
    real_prune(self)
os.replace, SnapshotStore.prune = replace, prune

say("compacting")
delta.compact(store)
say("done")
"""

CFG = SlideConfig(
    model=ModelConfig(hidden=(16,), sample_output=True, weight_dtype="bfloat16"),
    optimizer=OptimizerConfig(batch_size=64),
    schedule=ScheduleConfig(epochs=1),
    threads=1,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, int]:
    train, _ = generate("tiny", seed=4, num_train=600, num_test=0)
    root = tmp_path_factory.mktemp("edits") / "src"
    Trainer(CFG, train, None, SnapshotStore(root, keep=1)).run()
    return root, train.num_labels


def _edit_and_kill(root: Path, stage: str, at: int, delay: float | None = None) -> int:
    """Run the editor until the kill; returns how many edits it reported done."""
    proc = scripted.start(EDITOR, str(root), stage, str(at))
    done = 0
    try:
        assert scripted.readline(proc) == "editing"
        if delay is None:
            while scripted.readline(proc) != "ready":
                done += 1
        else:
            time.sleep(delay)  # the fault: a kill at an arbitrary moment of the edits
        scripted.kill(proc)
        if delay is not None:
            done = sum(line.startswith(b"done") for line in proc.stdout.read().splitlines())
    finally:
        scripted.close(proc)
    return done


def _assert_served(root: Path, num_labels: int, edits: int) -> None:
    """The newest version holds exactly `edits` edits, read as a restarted server reads it (checksums verified)."""
    store = SnapshotStore(root, keep=1)
    model = load_model(store.latest()[1], verify=True)
    assert model.num_labels == num_labels + edits
    if edits:
        assert model.label_names.to_list()[num_labels:] == [f"n{i}" for i in range(edits)]
    status = model.label_status()
    assert [i for i, s in enumerate(status) if s == "retired"] == list(range(edits))
    got = model.predict(np.array([0, 3]), np.array([1, 2, 3]), np.array([1.0, 0.5, 0.25]), k=10, mode="exact")[0]
    assert not np.isin(got, np.arange(edits)).any()
    for v in store.versions():  # every version on disk loads, its chain included
        load_model(store.path(v), verify=True)


@pytest.mark.parametrize(
    "stage,at",
    [
        ("before-rename", 1),  # a delta on a delta, not yet committed
        ("after-rename", 1),  # committed, its chain not yet pruned
        ("before-rename", 2),  # the compaction into a full version, not yet committed
        ("after-rename", 2),  # committed, the chain it replaces not yet pruned
    ],
)
def test_kill_during_a_label_edit_serves_the_version_before_or_after_it(tmp_path, trained, stage, at):
    src, num_labels = trained
    root = tmp_path / "m"
    shutil.copytree(src, root)
    done = _edit_and_kill(root, stage, at)
    assert done == at
    committed = at + (stage == "after-rename")
    _assert_served(root, num_labels, committed)
    kind = "delta" if committed in (1, 2) else "full"
    assert ("delta" in read_manifest(SnapshotStore(root).latest()[1])) == (kind == "delta")
    # the next edit is unaffected by what the kill left (a temp dir, versions not yet pruned)
    example = [([1, 2, 3], [1.0, 0.5, 0.25])]
    edit_snapshot(SnapshotStore(root, keep=1), add=[(f"n{committed}", example)], retire=[committed])
    _assert_served(root, num_labels, committed + 1)


@pytest.mark.parametrize("delay", [2.0, 4.0, 6.0])
def test_kill_at_any_moment_of_label_edits_serves_the_last_committed_one(tmp_path, trained, delay):
    src, num_labels = trained
    root = tmp_path / "m"
    shutil.copytree(src, root)
    done = _edit_and_kill(root, "unhooked", 0, delay)
    newest = load_model(SnapshotStore(root).latest()[1]).num_labels - num_labels
    assert newest in (done, done + 1)  # the kill may fall between a commit and its report
    _assert_served(root, num_labels, newest)


@pytest.mark.parametrize("stage", ["mid-files", "before-manifest", "after-manifest"])
def test_kill_during_a_compaction_keeps_the_newest_version_and_its_model(tmp_path, trained, stage):
    from engine import delta

    src, num_labels = trained
    root = tmp_path / "m"
    shutil.copytree(src, root)
    store = SnapshotStore(root, keep=1)
    example = [([1, 2, 3], [1.0, 0.5, 0.25])]
    for i in range(2):
        edit = edit_snapshot(store, add=[(f"n{i}", example)], retire=[i])
    assert read_manifest(store.path(edit.version))["delta"]["depth"] == 2
    proc = scripted.start(COMPACTOR, str(root), stage)
    try:
        assert scripted.readline(proc) == "compacting"
        assert scripted.readline(proc) == "ready"
        scripted.kill(proc)
    finally:
        scripted.close(proc)
    assert store.latest()[0] == edit.version  # the number the edit answered with, delta or full
    _assert_served(root, num_labels, 2)
    full = "delta" not in read_manifest(store.path(edit.version))
    assert full == (stage == "after-manifest")
    # compacting again completes what the kill cut short (or finds it done), and the next edit builds on it
    assert delta.compact(store) == (None if full else edit.version)
    assert "delta" not in read_manifest(store.path(edit.version)) and store.latest()[0] == edit.version
    assert not list(store.path(edit.version).glob(".rewrite-*"))
    _assert_served(root, num_labels, 2)
    edit_snapshot(store, add=[("n2", example)], retire=[2])
    _assert_served(root, num_labels, 3)
