"""Hashing kernels: bucket ids of dense vectors and of weight rows, and the counter-based random numbers.

`params` is a layer's int64 (8,) hash description (lsh.HashFunctions.params), read through the
index names below: family, K codes per table, L tables, radix, buckets per table, whether codes are
folded, table bits, and the seed of the fold and of DWTA's densification. The K/L maths and the
drawing of hash functions live in engine/lsh.py.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._numba import kernel, parallel_kernel
from .lowlevel import weight_at

SIMHASH, WTA, DWTA = 0, 1, 2
FAMILY, K, TABLES, RADIX, NUM_BUCKETS, FOLD, TABLE_BITS, SEED = range(8)
"""Positions in a layer's hash params array."""
_DENSIFY_ATTEMPTS = 128
_FNV_PRIME = np.uint64(0x100000001B3)
_HASH_BLOCK = 64


@kernel
def splitmix64(x):
    """64-bit finalizer (Steele et al.): a bijective mix of a uint64."""
    z = np.uint64(x) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@kernel
def mix3(seed, a, b):
    """A uint64 hash of three integers, used as a counter-based random number."""
    h = splitmix64(np.uint64(seed) ^ splitmix64(np.uint64(a)))
    return splitmix64(h ^ np.uint64(b))


@kernel
def raw_codes(x, idx, sign, family, codes):
    """Per-code values of vector x (dense, float32 (dim,)) into codes int32 (L*K,); returns nothing.

    For WTA/DWTA a code is -1 when its bin is empty (all zeros), to be densified by the caller.
    """
    n_codes, m = idx.shape
    for c in range(n_codes):
        if family == SIMHASH:
            acc = np.float32(0.0)
            for t in range(m):
                acc += sign[c, t] * x[idx[c, t]]
            codes[c] = 1 if acc > 0.0 else 0
        else:
            best = x[idx[c, 0]]
            arg = 0
            nonzero = best != 0.0
            for t in range(1, m):
                val = x[idx[c, t]]
                if val != 0.0:
                    nonzero = True
                if val > best:
                    best = val
                    arg = t
            codes[c] = arg if (nonzero or family == WTA) else -1


@kernel
def densify(codes, seed):
    """DWTA: each empty code (-1) takes the code of a non-empty one picked by a second hash (0 if none)."""
    n = codes.shape[0]
    for c in range(n):
        if codes[c] >= 0:
            continue
        found = 0
        for attempt in range(1, _DENSIFY_ATTEMPTS + 1):
            j = np.int64(mix3(seed, c, attempt) % np.uint64(n))
            if codes[j] >= 0:
                found = codes[j]
                break
        codes[c] = -2 - found
    for c in range(n):
        if codes[c] < 0:
            codes[c] = -2 - codes[c]


@kernel
def table_bucket(codes, t, params):
    """Bucket id of table t from its K codes codes[t*K : (t+1)*K]."""
    k, radix, fold, table_bits, seed = params[K], params[RADIX], params[FOLD], params[TABLE_BITS], params[SEED]
    if fold == 0:
        b = 0
        for j in range(k - 1, -1, -1):
            b = b * radix + codes[t * k + j]
        return np.int32(b)
    h = splitmix64(np.uint64(seed) + np.uint64(t))
    for j in range(k):
        h = (h ^ np.uint64(codes[t * k + j] + 1)) * _FNV_PRIME
    h = splitmix64(h)
    return np.int32(h >> np.uint64(64 - table_bits))


@kernel
def combine_codes(codes, params, buckets):
    """Fold per-table codes (L*K,) into bucket ids int32 (L,)."""
    for t in range(params[TABLES]):
        buckets[t] = table_bucket(codes, t, params)


@kernel
def hash_vector(x, idx, sign, params, scratch, buckets):
    """Bucket ids int32 (L,) of one dense vector x; scratch is int32 (L*K,)."""
    family = params[FAMILY]
    raw_codes(x, idx, sign, family, scratch)
    if family == DWTA:
        densify(scratch, params[SEED])
    combine_codes(scratch, params, buckets)


@kernel
def probe_buckets(x, idx, sign, params, probes, margins, codes, buckets):
    """Multi-probe SimHash (Lv et al., VLDB 2007): each table's own bucket of x and `probes` more.

    buckets int32 (L * (1 + probes),), table-major: buckets[t * (1 + probes)] is table t's bucket
    (as hash_vector gives it) and the next `probes` entries flip one of the table's least confident
    bits each (smallest |<r, x>|), where a key that only just fell across a hyperplane sits. More
    probes find the same neighbours with fewer tables. margins float64 and codes int32 are (L*K,)
    scratch. For WTA/DWTA (no margins) the extra entries repeat the table's own bucket.
    """
    k, n_tables, family = params[K], params[TABLES], params[FAMILY]
    n_codes, m = idx.shape
    stride = 1 + probes
    if family != SIMHASH:
        raw_codes(x, idx, sign, family, codes)
        if family == DWTA:
            densify(codes, params[SEED])
        for t in range(n_tables):
            b = table_bucket(codes, t, params)
            for p in range(stride):
                buckets[t * stride + p] = b
        return
    for c in range(n_codes):
        acc = np.float32(0.0)
        for q in range(m):
            acc += sign[c, q] * x[idx[c, q]]
        codes[c] = 1 if acc > 0.0 else 0
        margins[c] = abs(acc)
    for t in range(n_tables):
        buckets[t * stride] = table_bucket(codes, t, params)
        for p in range(1, stride):
            best = -1
            for j in range(t * k, (t + 1) * k):
                if margins[j] >= 0.0 and (best < 0 or margins[j] < margins[best]):
                    best = j
            if best < 0:
                buckets[t * stride + p] = buckets[t * stride]
                continue
            margins[best] = -1.0
            codes[best] = 1 - codes[best]
            buckets[t * stride + p] = table_bucket(codes, t, params)
            codes[best] = 1 - codes[best]


@parallel_kernel
def hash_rows(weights, rows, center, idx, sign, params, out):
    """Bucket ids of centred weight rows: out int32 (L, len(rows)), out[:, r] for neuron rows[r].

    Keys are hashed as w - center: subtracting one vector from every key leaves the ranking of
    <w, query> unchanged for any query, and spreads keys that share a common direction over buckets.
    Rows go in blocks of _HASH_BLOCK, transposed so that every code is computed for the whole block
    in one contiguous (vectorisable) loop; the codes equal hash_vector's for each row, bit for bit.
    """
    n = rows.shape[0]
    dim = center.shape[0]
    n_codes, m = idx.shape
    family = params[FAMILY]
    n_blocks = (n + _HASH_BLOCK - 1) // _HASH_BLOCK
    n_chunks = min(n_blocks, 256)
    for chunk in prange(n_chunks):
        keys = np.empty((dim, _HASH_BLOCK), dtype=np.float32)
        codes = np.empty((n_codes, _HASH_BLOCK), dtype=np.int32)
        acc = np.empty(_HASH_BLOCK, dtype=np.float32)
        best = np.empty(_HASH_BLOCK, dtype=np.float32)
        nonzero = np.empty(_HASH_BLOCK, dtype=np.bool_)
        scratch = np.empty(n_codes, dtype=np.int32)
        hashes = np.empty(_HASH_BLOCK, dtype=np.uint64)
        bucket_acc = np.empty(_HASH_BLOCK, dtype=np.int32)
        for blk in range(chunk, n_blocks, n_chunks):
            start = blk * _HASH_BLOCK
            bn = min(n, start + _HASH_BLOCK) - start
            for j in range(bn):
                row = weights[rows[start + j]]
                for d in range(dim):
                    keys[d, j] = weight_at(row, d) - center[d]
            for c in range(n_codes):
                if family == SIMHASH:
                    acc[:bn] = 0.0
                    for t in range(m):
                        s = sign[c, t]
                        key = keys[idx[c, t]]
                        for j in range(bn):
                            acc[j] += s * key[j]
                    for j in range(bn):
                        codes[c, j] = 1 if acc[j] > 0.0 else 0
                else:
                    key = keys[idx[c, 0]]
                    for j in range(bn):
                        best[j] = key[j]
                        nonzero[j] = key[j] != 0.0
                        codes[c, j] = 0
                    for t in range(1, m):
                        key = keys[idx[c, t]]
                        for j in range(bn):
                            if key[j] != 0.0:
                                nonzero[j] = True
                            if key[j] > best[j]:
                                best[j] = key[j]
                                codes[c, j] = t
                    if family == DWTA:
                        for j in range(bn):
                            if not nonzero[j]:
                                codes[c, j] = -1
            if family == DWTA:
                for j in range(bn):
                    for c in range(n_codes):
                        scratch[c] = codes[c, j]
                    densify(scratch, params[SEED])
                    for c in range(n_codes):
                        codes[c, j] = scratch[c]
            combine_block(codes, params, bn, hashes, bucket_acc, out[:, start : start + bn])


@kernel
def combine_block(codes, params, bn, hashes, acc, out):
    """combine_codes for a block: codes int32 (L*K, >= bn) -> out int32 (L, bn); hashes uint64 and
    acc int32 (>= bn,) are scratch, so that every inner loop runs over contiguous 1-d arrays."""
    k, n_tables, radix, fold, table_bits = params[K], params[TABLES], params[RADIX], params[FOLD], params[TABLE_BITS]
    seed = params[SEED]
    for t in range(n_tables):
        if fold == 0:
            # radix^K <= 2^24 buckets when codes are not folded, so int32 cannot overflow
            r = np.int32(radix)
            for j in range(bn):
                acc[j] = 0
            for kk in range(k - 1, -1, -1):
                code = codes[t * k + kk]
                for j in range(bn):
                    acc[j] = acc[j] * r + code[j]
            for j in range(bn):
                out[t, j] = acc[j]
        else:
            h0 = splitmix64(np.uint64(seed) + np.uint64(t))
            for j in range(bn):
                hashes[j] = h0
            for kk in range(k):
                code = codes[t * k + kk]
                for j in range(bn):
                    hashes[j] = (hashes[j] ^ np.uint64(code[j] + 1)) * _FNV_PRIME
            for j in range(bn):
                out[t, j] = np.int32(splitmix64(hashes[j]) >> np.uint64(64 - table_bits))
