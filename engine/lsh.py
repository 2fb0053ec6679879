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

from .config import SMALL_LAYER_TABLES, WIDE_LAYER_TABLES, SlideConfig
from .kernels import hashing
from .kernels.hashing import (
    DWTA,
    SIMHASH,
    WTA,
    hash_rows,
    hash_vector,
    probe_buckets,
)

FAMILY_IDS = {"simhash": SIMHASH, "wta": WTA, "dwta": DWTA}


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
        return int(self.params[hashing.FAMILY])

    @property
    def k(self) -> int:
        return int(self.params[hashing.K])

    @property
    def n_tables(self) -> int:
        return int(self.params[hashing.TABLES])

    @property
    def num_buckets(self) -> int:
        return int(self.params[hashing.NUM_BUCKETS])

    @property
    def seed(self) -> int:
        """The seed of the fold, of DWTA's densification and of the tables' tie-breaks."""
        return int(self.params[hashing.SEED])


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
    Serving with predict_max_active None (auto) uses the training cap when the layer has serving hubs
    to cover what the cap leaves out, and no cap otherwise."""
    if predict and config.predict.max_active is not None:
        return 0 if config.predict.max_active == "none" else int(config.predict.max_active)
    if predict and resolve_serve_hubs(config, n_neurons) == 0:
        return 0
    cap = config.sampling.max_active
    if cap == "none":
        return 0
    return target_active(n_neurons) if cap is None else int(cap)


def _wide_layer_setting(value: int | str | None, n_neurons: int, auto: int) -> int:
    """A count setting of a sampled layer as the kernels take it (0 = none, or for hard_negatives all): its
    word ("none", "all") = 0, a number = that many (at most the layer), None = `auto` once the layer is too
    wide for its target active size to be 5% of it (> 20,000 neurons), else 0."""
    if isinstance(value, str):
        return 0
    if value is not None:
        return min(n_neurons, int(value))
    return auto if is_wide_layer(n_neurons) else 0


def resolve_hubs(config: SlideConfig, n_neurons: int) -> int:
    """How many hub neurons a sampled layer adds to every active set: config.sampling.hub_neurons, or (auto) a
    quarter of the target active size (at most 256) once the layer is too wide for the target to be 5%
    of it (> 20,000 neurons); small layers spend their few active slots on retrieved neurons instead."""
    return _wide_layer_setting(config.sampling.hub_neurons, n_neurons, min(256, target_active(n_neurons) // 4))


def resolve_hard_negatives(config: SlideConfig, n_neurons: int) -> int:
    """How many non-label neurons of an output active set get a gradient per point (0 = all, "all"):
    config.sampling.hard_negatives, or (auto) a quarter of the target active size (as many as the auto hubs)
    once the layer is too wide for the target to be 5% of it (> 20,000 neurons). With the random
    negatives pushing down what the tables miss, a cut this tight learns almost as much per step as
    half the target while the optimizer steps on far fewer rows (see BENCHMARKS.md)."""
    return _wide_layer_setting(config.sampling.hard_negatives, n_neurons, target_active(n_neurons) // 4)


def resolve_random_negatives(config: SlideConfig, n_neurons: int) -> int:
    """How many uniformly drawn, log-Q-corrected output neurons each point adds in training:
    config.sampling.random_negatives, or (auto) as many as the auto hubs (a quarter of the target active size,
    at most 256) for layers wider than 20,000 neurons; a small layer's active set is already a sizeable
    share of it, and its softmax close to the full one."""
    return _wide_layer_setting(config.sampling.random_negatives, n_neurons, min(256, target_active(n_neurons) // 4))


def resolve_serve_hubs(config: SlideConfig, n_neurons: int) -> int:
    """How many hubs a sampled layer adds to every candidate set when serving: config.predict.hubs, or
    (auto) for layers wider than 20,000 neurons the larger of twice the target active size and 1% of
    the layer, else none (0: serve with the training hubs). Half are picked by score on the mean
    input, half by weight norm: with skewed norms the largest inner products belong to long rows,
    which cosine buckets return only when nearly aligned with the query. Norms keep spreading as
    training goes on, hence a share of the layer rather than a fixed count, which `auto` calibration
    doubles with more long rows where the tables' recall falls short (SlideModel.calibrate_serving)."""
    if config.predict.hubs == "none":
        return 0
    if config.predict.hubs is not None:
        return min(n_neurons, int(config.predict.hubs))
    target = target_active(n_neurons)
    return min(n_neurons, max(2 * target, n_neurons // 100)) if is_wide_layer(n_neurons) else 0


def resolve_l(config: SlideConfig, n_neurons: int) -> int:
    """Tables of a sampled layer of n_neurons: config.sampling.hash_l, or (None = auto) 16 once the layer is too
    wide for its target active size to be 5% of it (> 20,000 neurons: its buckets fill, and 16 full
    buckets already hold the target), else 50 (see SamplingConfig.hash_l)."""
    if config.sampling.hash_l is not None:
        return config.sampling.hash_l
    return WIDE_LAYER_TABLES if is_wide_layer(n_neurons) else SMALL_LAYER_TABLES


def resolve_k(config: SlideConfig, n_neurons: int) -> int:
    """Codes per table: config.sampling.hash_k, or (None = auto) enough that the L buckets of an input hold about
    `target_active(n_neurons)` neurons together, so the active set stays a small fraction of the layer."""
    if config.sampling.hash_k is not None:
        return config.sampling.hash_k
    radix = 2 if config.sampling.hash_family == "simhash" else config.sampling.bin_size
    per_bucket = max(1.0, target_active(n_neurons) / resolve_l(config, n_neurons))
    return max(1, int(round(math.log(max(2.0, n_neurons / per_bucket)) / math.log(radix))))


def table_geometry(config: SlideConfig, k: int) -> tuple[int, int, bool, int]:
    """(radix, num_buckets, fold, table_bits) for K codes: exact mixed-radix ids when they fit, else
    folded to table_bits (config.sampling.table_bits, or None = as many bits as the codes carry, capped at 20)."""
    radix = 2 if config.sampling.hash_family == "simhash" else config.sampling.bin_size
    space = radix**k
    bits = (
        config.sampling.table_bits if config.sampling.table_bits is not None else min(20, math.ceil(math.log2(space)))
    )
    if space <= 2**bits:
        return radix, int(space), False, bits
    return radix, 2**bits, True, bits


def draw_hash_functions(config: SlideConfig, dim: int, n_neurons: int, rng: np.random.Generator) -> HashFunctions:
    """Draw the hash functions of one sampled layer of `n_neurons` neurons with `dim` inputs each."""
    k, n_tables = resolve_k(config, n_neurons), resolve_l(config, n_neurons)
    family = FAMILY_IDS[config.sampling.hash_family]
    n_codes = k * n_tables
    if family == SIMHASH:
        m = max(1, int(round(config.sampling.simhash_density * dim)))
        idx = np.empty((n_codes, m), dtype=np.int32)
        for c in range(n_codes):
            idx[c] = np.sort(rng.choice(dim, size=m, replace=False))
        sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(n_codes, m)).astype(np.float32)
    else:
        if config.sampling.bin_size > dim:
            raise ValueError(
                f"bin_size={config.sampling.bin_size} is larger than the layer input width {dim}; "
                f"use bin_size <= {dim} or the simhash family"
            )
        m = config.sampling.bin_size
        per_perm = dim // m
        n_perms = -(-n_codes // per_perm)
        bins = np.concatenate([rng.permutation(dim)[: per_perm * m].reshape(per_perm, m) for _ in range(n_perms)])
        idx = np.ascontiguousarray(bins[:n_codes], dtype=np.int32)
        sign = np.ones((n_codes, m), dtype=np.float32)
    radix, num_buckets, fold, bits = table_geometry(config, k)
    seed = int(rng.integers(0, 2**62))
    params = np.array([family, k, n_tables, radix, num_buckets, int(fold), bits, seed], dtype=np.int64)
    return HashFunctions(idx, sign, params)


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
