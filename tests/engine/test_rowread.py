"""RowReader: compact copies of chosen dataset rows, from memory or with pread from memory-mapped files."""

from __future__ import annotations

import numpy as np
import pytest

from engine.sparse import Dataset, RowReader, load_dataset, save_dataset
from engine.synth import generate


def naive_take(data: Dataset, rows) -> Dataset:
    xs = [np.arange(data.x_indptr[r], data.x_indptr[r + 1]) for r in rows]
    ys = [np.arange(data.y_indptr[r], data.y_indptr[r + 1]) for r in rows]
    xi = np.concatenate(xs).astype(np.int64)
    yi = np.concatenate(ys).astype(np.int64)
    return Dataset(
        np.concatenate([[0], np.cumsum([len(x) for x in xs])]).astype(np.int64),
        np.asarray(data.x_indices)[xi],
        np.asarray(data.x_values)[xi],
        np.concatenate([[0], np.cumsum([len(y) for y in ys])]).astype(np.int64),
        np.asarray(data.y_indices)[yi],
        data.num_features,
        data.num_labels,
    )


def assert_same(a: Dataset, b: Dataset) -> None:
    for name in ("x_indptr", "x_indices", "x_values", "y_indptr", "y_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert (a.num_features, a.num_labels) == (b.num_features, b.num_labels)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    train, _ = generate("tiny", seed=3)
    path = tmp_path_factory.mktemp("rows") / "train"
    save_dataset(train, path)
    return train, path


def rows_to_read(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.integers(0, n, 300), [0, n - 1, 5, 5]]).astype(np.int64)


@pytest.mark.parametrize("mapped", [False, True])
def test_take_equals_naive_copy(stored, mapped):
    train, path = stored
    data = load_dataset(path, mmap=mapped)
    rows = rows_to_read(data.num_points)
    reader = RowReader(data)
    assert all((f is not None) == mapped for f in reader._files.values())
    assert_same(reader.take(rows), naive_take(train, rows))
    empty = reader.take(np.empty(0, np.int64))
    assert empty.num_points == 0 and empty.nnz == 0 and empty.x_indptr.tolist() == [0]


def test_take_from_a_row_slice_of_a_mapped_file(stored):
    """A slice of a memory map starts inside the file: the reader must find that offset."""
    train, path = stored
    part = load_dataset(path).row_slice(37, 400)
    assert part.x_indices._mmap is not None
    rows = rows_to_read(part.num_points)
    assert_same(RowReader(part).take(rows), naive_take(train.row_slice(37, 400), rows))


def resident_kb(path) -> int:
    """Resident kB of this process's mappings of the file at path (Linux /proc/self/smaps)."""
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()
            if "-" in first[0] and len(first) >= 5 and ":" in first[3]:
                current = first[5] if len(first) > 5 else None
            elif first[0] == "Rss:" and current == str(path):
                total += int(first[1])
    return total


def test_mapped_rows_are_read_without_touching_the_map(stored):
    train, path = stored
    data = load_dataset(path)
    reader = RowReader(data)
    reader.take(np.arange(data.num_points))
    for name in ("x_indices", "x_values", "y_indices"):
        assert resident_kb((path / f"{name}.npy").resolve()) == 0, name
    np.asarray(data.x_values).sum()
    assert resident_kb((path / "x_values.npy").resolve()) > 0


def test_bad_rows_and_a_truncated_file_are_clear_errors(tmp_path):
    train, _ = generate("tiny", seed=4)
    save_dataset(train, tmp_path / "d")
    reader = RowReader(load_dataset(tmp_path / "d"))
    with pytest.raises(IndexError, match="row ids"):
        reader.take(np.array([train.num_points]))
    with pytest.raises(IndexError, match="row ids"):
        reader.take(np.array([-1]))
    with open(tmp_path / "d" / "x_values.npy", "r+b") as f:
        f.truncate(200)
    with pytest.raises(OSError, match="x_values"):
        reader.take(np.array([train.num_points - 1]))
    reader.close()
