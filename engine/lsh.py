"""Hash families over dense vectors (a layer's input, a neuron's weight row) and their K/L maths.

Every family yields, per table, K codes in [0, radix) that are combined into one bucket id:
exactly (mixed radix, sum c_k * radix^k) when the code space fits the table, so no two codes
share a bucket and every bucket is reachable; otherwise folded with a 64-bit mix down to
`table_bits` bits, which keeps every bucket reachable with uniform load.

- SimHash: bit = [<r, x> > 0] with sparse random r in {-1, 0, +1}; radix 2.
- WTA: the code is the argmax position inside a bin of `bin_size` dimensions of a random permutation.
- DWTA: WTA whose empty bins (all zeros, common after ReLU or for sparse inputs) borrow the code of a
  non-empty bin chosen by a second hash, so sparse vectors still get informative codes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import prange

from ._numba import kernel, parallel_kernel
from .config import SMALL_LAYER_TABLES, WIDE_LAYER_TABLES, SlideConfig
from .kernels.lowlevel import weight_at

SIMHASH, WTA, DWTA = 0, 1, 2
FAMILY_IDS = {"simhash": SIMHASH, "wta": WTA, "dwta": DWTA}
_DENSIFY_ATTEMPTS = 128
_FNV_PRIME = np.uint64(0x100000001B3)
_HASH_BLOCK = 64


class HashFunctions(NamedTuple):
    """The random draws of one layer's L tables of K codes each.

    idx: int32 (L*K, m), the input dimensions each code reads (m = projection nnz or bin_size).
    sign: float32 (L*K, m), SimHash projection signs (all ones for WTA/DWTA).
    params: int64 (8,) = family, K, L, radix, num_buckets, fold, table_bits, seed.
    """

    idx: np.ndarray
    sign: np.ndarray
    params: np.ndarray

    @property
    def family(self) -> int:
        return int(self.params[0])

    @property
    def k(self) -> int:
        return int(self.params[1])

    @property
    def n_tables(self) -> int:
        return int(self.params[2])

    @property
    def num_buckets(self) -> int:
        return int(self.params[4])


TARGET_FRACTION = 0.05
MAX_TARGET_ACTIVE = 1000


def target_active(n_neurons: int) -> int:
    """Active neurons a sampled layer aims for per input: 5% of a small layer, at most 1,000."""
    return int(min(MAX_TARGET_ACTIVE, max(32, TARGET_FRACTION * n_neurons)))


def is_wide_layer(n_neurons: int) -> bool:
    """Whether a layer is too wide for its target active size to be 5% of it (> 20,000 neurons): the
    auto hubs, negatives and table count of such a layer differ from a small one's."""
    return TARGET_FRACTION * n_neurons > MAX_TARGET_ACTIVE


def resolve_max_active(config: SlideConfig, n_neurons: int, predict: bool = False) -> int:
    """The cap on retrieved neurons per input for a layer in training or prediction (0 = no cap).
    Serving with predict_max_active = 0 (auto) uses the training cap when the layer has serving hubs
    to cover what the cap leaves out, and no cap otherwise."""
    if predict and config.predict_max_active != 0:
        return max(0, config.predict_max_active)
    if predict and resolve_serve_hubs(config, n_neurons) == 0:
        return 0
    cap = config.max_active
    if cap == -1:
        return 0
    return cap or target_active(n_neurons)


def _wide_layer_setting(value: int, n_neurons: int, auto: int) -> int:
    """A count setting of a sampled layer: -1 = none, > 0 = that many (at most the layer), 0 = `auto`
    once the layer is too wide for its target active size to be 5% of it (> 20,000 neurons), else none."""
    if value == -1:
        return 0
    if value:
        return min(n_neurons, value)
    return auto if is_wide_layer(n_neurons) else 0


def resolve_hubs(config: SlideConfig, n_neurons: int) -> int:
    """How many hub neurons a sampled layer adds to every active set: config.hub_neurons, or (auto) a
    quarter of the target active size (at most 256) once the layer is too wide for the target to be 5%
    of it (> 20,000 neurons); small layers spend their few active slots on retrieved neurons instead."""
    return _wide_layer_setting(config.hub_neurons, n_neurons, min(256, target_active(n_neurons) // 4))


def resolve_hard_negatives(config: SlideConfig, n_neurons: int) -> int:
    """How many non-label neurons of an output active set get a gradient per point (0 = all):
    config.hard_negatives, or (auto) a quarter of the target active size (as many as the auto hubs)
    once the layer is too wide for the target to be 5% of it (> 20,000 neurons). With the random
    negatives pushing down what the tables miss, a cut this tight learns almost as much per step as
    half the target while the optimizer steps on far fewer rows (see BENCHMARKS.md)."""
    return _wide_layer_setting(config.hard_negatives, n_neurons, target_active(n_neurons) // 4)


def resolve_random_negatives(config: SlideConfig, n_neurons: int) -> int:
    """How many uniformly drawn, log-Q-corrected output neurons each point adds in training:
    config.random_negatives, or (auto) as many as the auto hubs (a quarter of the target active size,
    at most 256) for layers wider than 20,000 neurons; a small layer's active set is already a sizeable
    share of it, and its softmax close to the full one."""
    return _wide_layer_setting(config.random_negatives, n_neurons, min(256, target_active(n_neurons) // 4))


def resolve_serve_hubs(config: SlideConfig, n_neurons: int) -> int:
    """How many hubs a sampled layer adds to every candidate set when serving: config.predict_hubs, or
    (auto) for layers wider than 20,000 neurons the larger of twice the target active size and 1% of
    the layer, else none (0 = serve with the training hubs). Half are picked by score on the mean
    input, half by weight norm: with skewed norms the largest inner products belong to long rows,
    which cosine buckets return only when nearly aligned with the query. Norms keep spreading as
    training goes on, hence a share of the layer rather than a fixed count (see BENCHMARKS.md)."""
    if config.predict_hubs == -1:
        return 0
    if config.predict_hubs:
        return min(n_neurons, config.predict_hubs)
    target = target_active(n_neurons)
    return min(n_neurons, max(2 * target, n_neurons // 100)) if is_wide_layer(n_neurons) else 0


def resolve_l(config: SlideConfig, n_neurons: int) -> int:
    """Tables of a sampled layer of n_neurons: config.hash_l, or (0 = auto) 16 once the layer is too
    wide for its target active size to be 5% of it (> 20,000 neurons: its buckets fill, and 16 full
    buckets already hold the target), else 50 (see SlideConfig.hash_l)."""
    if config.hash_l:
        return config.hash_l
    return WIDE_LAYER_TABLES if is_wide_layer(n_neurons) else SMALL_LAYER_TABLES


def resolve_k(config: SlideConfig, n_neurons: int) -> int:
    """Codes per table: config.hash_k, or (0 = auto) enough that the L buckets of an input hold about
    `target_active(n_neurons)` neurons together, so the active set stays a small fraction of the layer."""
    if config.hash_k:
        return config.hash_k
    radix = 2 if config.hash_family == "simhash" else config.bin_size
    per_bucket = max(1.0, target_active(n_neurons) / resolve_l(config, n_neurons))
    return max(1, int(round(math.log(max(2.0, n_neurons / per_bucket)) / math.log(radix))))


def table_geometry(config: SlideConfig, k: int) -> tuple[int, int, bool, int]:
    """(radix, num_buckets, fold, table_bits) for K codes: exact mixed-radix ids when they fit, else
    folded to table_bits (config.table_bits, or 0 = as many bits as the codes carry, capped at 20)."""
    radix = 2 if config.hash_family == "simhash" else config.bin_size
    space = radix**k
    bits = config.table_bits or min(20, math.ceil(math.log2(space)))
    if space <= 2**bits:
        return radix, int(space), False, bits
    return radix, 2**bits, True, bits


def draw_hash_functions(config: SlideConfig, dim: int, n_neurons: int, rng: np.random.Generator) -> HashFunctions:
    """Draw the hash functions of one sampled layer of `n_neurons` neurons with `dim` inputs each."""
    k, n_tables = resolve_k(config, n_neurons), resolve_l(config, n_neurons)
    family = FAMILY_IDS[config.hash_family]
    n_codes = k * n_tables
    if family == SIMHASH:
        m = max(1, int(round(config.simhash_density * dim)))
        idx = np.empty((n_codes, m), dtype=np.int32)
        for c in range(n_codes):
            idx[c] = np.sort(rng.choice(dim, size=m, replace=False))
        sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(n_codes, m)).astype(np.float32)
    else:
        if config.bin_size > dim:
            raise ValueError(
                f"bin_size={config.bin_size} is larger than the layer input width {dim}; "
                f"use bin_size <= {dim} or the simhash family"
            )
        m = config.bin_size
        per_perm = dim // m
        n_perms = -(-n_codes // per_perm)
        bins = np.concatenate([rng.permutation(dim)[: per_perm * m].reshape(per_perm, m) for _ in range(n_perms)])
        idx = np.ascontiguousarray(bins[:n_codes], dtype=np.int32)
        sign = np.ones((n_codes, m), dtype=np.float32)
    radix, num_buckets, fold, bits = table_geometry(config, k)
    seed = int(rng.integers(0, 2**62))
    params = np.array([family, k, n_tables, radix, num_buckets, int(fold), bits, seed], dtype=np.int64)
    return HashFunctions(idx, sign, params)


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
    k, radix, fold, table_bits, seed = params[1], params[3], params[5], params[6], params[7]
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
    for t in range(params[2]):
        buckets[t] = table_bucket(codes, t, params)


@kernel
def hash_vector(x, idx, sign, params, scratch, buckets):
    """Bucket ids int32 (L,) of one dense vector x; scratch is int32 (L*K,)."""
    family = params[0]
    raw_codes(x, idx, sign, family, scratch)
    if family == DWTA:
        densify(scratch, params[7])
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
    k, n_tables, family = params[1], params[2], params[0]
    n_codes, m = idx.shape
    stride = 1 + probes
    if family != SIMHASH:
        raw_codes(x, idx, sign, family, codes)
        if family == DWTA:
            densify(codes, params[7])
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
    family = params[0]
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
                    densify(scratch, params[7])
                    for c in range(n_codes):
                        codes[c, j] = scratch[c]
            combine_block(codes, params, bn, hashes, bucket_acc, out[:, start : start + bn])


@kernel
def combine_block(codes, params, bn, hashes, acc, out):
    """combine_codes for a block: codes int32 (L*K, >= bn) -> out int32 (L, bn); hashes uint64 and
    acc int32 (>= bn,) are scratch, so that every inner loop runs over contiguous 1-d arrays."""
    k, n_tables, radix, fold, table_bits, seed = params[1], params[2], params[3], params[5], params[6], params[7]
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


def hash_dense(x: np.ndarray, hf: HashFunctions) -> np.ndarray:
    """Bucket ids (L,) of one dense float32 vector: the typed wrapper used by tests and tools."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1 or int(hf.idx.max(initial=0)) >= x.shape[0]:
        raise ValueError(f"expected a 1-d vector of width > {int(hf.idx.max(initial=0))}, got shape {x.shape}")
    out = np.empty(hf.n_tables, dtype=np.int32)
    hash_vector(x, hf.idx, hf.sign, hf.params, np.empty(hf.idx.shape[0], dtype=np.int32), out)
    return out


def probe_dense(x: np.ndarray, hf: HashFunctions, probes: int) -> np.ndarray:
    """Multi-probe bucket ids int32 (L, 1 + probes) of one dense float32 vector (tests and tools)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 1 or int(hf.idx.max(initial=0)) >= x.shape[0]:
        raise ValueError(f"expected a 1-d vector of width > {int(hf.idx.max(initial=0))}, got shape {x.shape}")
    if probes < 0:
        raise ValueError("probes must be >= 0")
    out = np.empty(hf.n_tables * (1 + probes), dtype=np.int32)
    n_codes = hf.idx.shape[0]
    probe_buckets(x, hf.idx, hf.sign, hf.params, probes, np.empty(n_codes), np.empty(n_codes, np.int32), out)
    return out.reshape(hf.n_tables, 1 + probes)


def hash_matrix(
    weights: np.ndarray,
    hf: HashFunctions,
    rows: np.ndarray | None = None,
    center: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Bucket ids int32 (L, n) of the rows of a (n_rows, >= dim) matrix, float32 or bfloat16 bits (uint16)
    (all rows or `rows`), each row's first dim entries minus `center` (default zeros, dim = the hashed
    width). out: an int32 (L, n) array to write them into (a layer's own codes, with no temporary of
    the same size)."""
    weights = np.ascontiguousarray(weights, dtype=np.uint16 if weights.dtype == np.uint16 else np.float32)
    dim = int(hf.idx.max(initial=0)) + 1 if center is None else center.shape[0]
    center = np.zeros(dim, np.float32) if center is None else np.ascontiguousarray(center, dtype=np.float32)
    rows = np.arange(weights.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if out is None:
        out = np.empty((hf.n_tables, rows.shape[0]), dtype=np.int32)
    elif out.shape != (hf.n_tables, rows.shape[0]) or out.dtype != np.int32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous int32 array of shape {(hf.n_tables, rows.shape[0])}")
    if rows.shape[0]:
        hash_rows(weights, rows, center, hf.idx, hf.sign, hf.params, out)
    return out


def collision_probability(p: float, k: int, n_tables: int) -> float:
    """Probability that two vectors whose single-code collision probability is p share >= 1 of L buckets."""
    return 1.0 - (1.0 - p**k) ** n_tables


def simhash_bit_collision(cosine: float) -> float:
    """Probability that one SimHash bit agrees for two vectors at this cosine similarity."""
    return 1.0 - math.acos(max(-1.0, min(1.0, cosine))) / math.pi


def tables_for_recall(p: float, k: int, recall: float) -> int:
    """Smallest L with collision_probability(p, k, L) >= recall (p, recall in (0, 1))."""
    if not (0 < p < 1 and 0 < recall < 1):
        raise ValueError("p and recall must be in (0, 1)")
    return max(1, math.ceil(math.log(1 - recall) / math.log(1 - p**k)))
