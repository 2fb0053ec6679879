"""Build tests/data/wordnet-top-small/{train,test}.txt.gz: a compact real multi-label set for the accuracy floor.

    python tests/data/build_wordnet_top_small.py     # needs Debian's wordnet-base and the `bench` extra (sklearn)

Source: `benchmarks.quality.datasets`' `wordnet-top` set, built from Debian's `wordnet-base` package (WordNet 3.0,
Princeton University; its license permits redistribution with the notice in /usr/share/doc/wordnet-base/copyright).
Points are noun and verb synsets, features the TF-IDF of their words and gloss, labels their lexicographer file,
their noun ancestors at depth 2-3 and their verb roots. Here a seeded subset of it is kept: TRAIN training points
and TEST test points of its own splits, features that no kept training point has are dropped and the rest
renumbered in order, labels keep their ids. The output is deterministic (fixed seed, gzip without a timestamp).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import datasets  # noqa: E402
from engine import Dataset, write_xmc  # noqa: E402
from engine.sparse import RowReader  # noqa: E402

TRAIN, TEST, SEED = 6000, 1500, 0
OUT = Path(__file__).resolve().parent / "wordnet-top-small"


def subset(data: Dataset, n: int, seed: int) -> Dataset:
    rows = np.sort(np.random.default_rng([seed, n]).choice(data.num_points, size=n, replace=False))
    return RowReader(data).take(rows)


def renumber(data: Dataset, keep: np.ndarray) -> Dataset:
    """Only the features in `keep` (sorted ids), renumbered 0..len(keep)-1."""
    new_id = np.full(data.num_features, -1, dtype=np.int64)
    new_id[keep] = np.arange(keep.shape[0])
    ids = new_id[np.asarray(data.x_indices)]
    mask = ids >= 0
    row = np.repeat(np.arange(data.num_points), np.diff(data.x_indptr))
    indptr = np.zeros(data.num_points + 1, dtype=np.int64)
    np.cumsum(np.bincount(row[mask], minlength=data.num_points), out=indptr[1:])
    return Dataset(
        indptr,
        ids[mask].astype(np.int32),
        np.asarray(data.x_values)[mask],
        np.asarray(data.y_indptr),
        np.asarray(data.y_indices),
        int(keep.shape[0]),
        data.num_labels,
    )


def main() -> int:
    train, test = datasets.load("wordnet-top")
    train, test = subset(train, TRAIN, SEED), subset(test, TEST, SEED + 1)
    keep = np.unique(np.asarray(train.x_indices))
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in (("train", renumber(train, keep)), ("test", renumber(test, keep))):
        path = write_xmc(data, OUT / f"{name}.txt.gz")
        print(f"{path}: {data.num_points} points, {data.num_features} features, {data.num_labels} labels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
