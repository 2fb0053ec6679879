"""Top-k prediction: per sampled layer, score its hash-table candidates or every neuron (exact)."""

from __future__ import annotations

import numpy as np
from numba import prange

from .._numba import fast_kernel, fast_parallel_kernel, kernel, renamed
from .forward import lsh_active_set, neuron_preactivation, prefetch_ahead, sparse_input_layer
from .groups import Layers, Tables
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
def predict_batch(indptr, indices, values, use_tables, net, tabs, retrieval, hid, ids, lookup, n_chunks, out):
    """Top-k output neurons of n sparse points (CSR arrays) into out (groups.TopK): labels int32 (n, k)
    (-1 where fewer than k were scored), scores float32 (n, k) (raw output-layer scores) and n_scored
    int64 (n,) (how many output neurons were scored per point).

    use_tables bool (depth,): whether a sampled layer scores only its tables' candidates (else all its
    neurons); a layer without tables (slot -1) is always dense. net, tabs, retrieval, lookup: see
    kernels.groups; hid (tuple over hidden layers) and ids int32 hold one row per chunk."""
    n = indptr.shape[0] - 1
    weights, b0, layer_slot = net
    hidx, hsign, hparams, offsets, table_ids, hubs = tabs
    out_labels, out_scores, n_scored = out
    depth = len(weights)
    for chunk in prange(n_chunks):
        c = np.int64(chunk)  # prange's index is unsigned: a signed copy compiles callees once, not twice
        # see kernels.groups: groups holding tuples are rebuilt inside the loop, stores go to unpacked arrays
        net = Layers(weights, b0, layer_slot)
        tabs = Tables(hidx, hsign, hparams, offsets, table_ids, hubs)
        for i in range(c, n, n_chunks):
            sparse_input_layer(weights[0], net.b0, indices, values, indptr[i], indptr[i + 1], hid[0][c])
            labels = out_labels[i]
            scores = out_scores[i]
            labels[:] = -1
            scores[:] = -np.inf
            for layer in range(1, depth):
                w = weights[layer]
                inp = hid[layer - 1][c]
                slot = net.layer_slot[layer]
                sampled = slot >= 0 and use_tables[layer]
                if sampled:
                    gen = next_generation(lookup.tags, lookup.gens, c)
                    m = lsh_active_set(inp, slot, tabs, lookup, c, gen, retrieval, ids[c])
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


predict_batch_serial = fast_kernel(renamed(predict_batch.py_func, "predict_batch_serial"))
"""The same kernel compiled without threads: a few queries answer faster than a thread-pool wake-up."""
