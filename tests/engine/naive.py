"""Naive numpy twins of the engine's kernels: slow, obvious, float64 where it matters.

Nothing here imports a Numba kernel: each function restates what the engine should compute so the
tests can compare the two. Shapes follow the engine (see engine/network.py):

  w0 (num_features, h1), b0 (h1,): the sparse input layer;
  weights[l] (out_l, in_l + 1) for l >= 1: one row per neuron, bias in the last column;
  the last layer is the output layer (softmax over all labels, or over an active set; or a sigmoid per label).
"""

from __future__ import annotations

import math

import numpy as np

M64 = (1 << 64) - 1
FNV_PRIME = 0x100000001B3
SIMHASH, WTA, DWTA = 0, 1, 2
DENSIFY_ATTEMPTS = 128


# ---- data helpers -------------------------------------------------------------------------------
def dense_rows(indptr, indices, values, num_features, rows=None, dtype=np.float64) -> np.ndarray:
    """The CSR rows (all, or `rows`) as a dense (n, num_features) matrix."""
    rows = np.arange(len(indptr) - 1) if rows is None else np.asarray(rows)
    x = np.zeros((len(rows), num_features), dtype=dtype)
    for r, p in enumerate(rows):
        s, e = int(indptr[p]), int(indptr[p + 1])
        np.add.at(x[r], np.asarray(indices[s:e], dtype=np.int64), np.asarray(values[s:e], dtype=dtype))
    return x


def label_lists(y_indptr, y_indices, rows=None) -> list[np.ndarray]:
    rows = np.arange(len(y_indptr) - 1) if rows is None else np.asarray(rows)
    return [np.asarray(y_indices[y_indptr[p] : y_indptr[p + 1]], dtype=np.int64) for p in rows]


# ---- the network ----------------------------------------------------------------------------------
def forward(w0, b0, weights, x, active=None, shift=None, dropout=None):
    """Dense forward pass of a batch x (n, num_features).

    weights: the layers after the input layer (the engine's weights[1:]). active: optional dict
    {layer index l >= 1: boolean mask (n, out_l)} of the neurons each point computes in layer l
    (inactive hidden neurons output 0; the output softmax is normalised over the active set).
    shift: optional (n, out) added to the output logits before the softmax (log-Q correction).
    dropout: optional list over hidden layers (0 .. D-1) of (n, width) factors applied to their outputs
    (0 for a dropped unit, 1 / (1 - rate) for a kept one).
    Returns (hs, z, p): hs[0] = relu(x w0 + b0), hs[l] the output of hidden layer l, z the output
    logits (shifted) and p the softmax (zero outside the active set).
    """
    active = active or {}
    x = np.asarray(x, dtype=np.float64)
    hs = [np.maximum(x @ np.asarray(w0, np.float64) + np.asarray(b0, np.float64), 0.0)]
    if dropout is not None:
        hs[0] = hs[0] * dropout[0]
    depth = len(weights) + 1
    z = None
    for layer in range(1, depth):
        w = np.asarray(weights[layer - 1], dtype=np.float64)
        a = hs[-1] @ w[:, :-1].T + w[:, -1]
        if layer < depth - 1:
            h = np.maximum(a, 0.0)
            if layer in active:
                h = np.where(active[layer], h, 0.0)
            if dropout is not None:
                h = h * dropout[layer]
            hs.append(h)
        else:
            z = a if shift is None else a + shift
    mask = active.get(depth - 1, np.ones_like(z, dtype=bool))
    zm = np.where(mask, z, -np.inf)
    e = np.exp(zm - zm.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return hs, z, p


def target_matrix(labels: list[np.ndarray], num_labels: int) -> np.ndarray:
    """T[i, y] = 1/|Y_i| for the true labels of point i (a row of zeros for an unlabelled point)."""
    t = np.zeros((len(labels), num_labels))
    for i, y in enumerate(labels):
        if len(y):
            t[i, y] = 1.0 / len(y)
    return t


def loss(w0, b0, weights, x, labels, active=None, shift=None, dropout=None, sigmoid=False) -> float:
    """Mean over the batch of -sum_{y in Y_i} 1/|Y_i| log p_iy (unlabelled points count 0); with `sigmoid`, of
    the logistic losses of the active outputs, sum_j (log(1 + e^-z_ij) if j in Y_i else log(1 + e^z_ij)), at the
    logits without the softmax's log-Q shift."""
    if sigmoid:
        _, z, _ = forward(w0, b0, weights, x, active, None, dropout)
        mask, y = _sigmoid_terms(z, labels, active, len(weights))
        return float(np.where(mask, np.logaddexp(0.0, np.where(y > 0, -z, z)), 0.0).sum() / len(labels))
    _, _, p = forward(w0, b0, weights, x, active, shift, dropout)
    t = target_matrix(labels, p.shape[1])
    with np.errstate(divide="ignore"):
        logp = np.where(t > 0, np.log(np.where(t > 0, p, 1.0)), 0.0)
    return float(-(t * logp).sum() / len(labels))


def _sigmoid_terms(z, labels, active, out_layer):
    """(mask, y) of the sigmoid loss: the active outputs of labelled points, and the 0/1 targets."""
    y = (target_matrix(labels, z.shape[1]) > 0).astype(np.float64)
    labelled = np.array([len(t) > 0 for t in labels])
    mask = (active or {}).get(out_layer, np.ones_like(z, dtype=bool)) & labelled[:, None]
    return mask, y


def gradients(w0, b0, weights, x, labels, active=None, keep=None, shift=None, dropout=None, sigmoid=False):
    """Gradients of `loss` (the batch mean): (g_w0, g_b0, [g_weights[l] for l >= 1]).

    With `active`, the gradient of the loss whose softmax (and hidden layers) are restricted to the
    active set: the dense gradient restricted to the active neurons. keep: optional boolean mask
    (n, out) of the output neurons whose delta is kept (the others' is zeroed: hard negatives).
    shift: see forward; a constant per logit, so it changes p but not the chain rule.
    dropout: see forward; a kept unit's factor multiplies its gradient too.
    sigmoid: the gradient of loss(sigmoid=True): sigmoid(z_ij) - y_ij on the active outputs (shift unused).
    """
    active = active or {}
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if sigmoid:
        hs, z, _ = forward(w0, b0, weights, x, active, None, dropout)
        mask, y = _sigmoid_terms(z, labels, active, len(weights))
        dz = np.where(mask, 1.0 / (1.0 + np.exp(-z)) - y, 0.0) / n
    else:
        hs, z, p = forward(w0, b0, weights, x, active, shift, dropout)
        t = target_matrix(labels, z.shape[1])
        labelled = np.array([len(y) > 0 for y in labels])
        dz = np.where(labelled[:, None], p - t, 0.0) / n
    if keep is not None:
        dz = np.where(keep, dz, 0.0)
    depth = len(weights) + 1
    grads = [None] * (depth - 1)
    d = dz
    for layer in range(depth - 1, 0, -1):
        w = np.asarray(weights[layer - 1], dtype=np.float64)
        h_in = hs[layer - 1]
        grads[layer - 1] = np.concatenate([d.T @ h_in, d.sum(axis=0)[:, None]], axis=1)
        dh = d @ w[:, :-1]
        if dropout is not None:
            dh = dh * dropout[layer - 1]
        if layer - 1 >= 1:
            d = dh * (h_in > 0)
            if (layer - 1) in active:
                d = d * active[layer - 1]
        else:
            d0 = dh * (h_in > 0)
    g_w0 = x.T @ d0
    g_b0 = d0.sum(axis=0)
    return g_w0, g_b0, grads


def hard_negative_mask(w0, b0, weights, x, labels, active, count, drawn=None, shift=None):
    """bool (n, out): each point's labels, its randomly drawn negatives (`drawn`, bool (n, out)) and
    its `count` most probable other active non-labels (softmax over the active set), the output deltas
    the engine keeps with hard_negatives = count."""
    _, z, p = forward(w0, b0, weights, x, active, shift)
    keep = target_matrix(labels, z.shape[1]) > 0
    if drawn is not None:
        keep |= drawn
    for i in range(x.shape[0]):
        negatives = np.flatnonzero(active[len(weights)][i] & ~keep[i])
        keep[i, negatives[np.argsort(-p[i, negatives], kind="stable")[:count]]] = True
    return keep


def adam_rows(w, m, v, steps, g, rows, lr, beta1, beta2, eps):
    """Lazy Adam in float64, in place: rows `rows` of w take one step with their own step counts."""
    for r in rows:
        steps[r] += 1
        t = steps[r]
        m[r] = beta1 * m[r] + (1 - beta1) * g[r]
        v[r] = beta2 * v[r] + (1 - beta2) * g[r] ** 2
        m_hat = m[r] / (1 - beta1**t)
        v_hat = v[r] / (1 - beta2**t)
        w[r] -= lr * m_hat / (np.sqrt(v_hat) + eps)


def adam_vector(w, m, v, t, g, lr, beta1, beta2, eps):
    """One Adam step of a whole vector at step t (the input bias)."""
    m[:] = beta1 * m + (1 - beta1) * g
    v[:] = beta2 * v + (1 - beta2) * g**2
    w -= lr * (m / (1 - beta1**t)) / (np.sqrt(v / (1 - beta2**t)) + eps)


def topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k labels (descending score, lower id first on ties) and their scores, per row."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def hidden_float32(w0, b0, indices, values):
    """relu(b0 + sum v * w0[f]) in float32 with the engine's summation order (bit-exact)."""
    h = np.array(b0, dtype=np.float32, copy=True)
    for f, v in zip(indices, values, strict=True):
        h += np.float32(v) * w0[f]
    return np.maximum(h, np.float32(0.0))


# ---- hashing -------------------------------------------------------------------------------------
def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def mix3(seed: int, a: int, b: int) -> int:
    h = splitmix64((seed & M64) ^ splitmix64(a & M64))
    return splitmix64(h ^ (b & M64))


def simhash_codes(x, idx, sign) -> np.ndarray:
    """One bit per code: [<r_c, x> > 0], r_c the sparse +-1 projection (idx[c], sign[c])."""
    x = np.asarray(x, dtype=np.float64)
    return np.array(
        [1 if float(np.dot(sign[c].astype(np.float64), x[idx[c]])) > 0 else 0 for c in range(idx.shape[0])],
        dtype=np.int64,
    )


def wta_codes(x, idx, empty_code=0) -> np.ndarray:
    """Argmax position (first on ties) inside each bin; `empty_code` for an all-zero bin."""
    out = np.empty(idx.shape[0], dtype=np.int64)
    for c in range(idx.shape[0]):
        vals = np.asarray(x)[idx[c]]
        out[c] = int(np.argmax(vals)) if np.any(vals != 0) else empty_code
    return out


def dwta_codes(x, idx, seed) -> np.ndarray:
    """WTA whose empty bins copy the code of the first non-empty bin j = mix3(seed, c, attempt) % n."""
    raw = wta_codes(x, idx, empty_code=-1)
    n = len(raw)
    out = raw.copy()
    for c in range(n):
        if raw[c] >= 0:
            continue
        out[c] = 0
        for attempt in range(1, DENSIFY_ATTEMPTS + 1):
            j = mix3(seed, c, attempt) % n
            if raw[j] >= 0:
                out[c] = raw[j]
                break
    return out


def combine(codes, k, n_tables, radix, fold, table_bits, seed) -> np.ndarray:
    """Bucket id per table: sum_j c_j radix^j, or (fold) an FNV/splitmix hash cut to table_bits."""
    out = np.empty(n_tables, dtype=np.int64)
    for t in range(n_tables):
        cs = [int(c) for c in codes[t * k : (t + 1) * k]]
        if not fold:
            out[t] = sum(c * radix**j for j, c in enumerate(cs))
        else:
            h = splitmix64((seed + t) & M64)
            for c in cs:
                h = ((h ^ (c + 1)) * FNV_PRIME) & M64
            out[t] = splitmix64(h) >> (64 - table_bits)
    return out


def bucket_ids(x, idx, sign, params) -> np.ndarray:
    """The bucket of x in each of the L tables, as engine.lsh.hash_dense should compute it."""
    family, k, n_tables, radix, _, fold, bits, seed = (int(p) for p in params)
    if family == SIMHASH:
        codes = simhash_codes(x, idx, sign)
    elif family == WTA:
        codes = wta_codes(x, idx)
    else:
        codes = dwta_codes(x, idx, seed)
    return combine(codes, k, n_tables, radix, fold, bits, seed)


# ---- tables --------------------------------------------------------------------------------------
def group_buckets(codes: np.ndarray, num_buckets: int) -> list[list[np.ndarray]]:
    """groups[t][b] = the neurons j with codes[t, j] == b, ascending."""
    return [[np.flatnonzero(codes[t] == b) for b in range(num_buckets)] for t in range(codes.shape[0])]


def tie_seed(params, buckets) -> int:
    """The per-input seed the engine breaks ties with: a chain of mix3 over (table, bucket)."""
    h = int(params[7]) & M64
    for t, b in enumerate(buckets):
        h = mix3(h, t, int(b))
    return h


def retrieve(found: np.ndarray, threshold: int = 1, cap: int = 0, ties: int = 0) -> np.ndarray:
    """The candidates an input keeps from the concatenated members of its L buckets (`found`, in table
    order): ids seen >= threshold times, then (cap > 0) the `cap` most frequently seen, ties at the
    cut-off count resolved by systematic sampling (every (ties / needed)-th tie in order of first
    appearance, from a start keyed by `ties`; see tie_seed). Returned in order of first appearance."""
    ids, first, counts = np.unique(found, return_index=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    ids, counts = ids[order], counts[order]
    keep = counts >= threshold
    ids, counts = ids[keep], counts[keep]
    if cap > 0 and len(ids) > cap:
        cutoff = np.sort(counts)[::-1][cap - 1]
        needed = cap - int(np.count_nonzero(counts > cutoff))
        tied = int(np.count_nonzero(counts == cutoff))
        start = int(ties) % tied
        # tie number t (0-based) is kept when start + (t + 1) * needed crosses a multiple of tied
        t = np.cumsum(counts == cutoff) - 1
        crosses = (start + (t + 1) * needed) // tied > (start + t * needed) // tied
        ids = ids[(counts > cutoff) | ((counts == cutoff) & crosses)]
    return ids


def collision_probability(p: float, k: int, n_tables: int) -> float:
    return 1.0 - (1.0 - p**k) ** n_tables


def simhash_bit_collision(cosine: float) -> float:
    return 1.0 - math.acos(cosine) / math.pi


# ---- a small planted dataset ----------------------------------------------------------------------
def planted_dataset(
    num_points, num_features, num_labels, seed=0, vocab=6, noise=2, max_labels=3, unlabelled=0.0, zipf=1.0
):
    """A Dataset where each label owns `vocab` features: a point with labels Y has (most of) the
    features of Y plus `noise` random ones, with positive tf-idf-like values (rows L2-normalised).
    Labels are Zipf-popular. `unlabelled`: the share of points without labels (features pure noise)."""
    from engine.sparse import Dataset

    rng = np.random.default_rng(seed)
    owned = np.stack([rng.choice(num_features, size=vocab, replace=False) for _ in range(num_labels)])
    popularity = 1.0 / np.arange(1, num_labels + 1) ** zipf
    popularity /= popularity.sum()
    rank = rng.permutation(num_labels)  # label rank[i] has the i-th popularity
    x_indptr, x_indices, x_values, y_indptr, y_indices = [0], [], [], [0], []
    for _ in range(num_points):
        if rng.random() < unlabelled:
            labels = np.empty(0, dtype=np.int64)
        else:
            n_lab = int(rng.integers(1, max_labels + 1))
            labels = np.unique(rank[rng.choice(num_labels, size=n_lab, replace=False, p=popularity)])
        feats = [owned[y][rng.random(vocab) < 0.8] for y in labels]
        feats.append(rng.choice(num_features, size=noise, replace=False))
        f = np.unique(np.concatenate(feats)).astype(np.int32)
        v = rng.uniform(0.5, 1.5, size=len(f)).astype(np.float32)
        v /= np.linalg.norm(v)
        x_indices.append(f)
        x_values.append(v.astype(np.float32))
        x_indptr.append(x_indptr[-1] + len(f))
        y_indices.append(labels.astype(np.int32))
        y_indptr.append(y_indptr[-1] + len(labels))
    return Dataset(
        np.array(x_indptr, np.int64),
        np.concatenate(x_indices).astype(np.int32),
        np.concatenate(x_values).astype(np.float32),
        np.array(y_indptr, np.int64),
        np.concatenate(y_indices).astype(np.int32),
        num_features,
        num_labels,
    )
