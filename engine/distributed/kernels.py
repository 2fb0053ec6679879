"""The output layer's step split at the cross-shard softmax, for label-sharded training.

The single-process step (kernels.forward.train_point) scores a point's active output neurons, normalises
their softmax and computes the deltas in one call. A shard owns only a slice of the labels, so its step
stops twice for the other shards:

1. `shard_forward_batch`: the replicated hidden layers and this shard's output active set; returns each
   point's largest local logit (the driver takes the maximum over shards);
2. `shard_exps_batch`: exp(logit - global max) over the local active set; returns each point's local sum
   (the driver adds them over shards);
3. `shard_deltas_batch`: probabilities with the global sum, loss and deltas (p - y / |Y|) / batch over the
   local active set, with |Y| the point's label count over all shards.

Each stage runs the same loops as train_point and softmax_inplace in the same order, so a run with one
shard computes the same numbers, bit for bit, as the single-process trainer. `dense_output_grads` is the
backward pass through a dense output layer (train_point's backward_point does it inline).
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from .._numba import fast_kernel, fast_parallel_kernel
from ..kernels.forward import forward_point
from ..kernels.groups import Activations, Layers, Tables
from ..kernels.lowlevel import float_bits, float_from_bits, weight_at
from ..kernels.sampling import is_label, kth_largest


@fast_kernel
def shard_forward_point(i, p, stream, batch, net, tabs, retrieval, sampling, act, lookup, chunk, label_flags):
    """train_point's forward pass (kernels.forward.forward_point) of dataset row p in batch slot i, up to the
    output logits; y holds this shard's labels only (local ids). Returns the largest output logit (-inf for an
    empty active set). label_flags uint8 (b, cap): 1 where an active neuron of a sampled output layer is a true
    label (the membership tags it is read from are reused by the chunk's next point)."""
    forward_point(i, p, stream, batch, net, tabs, retrieval, sampling, act, lookup, chunk)
    out_l = len(net.weights) - 1
    n = act.nact[i, out_l]
    vals = act.act_val[out_l - 1][i]
    if net.layer_slot[out_l] >= 0:
        ids = act.act_ids[out_l - 1][i]
        row_tags = lookup.tags[chunk]
        for a in range(n):
            label_flags[i, a] = 1 if is_label(row_tags, ids[a]) else 0
    top = -np.inf
    for a in range(n):
        if vals[a] > top:
            top = vals[a]
    return top


@fast_parallel_kernel
def shard_forward_batch(
    points, first_stream, batch, net, tabs, retrieval, sampling, act, lookup, n_chunks, label_flags, tops
):
    """shard_forward_point for every point of a batch (chunk c owns scratch row c and points c, c+n_chunks,
    ...); tops float64 (b,) receives each point's largest output logit. The groups: kernels.groups."""
    b = points.shape[0]
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
            tops[i] = shard_forward_point(
                i, points[i], first_stream + i, batch, net, tabs, retrieval, sampling, act, lookup, c, label_flags
            )


@fast_kernel
def output_exps(vals, n, top):
    """vals[:n] = exp(vals[:n] - top); returns their sum (float64), in softmax_inplace's order."""
    total = 0.0
    for a in range(n):
        e = math.exp(vals[a] - top)
        vals[a] = e
        total += e
    return total


@fast_parallel_kernel
def shard_exps_batch(vals, nact_out, tops, sums):
    """output_exps of every point: vals float32 (b, cap) output activations, nact_out int32 (b,), tops
    float64 (b,) the maxima over all shards; sums float64 (b,) receives the local sums."""
    for i in prange(vals.shape[0]):
        sums[i] = output_exps(vals[i], nact_out[i], tops[i])


@fast_kernel
def shard_deltas_point(
    i, y_indptr, y_indices, n_labels, inv_batch, total, flags, vals, n, n_kept, sampled, hard_negatives, keys
):
    """train_point's output half for batch slot i after the softmax's exponentials: probabilities from the
    global sum `total`, the loss of this shard's labels, and deltas; n_labels is the point's label count
    over all shards (0: no gradient). flags: the point's label flags from shard_forward_point."""
    if n_labels == 0:
        vals[:n] = 0.0
        return 0.0
    inv = 1.0 / total
    for a in range(n):
        vals[a] *= inv
    loss = 0.0
    share = 1.0 / n_labels
    if sampled:
        cut = -1.0
        local_labels = y_indptr[i + 1] - y_indptr[i]
        if hard_negatives > 0 and n_kept - local_labels > hard_negatives:
            c = 0
            for a in range(n_kept):
                if flags[a] == 0:
                    keys[c] = np.int32(float_bits(vals[a]))
                    c += 1
            if c > hard_negatives:
                cut = float_from_bits(np.uint32(kth_largest(keys, c, hard_negatives)))
        for a in range(n):
            target = 0.0
            if flags[a] != 0:
                target = share
                loss -= share * math.log(max(vals[a], 1e-30))
            elif vals[a] < cut and a < n_kept:
                vals[a] = 0.0
            vals[a] = (vals[a] - target) * inv_batch
    else:
        for q in range(y_indptr[i], y_indptr[i + 1]):
            loss -= share * math.log(max(vals[y_indices[q]], 1e-30))
        for a in range(n):
            vals[a] *= inv_batch
        for q in range(y_indptr[i], y_indptr[i + 1]):
            vals[y_indices[q]] -= share * inv_batch
    return loss


@fast_parallel_kernel
def shard_deltas_batch(
    y_indptr,
    y_indices,
    n_labels,
    totals,
    label_flags,
    act_val_out,
    nact_out,
    nkept,
    sampled,
    hard_negatives,
    counts,
    n_chunks,
    losses,
):
    """shard_deltas_point for every point; chunk c uses the scratch row counts[c] for its points c,
    c+n_chunks, ...; y: the batch's local labels in slot order; losses float64 (b,)."""
    b = act_val_out.shape[0]
    inv_batch = 1.0 / b
    for chunk in prange(n_chunks):
        c = np.int64(chunk)  # prange's index is unsigned: a signed copy compiles callees once, not twice
        for i in range(c, b, n_chunks):
            losses[i] = shard_deltas_point(
                i,
                y_indptr,
                y_indices,
                n_labels[i],
                inv_batch,
                totals[i],
                label_flags[i],
                act_val_out[i],
                nact_out[i],
                nkept[i],
                sampled,
                hard_negatives,
                counts[c],
            )


@fast_parallel_kernel
def dense_output_grads(w, act_val_out, nact_out, grads):
    """grads float32 (b, in): the gradient at a dense output layer's inputs, sum_a delta[a] * w[a, :in],
    in backward_point's order."""
    in_dim = w.shape[1] - 1
    for i in prange(act_val_out.shape[0]):
        g = grads[i]
        g[:in_dim] = 0.0
        vals = act_val_out[i]
        for a in range(nact_out[i]):
            d = vals[a]
            if d != 0.0:
                row = w[a]
                for k in range(in_dim):
                    g[k] += d * weight_at(row, k)
