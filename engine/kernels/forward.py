"""Sparse forward and backward pass of one point, and of a batch in parallel.

Layer 0 maps the sparse input through W0 (num_features, h1), stored input-major so that a point
reads and its gradient touches only the rows of its non-zero features. Every later layer l has
W[l] (out_l, in_l + 1), one row per neuron with its bias in the last column, so a neuron is one
contiguous row to hash, score and update. A layer with a hash-table slot computes only its active
neurons; the output layer's loss (a softmax, or a sigmoid per label) spans the active set. Weights are float32 or
bfloat16 bits (lowlevel.weight_at widens them); activations and sums are float32.

Batch buffers (b = batch size, cap_l = most active neurons of layer l), grouped as kernels.groups says:
  hid[l]      float32 (b, width_l)  dense ReLU output of hidden layer l (l = 0 .. D-1)
  act_ids[l-1] int32  (b, cap_l)    active neuron ids of layer l (unused for dense layers)
  act_val[l-1] float32 (b, cap_l)   activations, overwritten by the backward pass with deltas
  nact        int32 (b, D+1)        number of active neurons per layer
  nkept       int32 (b,)            output active neurons before the random negatives, which follow
  delta0      float32 (b, h1)       gradient at layer 0's pre-activation

With a sampled output layer the trainer runs train_batch only up to the output deltas: the backward
pass through that layer happens inside its Adam update, which reads each touched row once anyway, and
backward_batch takes it on from there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import prange

from .._numba import fast_kernel, fast_parallel_kernel, kernel
from .groups import Activations, Layers, Tables
from .hashing import SEED, TABLES, hash_vector, mix3, probe_buckets
from .lowlevel import float_bits, float_from_bits, prefetch_row_read, weight_at
from .sampling import (
    add_ids,
    collect_candidates,
    filter_candidates,
    is_label,
    kth_largest,
    mark_active,
    next_generation,
    pad_random,
    tie_seed,
)

ROWS_AHEAD = 16
"""Active rows a point prefetches ahead of the one it scores (4 cache lines a row of 128 bfloat16
weights); chosen by timing training steps (BENCHMARKS.md)."""


@kernel
def prefetch_ahead(w, ids, a, n):
    """Ask the cache for row ids[a + ROWS_AHEAD] of w, if a + ROWS_AHEAD < n: active rows are scattered,
    so each would otherwise start with misses the hardware prefetcher cannot foresee."""
    if a + ROWS_AHEAD < n:
        prefetch_row_read(w, ids[a + ROWS_AHEAD])


@fast_kernel
def sparse_input_layer(w0, b0, indices, values, start, end, h):
    """h = relu(b0 + sum_q values[q] * w0[indices[q]]) over one point's non-zeros [start, end)."""
    width = h.shape[0]
    for k in range(width):
        h[k] = b0[k]
    for q in range(start, end):
        row = w0[indices[q]]
        val = values[q]
        for k in range(width):
            h[k] += val * weight_at(row, k)
    for k in range(width):
        if h[k] < 0.0:
            h[k] = 0.0


_DROPOUT_SALT = np.uint64(0xD809_0F7A_5EED_0001)
_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@fast_kernel
def hidden_dropout(h, rate, seed, stream, layer):
    """Inverted dropout of one point's hidden layer output h in place: each unit is zeroed with probability
    rate and the rest are scaled by 1 / (1 - rate), so prediction, which drops nothing, sees the same
    expected activations. The draw of unit k is keyed by (seed, stream, layer, k): a point's mask does not
    depend on the thread that computes it."""
    scale = 1.0 / (1.0 - rate)
    key = np.uint64(seed) ^ _DROPOUT_SALT
    base = np.uint64(layer) << np.uint64(32)
    for k in range(h.shape[0]):
        u = (mix3(key, stream, base | np.uint64(k)) >> np.uint64(11)) * _UNIT
        if u < rate:
            h[k] = 0.0
        else:
            h[k] *= scale


@fast_kernel
def neuron_preactivation(w, j, inp):
    """<w[j, :in], inp> + w[j, in] (bias in the last column)."""
    in_dim = inp.shape[0]
    row = w[j]
    acc = weight_at(row, in_dim)
    for k in range(in_dim):
        acc += weight_at(row, k) * inp[k]
    return acc


@kernel
def lsh_active_set(inp, slot, tabs, lookup, chunk, gen, retrieval, ids):
    """Retrieve the candidates of one input from a sampled layer's tables into ids; returns how many.

    The layer's hubs (the neurons scoring highest on its average input) join every set: they score
    high for most inputs, so they must keep meeting negative gradients, but cosine buckets centred on
    the keys do not always return them. retrieval.probes > 0 also reads that many neighbouring buckets
    per table (multi-probe, see hashing.probe_buckets). tabs: groups.Tables; lookup: groups.Lookup,
    whose row `chunk` this call uses, with gen its current generation (see sampling); ids holds at
    most as many entries as lookup.counts' rows.
    """
    hp = tabs.hparams[slot]
    hidx = tabs.hidx[slot]
    hsign = tabs.hsign[slot]
    n_tables = hp[TABLES]
    n_codes = hidx.shape[0]
    probes = retrieval.probes
    stride = 1 + probes
    tags = lookup.tags[chunk]
    counts = lookup.counts[chunk]
    qcodes = lookup.qcodes[chunk]
    buckets = lookup.qbuck[chunk][: n_tables * stride]
    if probes == 0:
        hash_vector(inp, hidx, hsign, hp, qcodes[:n_codes], buckets)
    else:
        probe_buckets(inp, hidx, hsign, hp, probes, lookup.qmargins[chunk][:n_codes], qcodes[:n_codes], buckets)
    n = collect_candidates(buckets, stride, tabs.offsets[slot], tabs.ids[slot], tags, gen, ids, counts)
    n = filter_candidates(
        ids,
        n,
        counts,
        retrieval.threshold,
        retrieval.max_active[slot],
        n_tables * stride,
        tie_seed(hp[SEED], buckets),
    )
    mark_active(ids, n, tags, gen)
    return add_ids(ids, n, tabs.hubs[slot], tags, gen, 1)


@fast_kernel
def softmax_inplace(vals, n):
    top = -np.inf
    for a in range(n):
        if vals[a] > top:
            top = vals[a]
    total = 0.0
    for a in range(n):
        e = math.exp(vals[a] - top)
        vals[a] = e
        total += e
    inv = 1.0 / total
    for a in range(n):
        vals[a] *= inv


class OutputDeltas(NamedTuple):
    """A point's output layer for its loss: `ids` the active neuron ids (a sampled layer's), `n` how many are
    active, `n_kept` those before the random negatives (-1: a dense layer, whose slot a is neuron a),
    `width` the layer's neurons and `labels` the point's label ids."""

    ids: np.ndarray
    n: int
    n_kept: int
    width: int
    labels: np.ndarray


@fast_kernel
def hard_negative_cut(vals, out, row_tags, keys, hard_negatives):
    """The value below which a retrieved non-label's delta is dropped: the hard_negatives-th largest of their
    vals[:n_kept] (probabilities, >= 0, so their float32 bit patterns order as they do); -1 = keep all."""
    n_labels = out.labels.shape[0]
    if hard_negatives <= 0 or out.n_kept - n_labels <= hard_negatives:
        return -1.0
    c = 0
    for a in range(out.n_kept):
        if not is_label(row_tags, out.ids[a]):
            keys[c] = np.int32(float_bits(vals[a]))
            c += 1
    if c <= hard_negatives:
        return -1.0
    return float_from_bits(np.uint32(kth_largest(keys, c, hard_negatives)))


@fast_kernel
def softmax_deltas(vals, out, row_tags, keys, hard_negatives, inv_batch):
    """Softmax over the active set: vals[:n] (logits) become the deltas (p - y / |Y|) / batch; returns the
    point's cross-entropy -sum_y log p_y / |Y|. A sampled layer drops the deltas of retrieved non-labels below
    the hard-negative cut (hard_negative_cut); its random negatives' logits carry the log-Q shift already."""
    n = out.n
    labels = out.labels
    n_labels = labels.shape[0]
    softmax_inplace(vals, n)
    loss = 0.0
    share = 1.0 / n_labels
    if out.n_kept >= 0:
        cut = hard_negative_cut(vals, out, row_tags, keys, hard_negatives)
        for a in range(n):
            target = 0.0
            if is_label(row_tags, out.ids[a]):
                target = share
                loss -= share * math.log(max(vals[a], 1e-30))
            elif vals[a] < cut and a < out.n_kept:
                vals[a] = 0.0
            vals[a] = (vals[a] - target) * inv_batch
    else:
        for q in range(n_labels):
            loss -= share * math.log(max(vals[labels[q]], 1e-30))
        for a in range(n):
            vals[a] *= inv_batch
        for q in range(n_labels):
            vals[labels[q]] -= share * inv_batch
    return loss


@kernel
def log1p_exp(z):
    """log(1 + e^z) without overflow: a logistic loss."""
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


@kernel
def sigmoid(z):
    """1 / (1 + e^-z) without overflow."""
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@fast_kernel
def sigmoid_deltas(vals, out, row_tags, keys, hard_negatives, inv_batch):
    """A logistic loss per active output neuron: vals[:n] (logits) become the deltas (sigmoid(z) - y) / batch;
    returns the point's sum over the active set of log(1 + e^-z) for its labels and log(1 + e^z) for the
    others. A sampled layer drops the deltas of retrieved non-labels below the hard-negative cut (on their
    sigmoids); a random negative is one more negative at its own logit (the log-Q shift the forward pass gave it
    for the softmax taken off). Weighting each by the unretrieved labels it was drawn from, an unbiased estimate
    of their sum, learned less (BENCHMARKS.md)."""
    n = out.n
    labels = out.labels
    loss = 0.0
    if out.n_kept < 0:
        for q in range(labels.shape[0]):
            loss -= vals[labels[q]]  # a label's log(1 + e^-z) is log(1 + e^z) - z
        for a in range(n):
            z = vals[a]
            loss += log1p_exp(z)
            vals[a] = sigmoid(z) * inv_batch
        for q in range(labels.shape[0]):
            vals[labels[q]] -= inv_batch
        return loss
    shift = 0.0
    if n > out.n_kept:
        shift = math.log((out.width - out.n_kept) / (n - out.n_kept))
    for a in range(n):
        z = vals[a]
        if a >= out.n_kept:
            z -= shift
            loss += log1p_exp(z)
            vals[a] = sigmoid(z)
        elif is_label(row_tags, out.ids[a]):
            loss += log1p_exp(-z)
            vals[a] = sigmoid(z) - 1.0
        else:
            loss += log1p_exp(z)
            vals[a] = sigmoid(z)
    cut = hard_negative_cut(vals, out, row_tags, keys, hard_negatives)
    for a in range(n):
        if a < out.n_kept and vals[a] < cut and not is_label(row_tags, out.ids[a]):
            vals[a] = 0.0
        vals[a] *= inv_batch
    return loss


@fast_kernel
def forward_point(i, p, stream, batch, net, tabs, retrieval, sampling, act, lookup, chunk):
    """The forward pass of dataset row p of `batch` in batch slot i, on worker chunk `chunk`'s scratch rows, up
    to the output layer's logits in act_val[-1][i, :nact[i, -1]] (a sampled output layer's active set in
    act_ids[-1][i], the point's labels among it tagged in lookup.tags[chunk]; nkept[i] the active neurons
    before the random negatives). Shared by train_point and the label-sharded step (engine.distributed).
    """
    weights = net.weights
    layer_slot = net.layer_slot
    hid, act_ids, act_val, nact, nkept = act.hid, act.act_ids, act.act_val, act.nact, act.nkept
    tags = lookup.tags
    seed = sampling.seed
    random_negatives = sampling.random_negatives
    depth = len(weights)
    sparse_input_layer(
        weights[0], net.b0, batch.x_indices, batch.x_values, batch.x_indptr[p], batch.x_indptr[p + 1], hid[0][i]
    )
    dropout = sampling.hidden_dropout
    if dropout > 0.0:
        hidden_dropout(hid[0][i], dropout, sampling.dropout_seed, stream, 0)
    labels = batch.y_indices[batch.y_indptr[p] : batch.y_indptr[p + 1]]
    gen = np.int64(0)
    for layer in range(1, depth):
        w = weights[layer]
        out_dim = w.shape[0]
        inp = hid[layer - 1][i]
        vals = act_val[layer - 1][i]
        ids = act_ids[layer - 1][i]
        slot = layer_slot[layer]
        is_output = layer == depth - 1
        if slot >= 0:
            gen = next_generation(tags, lookup.gens, chunk)
            n = lsh_active_set(inp, slot, tabs, lookup, chunk, gen, retrieval, ids)
            if is_output:
                n = add_ids(ids, n, labels, tags[chunk], gen, -1)
            n = pad_random(ids, n, sampling.min_active, out_dim, tags[chunk], gen, seed, stream * depth + layer)
            n_kept = n
            if is_output and random_negatives > 0:
                # stream * depth + 0 is free: the input layer is never sampled
                n = pad_random(
                    ids,
                    n,
                    n + random_negatives,
                    out_dim,
                    tags[chunk],
                    gen,
                    seed,
                    (stream // sampling.negative_group) * depth,
                )
            for a in range(n):
                prefetch_ahead(w, ids, a, n)
                vals[a] = neuron_preactivation(w, ids[a], inp)
            if n > n_kept:
                shift = math.log((out_dim - n_kept) / (n - n_kept))
                for a in range(n_kept, n):
                    vals[a] += shift
            if is_output:
                nkept[i] = n_kept
        else:
            n = out_dim
            for j in range(n):
                vals[j] = neuron_preactivation(w, j, inp)
            if is_output:
                nkept[i] = n
        nact[i, layer] = n
        if not is_output:
            h = hid[layer][i]
            h[:] = 0.0
            for a in range(n):
                if vals[a] < 0.0:
                    vals[a] = 0.0
                h[ids[a] if slot >= 0 else a] = vals[a]
            if dropout > 0.0:
                hidden_dropout(h, dropout, sampling.dropout_seed, stream, layer)


@fast_kernel
def train_point(
    i, p, stream, batch, inv_batch, net, tabs, retrieval, sampling, act, lookup, back, chunk, backprop_output
):
    """Forward and backward of dataset row p of `batch` (groups.Batch) in batch slot i, on worker chunk
    `chunk`'s scratch rows; returns its loss (0 when unlabelled). inv_batch: 1 / batch size.

    backprop_output False stops at the output layer's deltas: the caller runs the backward pass through
    that layer fused with its update (optimizer.update_sampled_layer) and the rest with backward_batch.

    sampling.random_negatives > 0: a sampled output layer also draws that many neurons uniformly from those
    not yet active, their logits raised by log(not yet active / drawn), so the softmax's normaliser is an
    unbiased estimate of the full one and the loss cannot fall by pushing every unretrieved label down
    at once. The negative_group consecutive points of a stream group read one random sequence, each
    keeping the first draws it had not retrieved: few enough share it that every row still meets a
    negative gradient every few steps (the unretrieved labels must be pushed down row by row), while
    the optimizer steps on fewer distinct rows (with sampling.sigmoid each is one more negative at its own
    logit: sigmoid_deltas). sampling.hard_negatives > 0: only that many retrieved
    non-label neurons, those with the highest probability, keep their delta; the others' are set to exactly
    0 (no gradient). Random negatives always keep theirs.
    """
    weights = net.weights
    layer_slot = net.layer_slot
    act_ids, act_val, nact, nkept = act.act_ids, act.act_val, act.nact, act.nkept
    tags = lookup.tags
    hard_negatives = sampling.hard_negatives
    dropout = sampling.hidden_dropout
    depth = len(weights)
    forward_point(i, p, stream, batch, net, tabs, retrieval, sampling, act, lookup, chunk)
    labels = batch.y_indices[batch.y_indptr[p] : batch.y_indptr[p + 1]]
    n_labels = labels.shape[0]

    out_l = depth - 1
    n = nact[i, out_l]
    vals = act_val[out_l - 1][i]
    if n_labels == 0:
        for layer in range(1, depth):
            act_val[layer - 1][i, : nact[i, layer]] = 0.0
        act.delta0[i, :] = 0.0
        return 0.0
    out = OutputDeltas(
        act_ids[out_l - 1][i], n, nkept[i] if layer_slot[out_l] >= 0 else -1, weights[out_l].shape[0], labels
    )
    if sampling.sigmoid:
        loss = sigmoid_deltas(vals, out, tags[chunk], lookup.counts[chunk], hard_negatives, inv_batch)
    else:
        loss = softmax_deltas(vals, out, tags[chunk], lookup.counts[chunk], hard_negatives, inv_batch)

    if backprop_output:
        backward_point(i, out_l, back.gin[chunk], back.gprev[chunk], net, act, 1.0 / (1.0 - dropout))
    return loss


@fast_kernel
def backward_point(i, top, g, g_prev, net, act, kept_scale):
    """Backward of batch slot i through layers top .. 1 (active neurons only), then act.delta0.

    top = the output layer starts from its deltas in act_val; a lower top starts from g, the gradient
    at layer top's outputs (hid[top][i]). g and g_prev are float32 scratch rows of the widest layer.
    kept_scale: 1 / (1 - hidden dropout rate), the factor of every hidden unit that dropout kept (a
    dropped unit's output is 0, so, like an inactive ReLU, it passes no gradient).
    """
    weights = net.weights
    hid, act_ids, act_val, nact = act.hid, act.act_ids, act.act_val, act.nact
    out_l = len(weights) - 1
    for layer in range(top, 0, -1):
        w = weights[layer]
        in_dim = w.shape[1] - 1
        vals = act_val[layer - 1][i]
        ids = act_ids[layer - 1][i]
        sampled = net.layer_slot[layer] >= 0
        n = nact[i, layer]
        if layer < out_l:
            h = hid[layer][i]
            for a in range(n):
                j = ids[a] if sampled else a
                vals[a] = g[j] * kept_scale if h[j] > 0.0 else 0.0
        g_prev[:in_dim] = 0.0
        for a in range(n):
            d = vals[a]
            if d != 0.0:
                row = w[ids[a] if sampled else a]
                for k in range(in_dim):
                    g_prev[k] += d * weight_at(row, k)
        g, g_prev = g_prev, g
    h0 = hid[0][i]
    delta0 = act.delta0
    for k in range(h0.shape[0]):
        delta0[i, k] = g[k] * kept_scale if h0[k] > 0.0 else 0.0


@fast_parallel_kernel
def backward_batch(grad_inputs, n_chunks, net, act, back, kept_scale):
    """The backward pass below the output layer for every point of a batch, from the gradient at the
    output layer's inputs: grad_inputs float32 (chunks, b, width) summed over chunks in order (see
    optimizer.update_sampled_layer). Chunk c of n_chunks owns scratch row c and points c, c+n_chunks, ...
    kept_scale: see backward_point.
    """
    top = len(net.weights) - 2
    b = grad_inputs.shape[1]
    width = grad_inputs.shape[2]
    weights, b0, layer_slot = net
    hid, act_ids, act_val, nact, nkept, delta0, losses = act
    gin, gprev = back
    for c in prange(n_chunks):
        # see kernels.groups: groups holding tuples are rebuilt inside the loop, stores go to unpacked arrays
        net = Layers(weights, b0, layer_slot)
        act = Activations(hid, act_ids, act_val, nact, nkept, delta0, losses)
        g = gin[c]
        for i in range(c, b, n_chunks):
            g[:width] = 0.0
            for part in range(grad_inputs.shape[0]):
                src = grad_inputs[part, i]
                for k in range(width):
                    g[k] += src[k]
            backward_point(i, top, g, gprev[c], net, act, kept_scale)


@fast_parallel_kernel
def train_batch(
    points, first_stream, batch, net, tabs, retrieval, sampling, act, lookup, back, n_chunks, backprop_output
):
    """Forward + backward of every point of a batch (dataset rows `points` of groups.Batch `batch`);
    chunk c owns scratch row c and points c, c+n_chunks, ... Losses go to act.losses.

    Results do not depend on n_chunks: per-point randomness is keyed by the point's stream number.
    """
    b = points.shape[0]
    inv_batch = 1.0 / b
    weights, b0, layer_slot = net
    hidx, hsign, hparams, offsets, ids, hubs = tabs
    hid, act_ids, act_val, nact, nkept, delta0, losses = act
    for chunk in prange(n_chunks):
        c = np.int64(chunk)  # prange's index is unsigned: a signed copy compiles callees once, not twice
        # see kernels.groups: groups holding tuples are rebuilt inside the loop, stores go to unpacked arrays
        net = Layers(weights, b0, layer_slot)
        tabs = Tables(hidx, hsign, hparams, offsets, ids, hubs)
        act = Activations(hid, act_ids, act_val, nact, nkept, delta0, losses)
        for i in range(c, b, n_chunks):
            losses[i] = train_point(
                i,
                points[i],
                first_stream + i,
                batch,
                inv_batch,
                net,
                tabs,
                retrieval,
                sampling,
                act,
                lookup,
                back,
                c,
                backprop_output,
            )
