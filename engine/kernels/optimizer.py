"""Lazy Adam: only rows a batch touched are updated, each with its own step count.

A row's bias correction uses the number of times that row was updated, so rarely active neurons
get the same effective step size as in dense Adam at their first updates. Updates run in parallel
over rows: each row is owned by one thread, so no lock is needed and no update is lost; every
row's gradient is summed over the batch in point order, which keeps results independent of the
number of threads.

A sampled layer may keep its first moment in bfloat16 (uint16 arrays: the top half of a float32),
which halves the memory and snapshot size of m (173 MB at 670k labels); its 8-bit mantissa is ample
for a running mean that only scales a step (accuracy as with float32: BENCHMARKS.md). The
second moment stays float32: beta2 = 0.999 moves it by 0.1% a step, below bfloat16's resolution.

Weights stored as bfloat16 (config.model.weight_dtype) are widened, stepped in float32 and rounded back
stochastically with a key per row and row step (row_salt), so a run stays reproducible.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange, types
from numba.extending import overload

from .._numba import fast_kernel, fast_parallel_kernel, kernel
from .hashing import mix3
from .lowlevel import float_bits, float_from_bits, prefetch_item, prefetch_row, store_weight, weight_at

_PREFETCH_AHEAD = 8
"""Rows a thread asks the cache for ahead of the one it updates (the touched rows are scattered); chosen
by timing the update on recorded batches (BENCHMARKS.md)."""
_INPUT_ROWS_AHEAD = 4
"""The same for the input layer's rows."""
_KEYS_AHEAD = 16
"""Keys group_keys looks up ahead in its scratch (the output layer's is 2.7 MB, read at random)."""


@fast_kernel
def adam_coefficients(t, lr, beta1, beta2, eps):
    """float32 (step, eps_hat, beta1, beta2, 1 - beta1, 1 - beta2) of Adam's bias-corrected update at
    step t >= 1, computed in float64 once per row: the update is step * m / (sqrt(v) + eps_hat)."""
    bc1 = 1.0 - beta1**t
    bc2 = 1.0 - beta2**t
    return (
        np.float32(lr * math.sqrt(bc2) / bc1),
        np.float32(eps * math.sqrt(bc2)),
        np.float32(beta1),
        np.float32(beta2),
        np.float32(1.0 - beta1),
        np.float32(1.0 - beta2),
    )


@kernel
def row_salt(row, t):
    """The random key of row's t-th update, for the stochastic rounding of bfloat16 weights."""
    return mix3(0x5EED, row, t)


@fast_kernel
def adam_row(w, m, v, g, t, lr, beta1, beta2, eps, salt):
    """One Adam step of row w (float32, or bfloat16 bits rounded stochastically with key salt, see
    lowlevel.store_weight) with gradient g at this row's step t >= 1; returns the update's L2 norm.

    The element loop runs in float32 so that it vectorises.
    """
    step, eps_hat, b1, b2, c1, c2 = adam_coefficients(t, lr, beta1, beta2, eps)
    sq = np.float32(0.0)
    for k in range(w.shape[0]):
        gk = g[k]
        mk = b1 * m[k] + c1 * gk
        vk = b2 * v[k] + c2 * gk * gk
        m[k] = mk
        v[k] = vk
        u = step * mk / (np.sqrt(vk) + eps_hat)
        store_weight(w, k, weight_at(w, k) - u, salt)
        sq += u * u
    return math.sqrt(sq)


@kernel
def bfloat16_bits(bits):
    """float32 bits (uint32, a scalar or an array) -> those of the nearest bfloat16 in the low 16 bits,
    ties to even: the one rounding rule of the kernels and of to_bfloat16."""
    return (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@fast_kernel
def adam_row_bf16(w, m, v, g, t, lr, beta1, beta2, eps, salt):
    """adam_row with m uint16 (bfloat16 bits): each element of m is widened to float32, stepped, and
    rounded back to nearest even in the same loop (one pass over the row, as for float32 m)."""
    step, eps_hat, b1, b2, c1, c2 = adam_coefficients(t, lr, beta1, beta2, eps)
    sq = np.float32(0.0)
    for k in range(w.shape[0]):
        gk = g[k]
        mk = b1 * float_from_bits(np.uint32(m[k]) << np.uint32(16)) + c1 * gk
        vk = b2 * v[k] + c2 * gk * gk
        m[k] = np.uint16(bfloat16_bits(float_bits(mk)))
        v[k] = vk
        u = step * mk / (np.sqrt(vk) + eps_hat)
        store_weight(w, k, weight_at(w, k) - u, salt)
        sq += u * u
    return math.sqrt(sq)


def adam_step(w, m, v, g, t, lr, beta1, beta2, eps, salt):
    """One lazy-Adam step of row w (see adam_row), m float32 or bfloat16 bits (uint16); kernels only."""
    raise NotImplementedError("adam_step is compiled into kernels by Numba")


@overload(adam_step)
def _adam_step(w, m, v, g, t, lr, beta1, beta2, eps, salt):
    if isinstance(m, types.Array) and m.dtype == types.uint16:
        return lambda w, m, v, g, t, lr, beta1, beta2, eps, salt: adam_row_bf16(
            w, m, v, g, t, lr, beta1, beta2, eps, salt
        )
    return lambda w, m, v, g, t, lr, beta1, beta2, eps, salt: adam_row(w, m, v, g, t, lr, beta1, beta2, eps, salt)


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even, as the kernels store m."""
    return bfloat16_bits(np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)).astype(np.uint16)


def from_bfloat16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


@fast_kernel
def add_scaled_input(g, d, x):
    """g += d * [x, 1]: one point's contribution to a neuron row's gradient (bias input is 1)."""
    in_dim = x.shape[0]
    for k in range(in_dim):
        g[k] += d * x[k]
    g[in_dim] += d


@kernel
def group_keys(keys, group_of_key):
    """Stable grouping of int keys in O(len(keys)) time, however large the key range.

    Returns (start int64 (groups+1,), order int64 (len(keys),), touched int64 (groups,)): group r
    holds key touched[r] (groups in order of first appearance) and its entries are
    order[start[r]:start[r+1]], in their original order. group_of_key is int32 scratch (key range,)
    that must be all -1 on entry and is all -1 again on return, so one array serves every batch
    without a pass over the whole key range (a layer of 670k neurons, a batch touching ~100k).
    """
    n = keys.shape[0]
    group = np.empty(n, dtype=np.int64)
    touched = np.empty(n, dtype=np.int64)
    counts = np.zeros(n + 1, dtype=np.int64)
    groups = 0
    for q in range(n):
        if q + _KEYS_AHEAD < n:
            prefetch_item(group_of_key, keys[q + _KEYS_AHEAD])
        key = keys[q]
        r = group_of_key[key]
        if r < 0:
            r = groups
            group_of_key[key] = r
            touched[r] = key
            groups += 1
        group[q] = r
        counts[r + 1] += 1
    for r in range(groups):
        counts[r + 1] += counts[r]
        group_of_key[touched[r]] = -1
    fill = counts[:groups].copy()
    order = np.empty(n, dtype=np.int64)
    for q in range(n):
        r = group[q]
        order[fill[r]] = q
        fill[r] += 1
    return counts[: groups + 1].copy(), order, touched[:groups].copy()


@kernel
def group_by_row(ids, nact, group_of_row, vals, skip_zero):
    """The batch's (point, slot) pairs grouped by neuron id.

    ids int32 (b, cap), nact int32 (b,) -> group_start int64 (rows + 1,), pair_point, pair_slot
    int32 (pairs,), touched int64 (rows,): the pairs of neuron touched[r] are
    group_start[r]:group_start[r+1], in point order. group_of_row: see group_keys. skip_zero leaves
    out pairs whose delta in vals float32 (b, cap) is exactly 0 (the negatives that hard_negatives
    dropped), so a row that only they touched takes no Adam step.
    """
    total = 0
    for i in range(ids.shape[0]):
        total += nact[i]
    keys = np.empty(total, dtype=np.int64)
    point = np.empty(total, dtype=np.int32)
    slot = np.empty(total, dtype=np.int32)
    q = 0
    for i in range(ids.shape[0]):
        for a in range(nact[i]):
            if skip_zero and vals[i, a] == 0.0:
                continue
            keys[q] = ids[i, a]
            point[q] = i
            slot[q] = a
            q += 1
    group_start, order, touched = group_keys(keys[:q], group_of_row)
    return group_start, point[order], slot[order], touched


@fast_kernel
def add_scaled_row(acc, d, row):
    """acc += d * row[:len(acc)]: one pair's share of the gradient at a layer's inputs (no bias)."""
    for k in range(acc.shape[0]):
        acc[k] += d * weight_at(row, k)


@fast_parallel_kernel
def update_sampled_layer(
    w,
    m,
    v,
    steps,
    drift,
    vals,
    inputs,
    group_start,
    pair_point,
    pair_slot,
    touched,
    lr,
    beta1,
    beta2,
    eps,
    n_chunks,
    grad_inputs,
):
    """Adam on the touched rows of a layer with rows (out, in+1); gradient = sum delta * [input, 1];
    m float32 or bfloat16 bits (uint16).

    grad_inputs float32 (n_chunks, b, in), zeroed by the caller, or (0, 0, 0): when given, this is
    also the backward pass through the layer, fused with the update so that each row is read once
    (not once per point that uses it, then again here): chunk c adds delta * w_old[j, :in] of its
    rows' pairs to grad_inputs[c, point]. Rows go to chunks by position, so the caller's sum over
    chunks in order does not depend on the thread count.
    """
    n = touched.shape[0]
    backprop = grad_inputs.shape[0] > 0
    for c in prange(n_chunks):
        g = np.empty(w.shape[1], dtype=np.float32)
        for r in range(c, n, n_chunks):
            ahead = r + _PREFETCH_AHEAD * n_chunks
            if ahead < n:
                prefetch_row(w, touched[ahead])
                prefetch_row(m, touched[ahead])
                prefetch_row(v, touched[ahead])
            j = touched[r]
            g[:] = 0.0
            for q in range(group_start[r], group_start[r + 1]):
                i = pair_point[q]
                d = vals[i, pair_slot[q]]
                add_scaled_input(g, d, inputs[i])
                if backprop:
                    add_scaled_row(grad_inputs[c, i], d, w[j])
            steps[j] += 1
            drift[j] += adam_step(w[j], m[j], v[j], g, steps[j], lr, beta1, beta2, eps, row_salt(j, steps[j]))


@fast_parallel_kernel
def update_dense_layer(w, m, v, steps, drift, vals, inputs, lr, beta1, beta2, eps):
    """Adam on every row of a dense layer; vals float32 (b, out) are the deltas."""
    out_dim = w.shape[0]
    in_dim = w.shape[1] - 1
    b = vals.shape[0]
    n_chunks = min(out_dim, 1024)
    for c in prange(n_chunks):
        g = np.empty(in_dim + 1, dtype=np.float32)
        for j in range(c, out_dim, n_chunks):
            g[:] = 0.0
            for i in range(b):
                if vals[i, j] != 0.0:
                    add_scaled_input(g, vals[i, j], inputs[i])
            steps[j] += 1
            drift[j] += adam_row(w[j], m[j], v[j], g, steps[j], lr, beta1, beta2, eps, row_salt(j, steps[j]))


@kernel
def group_by_feature(points, x_indptr, x_indices, group_of_feature):
    """The batch's non-zeros grouped by feature id: group_start, pair_point, pair_nz, touched."""
    total = 0
    for i in range(points.shape[0]):
        total += x_indptr[points[i] + 1] - x_indptr[points[i]]
    keys = np.empty(total, dtype=np.int64)
    point = np.empty(total, dtype=np.int32)
    nz = np.empty(total, dtype=np.int64)
    q = 0
    for i in range(points.shape[0]):
        for z in range(x_indptr[points[i]], x_indptr[points[i] + 1]):
            keys[q] = x_indices[z]
            point[q] = i
            nz[q] = z
            q += 1
    group_start, order, touched = group_keys(keys, group_of_feature)
    return group_start, point[order], nz[order], touched


@fast_parallel_kernel
def update_input_layer(
    w0, m0, v0, steps0, x_values, delta0, group_start, pair_point, pair_nz, touched, lr, beta1, beta2, eps
):
    """Adam on the rows of W0 (num_features, h1) of features present in the batch.

    Rows are independent, so each chunk takes a contiguous block of touched and prefetches the row
    _INPUT_ROWS_AHEAD places ahead in it (a batch touches only a few thousand rows, so strided chunks would
    hold a handful each, with nothing ahead to prefetch)."""
    width = w0.shape[1]
    n = touched.shape[0]
    n_chunks = min(n, 64)
    per_chunk = (n + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        g = np.empty(width, dtype=np.float32)
        end = min(n, (c + 1) * per_chunk)
        for r in range(c * per_chunk, end):
            if r + _INPUT_ROWS_AHEAD < end:
                ahead = touched[r + _INPUT_ROWS_AHEAD]
                prefetch_row(w0, ahead)
                prefetch_row(m0, ahead)
                prefetch_row(v0, ahead)
            f = touched[r]
            g[:] = 0.0
            for q in range(group_start[r], group_start[r + 1]):
                x = x_values[pair_nz[q]]
                d = delta0[pair_point[q]]
                for k in range(width):
                    g[k] += x * d[k]
            steps0[f] += 1
            adam_row(w0[f], m0[f], v0[f], g, steps0[f], lr, beta1, beta2, eps, row_salt(f, steps0[f]))


@fast_kernel
def update_input_bias(b0, m, v, delta0, t, lr, beta1, beta2, eps):
    g = np.zeros(b0.shape[0], dtype=np.float32)
    for i in range(delta0.shape[0]):
        for k in range(b0.shape[0]):
            g[k] += delta0[i, k]
    adam_row(b0, m, v, g, t, lr, beta1, beta2, eps, np.uint64(0))
