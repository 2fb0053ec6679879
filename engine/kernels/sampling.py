"""Active-set selection: which neurons of a sampled layer one input computes.

The union of the input's L buckets, each neuron counted by how many buckets returned it; optionally
only neurons seen >= `threshold` times, or the `max_active` most frequent; during training the true
labels are always added; random neurons pad the set up to `min_active`.

Membership is tracked without clearing arrays per input, with one random access per visit: tags is
int64 (layer width,) per thread, tags[j] = generation << 32 | value. Each input takes two
generations: under the first (candidates) the value is the neuron's position in the candidate list,
whose counts live in a small dense array beside it; under the second (active) the value is 1 for a
true label, 0 otherwise. Dropped candidates keep the first generation, so they are simply not active.
"""

from __future__ import annotations

import numpy as np

from .._numba import kernel
from .hashing import mix3
from .lowlevel import prefetch_item

_LOW = np.int64(0xFFFFFFFF)
_SHIFT = np.int64(32)
IS_LABEL = 1
_TAGS_AHEAD = 8
"""Bucket members ahead whose tag collect_candidates asks the cache for (tags are read at random)."""


@kernel
def next_generation(tags, gens, chunk):
    """The candidate generation for chunk's next input (the active one is this + 1), clearing the
    row when the counter nears the limit of 31 bits."""
    g = gens[chunk] + 2
    if g >= 2_000_000_000:
        tags[chunk, :] = 0
        g = 2
    gens[chunk] = g
    return np.int64(g)


@kernel
def collect_candidates(buckets, stride, offsets, ids, tags, gen, out, counts):
    """Union of the buckets (`stride` consecutive ones per table) into out, in the order found, with
    counts[a] = how many buckets returned out[a]; returns how many."""
    n = 0
    stamp = gen << _SHIFT
    for q in range(buckets.shape[0]):
        t = q // stride
        b = buckets[q]
        end = offsets[t, b + 1]
        for p in range(offsets[t, b], end):
            if p + _TAGS_AHEAD < end:
                prefetch_item(tags, ids[t, p + _TAGS_AHEAD])
            j = ids[t, p]
            tag = tags[j]
            if (tag >> _SHIFT) != gen:
                tags[j] = stamp | n
                out[n] = j
                counts[n] = 1
                n += 1
            else:
                counts[tag & _LOW] += 1
    return n


@kernel
def tie_seed(seed, buckets):
    """A random seed for one input, a function of its buckets: equal inputs break ties equally."""
    h = np.uint64(seed)
    for t in range(buckets.shape[0]):
        h = mix3(h, t, buckets[t])
    return h


@kernel
def filter_candidates(out, n, counts, threshold, max_active, max_count, ties):
    """Keep candidates with count >= threshold, then the max_active most frequent; returns the new n.

    Among candidates tied at the cut-off count, exactly the right number is kept by systematic sampling
    from a random start keyed by `ties`: every tie has the same chance, so no table or id range is
    favoured, and the kept ties spread evenly over the tables. When buckets are full nearly all
    candidates tie at count 1, so the loop is branch-free, with no random number per tie.
    counts must be >= 1.
    Survivors keep the order found (out and counts are compacted together).
    """
    if threshold > 1:
        kept = 0
        for a in range(n):
            if counts[a] >= threshold:
                out[kept] = out[a]
                counts[kept] = counts[a]
                kept += 1
        n = kept
    if max_active > 0 and n > max_active:
        hist = np.zeros(max_count + 2, dtype=np.int64)
        for a in range(n):
            if counts[a] > 1:
                hist[counts[a]] += 1
        hist[1] = n - hist[2:].sum()
        cutoff = max_count
        above = 0
        while cutoff > 0 and above + hist[cutoff] < max_active:
            above += hist[cutoff]
            cutoff -= 1
        ties_left = np.int64(max_active - above)
        ties_seen = np.int64(hist[cutoff])
        acc = np.int64(ties % np.uint64(ties_seen))
        kept = 0
        for a in range(n):
            c = counts[a]
            acc += ties_left if c == cutoff else 0
            hit = acc >= ties_seen
            acc -= ties_seen if hit else 0
            out[kept] = out[a]
            counts[kept] = c
            kept += (c > cutoff) | hit
        n = kept
    return n


@kernel
def kth_largest(keys, n, k):
    """The k-th largest (1 <= k <= n) of keys[:n], found by quickselect; reorders keys[:n].

    In place and allocation-free: the hard-negative cut runs it once per point on scratch it already
    has (np.partition copied the probabilities and allocated twice per point).
    """
    target = k - 1
    lo = 0
    hi = n - 1
    while lo < hi:
        a, b, c = keys[lo], keys[(lo + hi) >> 1], keys[hi]
        pivot = max(min(a, b), min(max(a, b), c))
        i, j = lo, hi
        while i <= j:
            while keys[i] > pivot:
                i += 1
            while keys[j] < pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return keys[target]
    return keys[target]


@kernel
def mark_active(out, n, tags, gen):
    """Stamp out[:n] with the active generation gen + 1 (not labels)."""
    stamp = (gen + 1) << _SHIFT
    for a in range(n):
        tags[out[a]] = stamp


@kernel
def add_ids(out, n, ids, tags, gen, flag):
    """Make the given neurons active; returns the new n. flag -1 marks them as true labels (even when
    already active), flag 1 leaves an already-active neuron as it was."""
    active = gen + 1
    stamp = active << _SHIFT
    for q in range(ids.shape[0]):
        j = ids[q]
        if (tags[j] >> _SHIFT) != active:
            tags[j] = stamp | (IS_LABEL if flag == -1 else 0)
            out[n] = j
            n += 1
        elif flag == -1:
            tags[j] = stamp | IS_LABEL
    return n


@kernel
def is_label(tags, j):
    """Whether active neuron j was added as a true label (valid for the current input's active set)."""
    return (tags[j] & _LOW) == IS_LABEL


@kernel
def pad_random(out, n, min_active, n_neurons, tags, gen, seed, stream):
    """Add distinct random neurons until n >= min_active (bounded attempts); returns the new n."""
    target = min(min_active, n_neurons, out.shape[0])
    active = gen + 1
    attempt = 0
    limit = 8 * target + 64
    while n < target and attempt < limit:
        j = np.int64(mix3(seed, stream, attempt) % np.uint64(n_neurons))
        attempt += 1
        if (tags[j] >> _SHIFT) != active:
            tags[j] = active << _SHIFT
            out[n] = j
            n += 1
    return n
