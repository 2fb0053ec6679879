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
    kth = out_scores.shape[1] - 1
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
                        z = neuron_preactivation(w, j, inp)
                        if not z <= scores[kth]:  # push_topk's own test: most scores stop here, without a call
                            push_topk(labels, scores, j, z)
                    n_scored[i] = m


predict_batch_serial = fast_kernel(renamed(predict_batch.py_func, "predict_batch_serial"))
"""The same kernel compiled without threads: a few queries answer faster than a thread-pool wake-up."""


@fast_kernel
def exact_hidden(weights, b0, indices, values, start, end, hid, c):
    """One point's hidden layers with every neuron computed, as predict_batch computes them when no hidden layer
    uses its tables (`exact`): hid[l][c] the ReLU output of hidden layer l, from the input layer's non-zeros
    [start, end) of indices and values."""
    sparse_input_layer(weights[0], b0, indices, values, start, end, hid[0][c])
    for layer in range(1, len(weights) - 1):
        w = weights[layer]
        inp = hid[layer - 1][c]
        h = hid[layer][c]
        for j in range(w.shape[0]):
            z = neuron_preactivation(w, j, inp)
            h[j] = z if z > 0.0 else 0.0


@fast_parallel_kernel
def last_hidden_batch(indptr, indices, values, net, hid, n_chunks, last):
    """The last hidden layer's activations of n sparse points (CSR arrays) into last float32 (n, width), every
    neuron of every hidden layer computed (exact_hidden); hid (tuple over hidden layers) holds one row per chunk."""
    n = indptr.shape[0] - 1
    weights, b0, _ = net
    top = len(weights) - 1
    for chunk in prange(n_chunks):
        c = np.int64(chunk)
        for i in range(c, n, n_chunks):
            exact_hidden(weights, b0, indices, values, indptr[i], indptr[i + 1], hid, c)
            last[i, :] = hid[top - 1][c]


last_hidden_batch_serial = fast_kernel(renamed(last_hidden_batch.py_func, "last_hidden_batch_serial"))
"""The same kernel compiled without threads, for a few points (see predict_batch_serial)."""


HUB_TILE = 64
"""Hub rows scored against every point of a batch at a time by predict_batch_hubs (16 kB of bfloat16 rows at width
128: they stay in the L1 cache while the points' activations stream past)."""


@fast_parallel_kernel
def predict_batch_hubs(last, net, tabs, hubs, retrieval, ids, lookup, n_chunks, hub_scores, out):
    """predict_batch for a network whose only layer scored from its tables is the output layer, which has hubs:
    the same labels, scores and n_scored, bit for bit, for less work. Every point scores the hubs, so they are
    scored as a block (a tile of HUB_TILE hub rows against every point's last hidden activations, read once per
    tile instead of once per point), then each point scores its bucket candidates and takes the hubs' scores in
    the order predict_batch meets them. tabs: the tables with no hubs for the output layer; hubs: its hubs
    (groups.HubRows: packed rows give the same bytes, so the same scores, read from one contiguous block instead of
    rows scattered over the layer; a bucket candidate that is a hub is found by its place, without a look at every
    hub). last float32 (n, width): the points' last hidden activations, as predict_batch computes them
    (last_hidden_batch); hub_scores float32 (n, hubs): scratch."""
    n = last.shape[0]
    weights, _, layer_slot = net
    hidx, hsign, hparams, offsets, table_ids, no_hubs = tabs
    hub_ids, hub_pos, hub_rows = hubs
    out_labels, out_scores, n_scored = out
    kth = out_scores.shape[1] - 1
    depth = len(weights)
    top = depth - 1
    w = weights[top]
    n_hubs = hub_ids.shape[0]
    packed = hub_rows.shape[0] == n_hubs
    n_tiles = (n_hubs + HUB_TILE - 1) // HUB_TILE
    for tile in prange(n_tiles):
        t = np.int64(tile)
        start = t * HUB_TILE
        stop = min(start + HUB_TILE, n_hubs)
        for i in range(n):
            inp = last[i]
            if packed:
                for q in range(start, stop):
                    hub_scores[i, q] = neuron_preactivation(hub_rows, q, inp)
            else:
                for q in range(start, stop):
                    hub_scores[i, q] = neuron_preactivation(w, hub_ids[q], inp)
    for chunk in prange(n_chunks):
        c = np.int64(chunk)
        tabs = Tables(hidx, hsign, hparams, offsets, table_ids, no_hubs)
        slot = layer_slot[top]
        for i in range(c, n, n_chunks):
            labels = out_labels[i]
            scores = out_scores[i]
            labels[:] = -1
            scores[:] = -np.inf
            inp = last[i]
            gen = next_generation(lookup.tags, lookup.gens, c)
            m = lsh_active_set(inp, slot, tabs, lookup, c, gen, retrieval, ids[c])
            hub_scores_i = hub_scores[i]
            shared = 0
            for a in range(m):
                j = ids[c, a]
                prefetch_ahead(w, ids[c], a, m)
                z = neuron_preactivation(w, j, inp)
                if not z <= scores[kth]:  # as in predict_batch
                    push_topk(labels, scores, j, z)
                q = hub_pos[j]
                if q >= 0:  # scored here already: -inf, which push_topk never keeps
                    hub_scores_i[q] = -np.inf
                    shared += 1
            # the hubs not among the candidates, in their order (as lsh_active_set's add_ids appends them)
            for q in range(n_hubs):
                if not hub_scores_i[q] <= scores[kth]:
                    push_topk(labels, scores, hub_ids[q], hub_scores_i[q])
            n_scored[i] = m + n_hubs - shared


predict_batch_hubs_serial = fast_kernel(renamed(predict_batch_hubs.py_func, "predict_batch_hubs_serial"))
"""The same kernel compiled without threads, for a few queries (see predict_batch_serial)."""
