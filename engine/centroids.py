"""Output rows that start at their labels' centroids (`model.output_init` "centroids").

A new model's softmax over random rows ranks labels at random, and a tail label's row gets only the few gradient
steps of the points that carry it (and the negatives' pushes) to find its direction. Starting each label's row
along the mean initial hidden activation of its training points, less the mean over all of them, gives every
label a direction from all of its points at once: a label embedding like PECOS's PIFA (the mean of a label's
points' features), taken in the network's initial hidden space. The rows are CENTROID_SCALE times as long as the
layer's random rows (its median row norm), so the softmax starts out ranking a point's labels near the top;
training then moves rows and hidden layer together as before. Biases stay at zero; labels no training point
carries keep their random rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._numba import kernel
from .kernels.optimizer import to_bfloat16

if TYPE_CHECKING:
    from .network import SlideModel
    from .sparse import RowReader

CENTROID_SCALE = 3.0
"""Length of a centroid row in median lengths of the layer's random rows: long enough that the first updates do not
swamp the direction (BENCHMARKS.md, "Output rows from label centroids")."""
CENTROID_CHUNK = 4096
"""Training points whose hidden activations are computed at a time (8 MB at width 512)."""
CENTROID_WRITE_ROWS = 8192
"""Output rows converted and written at a time."""


@kernel
def add_label_sums(y_indptr, y_indices, hidden, sums, counts):
    """For every label j of point i (CSR labels y_indptr/y_indices of the n points of hidden float32 (n, width)):
    sums[j] += hidden[i] (float32 (labels, width)) and counts[j] += 1 (int64 (labels,))."""
    width = hidden.shape[1]
    for i in range(hidden.shape[0]):
        for e in range(y_indptr[i], y_indptr[i + 1]):
            j = y_indices[e]
            counts[j] += 1
            for u in range(width):
                sums[j, u] += hidden[i, u]


def label_centroids(model: SlideModel, rows: RowReader, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (labels, width): each label's mean last hidden activation (SlideModel.last_hidden) over the training
    points `points` (row ids of `rows`' set) that carry it, less the mean over all of `points` (zero rows for the
    labels none carries); and int64 (labels,): how many of the points carry each label."""
    points = np.asarray(points, dtype=np.int64)
    width = model.weights[-1].shape[1] - 1
    sums = np.zeros((model.num_labels, width), np.float32)
    counts = np.zeros(model.num_labels, np.int64)
    total = np.zeros(width, np.float64)
    for start in range(0, points.size, CENTROID_CHUNK):
        chunk = rows.take(points[start : start + CENTROID_CHUNK])
        hidden = model.last_hidden(chunk.x_indptr, chunk.x_indices, chunk.x_values)
        total += hidden.sum(axis=0, dtype=np.float64)
        add_label_sums(
            np.asarray(chunk.y_indptr, np.int64), np.asarray(chunk.y_indices, np.int64), hidden, sums, counts
        )
    carried = np.flatnonzero(counts)
    if carried.size:
        mean = (total / points.size).astype(np.float32)
        for start in range(0, carried.size, CENTROID_WRITE_ROWS):
            ids = carried[start : start + CENTROID_WRITE_ROWS]
            sums[ids] = sums[ids] / counts[ids, None].astype(np.float32) - mean
    return sums, counts


def init_output_from_centroids(
    model: SlideModel, rows: RowReader, points: np.ndarray, scale: float = CENTROID_SCALE
) -> int:
    """Start the output rows of the labels that `points` carry at their centroids (label_centroids), each scaled to
    `scale` times the median length of the layer's rows as they are, and put the layer's rows into its buckets
    again (a sampled layer). Biases are left as they are. Returns how many rows were set."""
    out = model.depth - 1
    length = float(np.median(model.row_norms(out))) * scale
    centroids, counts = label_centroids(model, rows, points)
    norms = np.sqrt(np.einsum("ij,ij->i", centroids, centroids, dtype=np.float64))
    set_rows = np.flatnonzero((counts > 0) & (norms > 0))
    w = model.weights[out]
    for start in range(0, set_rows.size, CENTROID_WRITE_ROWS):
        ids = set_rows[start : start + CENTROID_WRITE_ROWS]
        new = centroids[ids] * (length / norms[ids])[:, None].astype(np.float32)
        w[ids, :-1] = to_bfloat16(new) if w.dtype == np.uint16 else new
    if model.layer_slot[out] >= 0:
        model.rehash_layer(out, round_id=0)
    return int(set_rows.size)
