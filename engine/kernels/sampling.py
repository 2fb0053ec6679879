"""Active-set selection: which neurons of a sampled layer one input computes.

The union of the input's L buckets, each neuron counted by how many buckets returned it; optionally
only neurons seen >= `threshold` times, or the `max_active` most frequent; during training the true
labels are always added; random neurons pad the set up to `min_active`.

Membership is tracked without clearing arrays per input: mark[j] == gen means "seen for this input",
and cnt[j] holds its count (0 = seen but dropped, -1 = a true label).
"""

from __future__ import annotations

import numpy as np

from .._numba import kernel
from ..lsh import mix3


@kernel
def next_generation(mark, gens, chunk):
    """A fresh marker value for chunk's scratch row, clearing the row when the counter wraps."""
    g = gens[chunk] + 1
    if g >= 2_000_000_000:
        mark[chunk, :] = 0
        g = 1
    gens[chunk] = g
    return np.int32(g)


@kernel
def collect_candidates(buckets, stride, offsets, ids, mark, cnt, gen, out):
    """Union of the buckets (`stride` consecutive ones per table) into out; returns how many; counts in cnt."""
    n = 0
    for q in range(buckets.shape[0]):
        t = q // stride
        b = buckets[q]
        for p in range(offsets[t, b], offsets[t, b + 1]):
            j = ids[t, p]
            if mark[j] != gen:
                mark[j] = gen
                cnt[j] = 1
                out[n] = j
                n += 1
            else:
                cnt[j] += 1
    return n


@kernel
def tie_seed(seed, buckets):
    """A random seed for one input, a function of its buckets: equal inputs break ties equally."""
    h = np.uint64(seed)
    for t in range(buckets.shape[0]):
        h = mix3(h, t, buckets[t])
    return h


@kernel
def filter_candidates(out, n, cnt, threshold, max_active, max_count, ties):
    """Keep candidates with count >= threshold, then the max_active most frequent; returns the new n.

    Among candidates tied at the cut-off count, a uniform random subset of the right size is kept
    (selection sampling keyed by `ties` and the neuron id), so no table or id range is favoured.
    Dropped ids get cnt 0; survivors keep the order found.
    """
    if threshold > 1:
        kept = 0
        for a in range(n):
            j = out[a]
            if cnt[j] >= threshold:
                out[kept] = j
                kept += 1
            else:
                cnt[j] = 0
        n = kept
    if max_active > 0 and n > max_active:
        hist = np.zeros(max_count + 2, dtype=np.int64)
        for a in range(n):
            hist[cnt[out[a]]] += 1
        cutoff = max_count
        above = 0
        while cutoff > 0 and above + hist[cutoff] < max_active:
            above += hist[cutoff]
            cutoff -= 1
        ties_left = max_active - above
        ties_seen = hist[cutoff]
        kept = 0
        for a in range(n):
            j = out[a]
            c = cnt[j]
            keep = c > cutoff
            if c == cutoff:
                u = np.float64(mix3(ties, j, 0) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                keep = u * ties_seen < ties_left
                ties_seen -= 1
                if keep:
                    ties_left -= 1
            if keep:
                out[kept] = j
                kept += 1
            else:
                cnt[j] = 0
        n = kept
    return n


@kernel
def add_ids(out, n, ids, mark, cnt, gen, flag):
    """Make the given neurons active; returns the new n. flag -1 marks them as true labels (even when
    already active), flag 1 leaves an already-active neuron as it was."""
    for q in range(ids.shape[0]):
        j = ids[q]
        if mark[j] != gen or cnt[j] == 0:
            mark[j] = gen
            cnt[j] = flag
            out[n] = j
            n += 1
        elif flag == -1:
            cnt[j] = -1
    return n


@kernel
def pad_random(out, n, min_active, n_neurons, mark, cnt, gen, seed, stream):
    """Add distinct random neurons until n >= min_active (bounded attempts); returns the new n."""
    target = min(min_active, n_neurons, out.shape[0])
    attempt = 0
    limit = 8 * target + 64
    while n < target and attempt < limit:
        j = np.int64(mix3(seed, stream, attempt) % np.uint64(n_neurons))
        attempt += 1
        if mark[j] != gen or cnt[j] == 0:
            mark[j] = gen
            cnt[j] = 1
            out[n] = j
            n += 1
    return n
