"""Bucket storage of one sampled layer: L tables, each a CSR of neuron ids grouped by bucket.

A table keeps, per bucket, at most `bucket_size` ids. Which ones a full bucket keeps follows its
insertion policy: FIFO keeps the most recently inserted ids (a neuron is re-inserted when it is
rehashed; among ids of one rehash round it keeps a random sample, so no id range is favoured),
reservoir keeps a uniform random sample. Storing buckets as CSR arrays costs
L * (n + num_buckets) ints instead of L * num_buckets * bucket_size, and a rebuild from the stored
codes is one counting sort per table.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import prange

from ._numba import kernel, parallel_kernel
from .kernels.hashing import mix3

FIFO, RESERVOIR = 0, 1
POLICY_IDS = {"fifo": FIFO, "reservoir": RESERVOIR}


class Tables(NamedTuple):
    """codes int32 (L, n): bucket of each neuron per table; inserted int32 (n,): rehash round of
    each neuron's last insertion; offsets int64 (L, num_buckets+1) and ids int32 (L, n): the buckets;
    center float32 (dim,): the vector subtracted from every key before hashing (see lsh.hash_rows);
    query_center float64 (dim,): the layer's running mean input; hubs int32: neurons added to every
    active set in training; serve_hubs int32: the (larger) set added to every candidate set when
    serving, empty = the training hubs (see SlideModel.update_hubs)."""

    codes: np.ndarray
    inserted: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    center: np.ndarray
    query_center: np.ndarray
    hubs: np.ndarray
    serve_hubs: np.ndarray


def empty_tables(n_tables: int, n: int, num_buckets: int, dim: int, n_hubs: int = 0, n_serve_hubs: int = 0) -> Tables:
    return Tables(
        np.zeros((n_tables, n), dtype=np.int32),
        np.zeros(n, dtype=np.int32),
        np.zeros((n_tables, num_buckets + 1), dtype=np.int64),
        np.zeros((n_tables, n), dtype=np.int32),
        np.zeros(dim, dtype=np.float32),
        np.zeros(dim, dtype=np.float32),
        np.arange(min(n_hubs, n), dtype=np.int32),
        np.arange(min(n_serve_hubs, n), dtype=np.int32),
    )


@kernel
def _fifo_order(members, inserted, table, seed, round_id):
    """Keys whose ascending order ranks a full FIFO bucket's members of mixed insertion rounds, best
    to keep first: newest round first, a random rank within a round (one round: see _sample_members)."""
    n = members.shape[0]
    keys = np.empty(n, dtype=np.int64)
    for i in range(n):
        j = members[i]
        tie = np.int64(mix3(seed, j, table * 1_000_003 + round_id) >> np.uint64(33))
        keys[i] = -(np.int64(inserted[j]) << np.int64(31)) - tie
    return keys


@kernel
def _best_members(members, keys, capacity):
    """The `capacity` members with the lowest keys (earlier members first among equal keys), sorted by
    id: what a stable argsort would keep, in linear time (crowded buckets hold thousands of members)."""
    kth = np.partition(keys, capacity - 1)[capacity - 1]
    chosen = np.empty(capacity, dtype=members.dtype)
    c = 0
    for p in range(members.shape[0]):
        if keys[p] < kth:
            chosen[c] = members[p]
            c += 1
    for p in range(members.shape[0]):
        if c == capacity:
            break
        if keys[p] == kth:
            chosen[c] = members[p]
            c += 1
    chosen.sort()
    return chosen


@kernel
def _sample_members(members, capacity, key, out):
    """A uniform sample of capacity of the members into out, in ascending order: positions
    (start + i * stride) mod len(members), i < capacity, for start uniform in [0, len) and a stride
    coprime with len, both from the uint64 key. Each member is kept with probability exactly
    capacity / len; the stride varies the sets. No key per member: at amazon670k scale a third of a
    table's rows sit in full buckets, where a hash and a partition per member took a quarter of a
    rehash."""
    size = np.int64(members.shape[0])
    start = np.int64(key % np.uint64(size))
    stride = np.int64((key >> np.uint64(32)) % np.uint64(size - 1)) + 1 if size > 1 else np.int64(1)
    while math.gcd(stride, size) != 1:
        stride += 1
    pos = start
    for i in range(capacity):
        out[i] = members[pos]
        pos += stride
        if pos >= size:
            pos -= size
    out[:capacity].sort()


@parallel_kernel
def build_tables(codes, inserted, num_buckets, capacity, policy, seed, round_id, offsets, ids):
    """Fill offsets (L, B+1) and ids (L, n) from codes (L, n), keeping <= capacity ids per bucket."""
    n_tables, n = codes.shape
    # one insertion round for all (a full rehash): FIFO's order is the random tie order, as reservoir's
    uniform = policy == RESERVOIR or n == 0 or inserted.min() == inserted.max()
    for t in prange(n_tables):
        counts = np.zeros(num_buckets + 1, dtype=np.int64)
        for j in range(n):
            counts[codes[t, j] + 1] += 1
        starts = np.cumsum(counts)
        order = np.empty(n, dtype=np.int32)
        fill = starts[:-1].copy()
        for j in range(n):
            b = codes[t, j]
            order[fill[b]] = j
            fill[b] += 1
        out = 0
        offsets[t, 0] = 0
        for b in range(num_buckets):
            s, e = starts[b], starts[b + 1]
            if e - s <= capacity:
                for p in range(s, e):
                    ids[t, out] = order[p]
                    out += 1
            elif uniform:
                key = mix3(seed, t * 1_000_003 + round_id, b)
                _sample_members(order[s:e], capacity, key, ids[t, out : out + capacity])
                out += capacity
            else:
                members = order[s:e]
                chosen = _best_members(members, _fifo_order(members, inserted, t, seed, round_id), capacity)
                for p in range(capacity):
                    ids[t, out] = chosen[p]
                    out += 1
            offsets[t, b + 1] = out


def rebuild(tables: Tables, num_buckets: int, capacity: int, policy: str, seed: int, round_id: int) -> None:
    """Recompute the bucket CSR of every table from `tables.codes` in place."""
    build_tables(
        tables.codes,
        tables.inserted,
        num_buckets,
        capacity,
        POLICY_IDS[policy],
        seed,
        round_id,
        tables.offsets,
        tables.ids,
    )


def query(tables: Tables, buckets: np.ndarray) -> np.ndarray:
    """Neuron ids found in the given bucket of each table, with repeats, as int32 (for tests/tools)."""
    parts = [tables.ids[t, tables.offsets[t, b] : tables.offsets[t, b + 1]] for t, b in enumerate(buckets)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)
