"""Top-k prediction: per sampled layer, score its hash-table candidates or every neuron (exact)."""

from __future__ import annotations

import numpy as np
from numba import prange

from .._numba import fast_kernel, fast_parallel_kernel, kernel
from .forward import lsh_active_set, neuron_preactivation, prefetch_ahead, sparse_input_layer
from .sampling import next_generation


@kernel
def push_topk(labels, scores, j, s):
    """Insert (j, s) into the descending top-k lists if it beats the current k-th score."""
    k = scores.shape[0]
    if s <= scores[k - 1]:
        return
    pos = k - 1
    while pos > 0 and scores[pos - 1] < s:
        scores[pos] = scores[pos - 1]
        labels[pos] = labels[pos - 1]
        pos -= 1
    scores[pos] = s
    labels[pos] = j


@fast_parallel_kernel
def predict_batch(
    indptr,
    indices,
    values,
    use_tables,
    w0,
    b0,
    weights,
    layer_slot,
    hidx,
    hsign,
    hparams,
    toffsets,
    tids,
    hubs,
    hid,
    ids,
    tags,
    counts,
    gens,
    qmargins,
    qcodes,
    qbuck,
    n_chunks,
    probes,
    threshold,
    max_active,
    out_labels,
    out_scores,
    n_scored,
):
    """out_labels int32 (n, k) (-1 where fewer than k were scored), out_scores float32 (n, k): raw
    output-layer scores; n_scored int64 (n,): how many output neurons were scored per point.

    use_tables bool (depth,): whether a sampled layer scores only its tables' candidates (else all its
    neurons); a layer without tables (slot -1) is always dense."""
    n = indptr.shape[0] - 1
    depth = len(weights)
    for c in prange(n_chunks):
        for i in range(c, n, n_chunks):
            sparse_input_layer(w0, b0, indices, values, indptr[i], indptr[i + 1], hid[0][c])
            labels = out_labels[i]
            scores = out_scores[i]
            labels[:] = -1
            scores[:] = -np.inf
            for layer in range(1, depth):
                w = weights[layer]
                inp = hid[layer - 1][c]
                slot = layer_slot[layer]
                sampled = slot >= 0 and use_tables[layer]
                if sampled:
                    gen = next_generation(tags, gens, c)
                    m = lsh_active_set(
                        inp,
                        slot,
                        hidx,
                        hsign,
                        hparams,
                        toffsets,
                        tids,
                        hubs,
                        tags[c],
                        counts[c],
                        gen,
                        qmargins[c],
                        qcodes[c],
                        qbuck[c],
                        probes,
                        threshold,
                        max_active,
                        ids[c],
                    )
                else:
                    m = w.shape[0]
                if layer < depth - 1:
                    h = hid[layer][c]
                    h[:] = 0.0
                    for a in range(m):
                        j = ids[c, a] if sampled else a
                        if sampled:
                            prefetch_ahead(w, ids[c], a, m)
                        z = neuron_preactivation(w, j, inp)
                        h[j] = z if z > 0.0 else 0.0
                else:
                    for a in range(m):
                        j = ids[c, a] if sampled else a
                        if sampled:
                            prefetch_ahead(w, ids[c], a, m)
                        push_topk(labels, scores, j, neuron_preactivation(w, j, inp))
                    n_scored[i] = m


predict_batch_serial = fast_kernel(predict_batch.py_func)
"""The same kernel compiled without threads: a few queries answer faster than a thread-pool wake-up."""
