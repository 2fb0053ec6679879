"""Whole-layer passes over a layer's neuron rows, float32 or bfloat16 bits (uint16): the statistics a
rehash needs (the keys' centre, every neuron's score on the mean input, row norms), in parallel and
without a float32 copy of a bfloat16 layer (numpy would need one: 346 MB at 670k labels)."""

from __future__ import annotations

import numpy as np
from numba import prange

from .._numba import fast_parallel_kernel, parallel_kernel
from .forward import neuron_preactivation
from .lowlevel import weight_at

_CHUNKS = 64
"""Row ranges column_sums adds separately and then in order, so its sums do not depend on the threads."""


@fast_parallel_kernel
def row_scores(w, query, out):
    """out float32 (rows,): <w[j, :-1], query> + w[j, -1] for every row j; query float32 (in,)."""
    for j in prange(w.shape[0]):
        out[j] = neuron_preactivation(w, j, query)


@fast_parallel_kernel
def row_norms(w, out):
    """out float32 (rows,): the L2 norm of w[j, :-1] (the weights without the bias) for every row j."""
    dim = w.shape[1] - 1
    for j in prange(w.shape[0]):
        row = w[j]
        sq = np.float32(0.0)
        for k in range(dim):
            x = weight_at(row, k)
            sq += x * x
        out[j] = np.sqrt(sq)


@parallel_kernel
def column_sums(w, out):
    """out float64 (in,): the sum over rows of w[:, :-1], in float64."""
    n = w.shape[0]
    dim = w.shape[1] - 1
    per_chunk = (n + _CHUNKS - 1) // _CHUNKS
    partial = np.zeros((_CHUNKS, dim), dtype=np.float64)
    for c in prange(_CHUNKS):
        acc = partial[c]
        for j in range(c * per_chunk, min(n, (c + 1) * per_chunk)):
            row = w[j]
            for k in range(dim):
                acc[k] += weight_at(row, k)
    out[:] = 0.0
    for c in range(_CHUNKS):
        out += partial[c]
