"""A crash during snapshot publication leaves the previous version intact.

A subprocess publishes v1, then starts publishing a big v2 and is SIGKILLed at a point the test chooses: in the
middle of writing an array file, with every file written and fsynced but before the rename that commits the
version, just after that rename, or at a few moments of an unhooked publication. A fresh SnapshotStore then sees
a complete latest version (v1, or v2 once renamed), which loads with its checksums verified; the temp dir a cut-short
publication leaves is ignored by readers, does not disturb the next publication, and is removed by the job's next
trainer (tests/faults/test_trainer_kill.py). A publication that fails with an OSError (disk full) removes its temp
dir itself.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import numpy as np
import pytest

from engine import SnapshotStore
from engine.snapshot import load_arrays
from tests.faults import scripted

PUBLISHER = r"""
import numpy as np
from engine import SnapshotStore

root, stage = sys.argv[1], sys.argv[2]

def arrays(seed, n):
    rng = np.random.default_rng(seed)
    return {"w0": rng.standard_normal(n, dtype=np.float32), "w1": rng.standard_normal(n // 2, dtype=np.float32),
            "ids": np.arange(n, dtype=np.int64)}

store = SnapshotStore(root, keep=3)
store.publish(arrays(1, 1000), {"note": "v1"})
if stage == "mid-file":  # the second array file is half written
    real_save, calls = np.save, []
    def save(path, arr, *a, **k):
        calls.append(path)
        if len(calls) < 2:
            return real_save(path, arr, *a, **k)
        data = np.ascontiguousarray(arr).tobytes()
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        hold()
    np.save = save
elif stage == "before-rename":  # every file and the manifest written and fsynced, not yet renamed
    os.rename = lambda src, dst: hold()
elif stage == "after-rename":  # renamed, old versions not yet pruned
    store.prune = hold
say("publishing")
store.publish(arrays(2, 2_000_000), {"note": "v2"})
say("published")
time.sleep(600)
"""


def _expected(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w0": rng.standard_normal(n, dtype=np.float32),
        "w1": rng.standard_normal(n // 2, dtype=np.float32),
        "ids": np.arange(n, dtype=np.int64),
    }


def _publish_and_kill(root: Path, stage: str, delay: float | None = None) -> None:
    proc = scripted.start(PUBLISHER, str(root), stage)
    try:
        assert scripted.readline(proc, timeout=60) == "publishing"
        if delay is None:
            assert scripted.readline(proc, timeout=60) == "ready"
        else:
            time.sleep(delay)  # the fault: a kill at an arbitrary moment of the publication
        scripted.kill(proc)
    finally:
        scripted.close(proc)


def _assert_version(store: SnapshotStore, version: int) -> None:
    """`version` is there, complete: its checksums verify and its arrays are the ones published."""
    arrays = load_arrays(store.path(version), mmap=False, verify=True)
    expected = _expected(1, 1000) if version == 1 else _expected(2, 2_000_000)
    assert arrays.keys() == expected.keys()
    for name, a in expected.items():
        np.testing.assert_array_equal(arrays[name], a)


@pytest.mark.parametrize(
    "stage,latest,leftover",
    [
        ("mid-file", 1, True),
        ("before-rename", 1, True),
        ("after-rename", 2, False),
    ],
)
def test_kill_during_publish_leaves_the_previous_version_intact(tmp_path, stage, latest, leftover):
    root = tmp_path / "snapshots"
    _publish_and_kill(root, stage)

    store = SnapshotStore(root)  # a fresh reader, as after a restart
    assert store.latest()[0] == latest and store.versions() == list(range(1, latest + 1))
    for v in store.versions():
        _assert_version(store, v)
    temps = list(root.glob(".publish-*"))
    assert bool(temps) == leftover, temps
    if stage == "before-rename":  # a complete-looking temp dir, manifest and all, is still not a version
        assert (temps[0] / "manifest.json").is_file()

    # The next publication is unaffected by what the crash left.
    version, path = store.publish({"w0": np.ones(4, dtype=np.float32)}, {"note": "next"})
    assert version == latest + 1 and store.latest() == (version, path)
    load_arrays(path, verify=True)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_kill_at_any_moment_of_a_publish_leaves_only_complete_versions(tmp_path, delay):
    root = tmp_path / "snapshots"
    _publish_and_kill(root, "unhooked", delay)
    store = SnapshotStore(root)
    assert store.versions() in ([1], [1, 2])
    for v in store.versions():
        _assert_version(store, v)


def test_failed_publish_removes_its_temp_dir_and_keeps_the_previous(tmp_path, monkeypatch):
    store = SnapshotStore(tmp_path / "snapshots")
    store.publish(_expected(1, 1000), {"note": "v1"})
    real_save, calls = np.save, []

    def save(file, arr, *args, **kwargs):
        calls.append(file)
        if len(calls) < 2:
            return real_save(file, arr, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(file))

    monkeypatch.setattr(np, "save", save)
    with pytest.raises(OSError) as info:
        store.publish(_expected(2, 1000), {"note": "v2"})
    assert info.value.errno == errno.ENOSPC
    assert store.versions() == [1] and not list(store.root.glob(".publish-*"))
    _assert_version(store, 1)
