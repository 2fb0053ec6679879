"""Labels that come and go after training, and models that grow into larger label and feature spaces.

- **Adding a label** appends an output row imprinted from a few example points (`imprint_rows`): a convex
  mix of the rows and biases of the existing labels the examples score highest, less a little weight on the
  hidden units none of the examples activates. Hidden activations are never negative, so it scores at most
  that mix of those labels' scores: it ranks near the top where they do (and lower on inputs that use units
  its examples do not), never above the best of them (scored exactly), so it cannot take the first place from
  the labels trained on all the data. The row is hashed with the layer's functions and
  inserted into every table (a full bucket drops its oldest member), and served to every query until the
  layer is next rehashed, so `lsh` and `exact` see it at once. Adam's state of the row starts at zero.
- **Retiring a label** zeroes its row and sets its bias to -inf: its score is -inf in every mode, and
  the top-k kernels never keep a -inf score, so it is never predicted. It leaves the buckets (and
  stays out of them at every rehash), and a trainer drops it from the training points. The status is
  the row itself, so it survives snapshots, restarts and resumes with no extra state.
- **Growing** (warm starts): new labels get imprinted rows as above, new input features random rows.

Optimizer arrays shorter than their layer (a snapshot written after labels were added, which keeps the
optimizer's files as they were) are read as padded with zero rows: a new row's Adam state is zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numba import prange

from . import lsh
from ._numba import kernel, parallel_kernel
from .kernels.optimizer import from_bfloat16, to_bfloat16
from .sparse import Dataset
from .tables import Tables

if TYPE_CHECKING:
    from .network import SlideModel
    from .snapshot import SnapshotStore
    from .text import LabelNames

RETIRED_BIAS = -np.inf
"""The bias of a retired label's output row: its score is -inf, which no top-k keeps."""
MAX_EXAMPLES = 1000
"""Most example points one new label is imprinted from."""


class LabelError(ValueError):
    """A label operation was refused; `field` names what is wrong (`names`, `examples`, `ids`)."""

    def __init__(self, field_name: str, message: str, conflict: bool = False):
        self.field = field_name
        self.conflict = conflict
        """True when the request conflicts with the model's labels (a name already in use, an id retired)."""
        super().__init__(message)


# ---- reading the state ------------------------------------------------------------------------------
def output_biases(model: SlideModel) -> np.ndarray:
    """float32 (num_labels,): the output layer's biases."""
    col = model.weights[-1][:, -1]
    return from_bfloat16(np.ascontiguousarray(col)) if col.dtype == np.uint16 else np.asarray(col, np.float32)


def retired_mask(model: SlideModel) -> np.ndarray:
    """bool (num_labels,): which labels are retired (their bias is -inf)."""
    return np.isneginf(output_biases(model))


def label_names_list(model: SlideModel) -> list[str]:
    """Every label's name: its own, or its id as text for a model whose labels have no names."""
    if model.label_names is not None and len(model.label_names) == model.num_labels:
        return model.label_names.to_list()
    return [str(i) for i in range(model.num_labels)]


# ---- imprinting ---------------------------------------------------------------------------------------
IMPRINT_MIX = 3
"""Existing labels a new label's row is mixed from: those its examples score highest (see imprint_rows)."""
IMPRINT_CANDIDATES = 10
"""Best labels of each example that imprint_rows weighs."""
IMPRINT_TEMPERATURE = 4.0
"""Temperature of each example's softmax over its best scores (imprint_rows): above 1 it spreads the weight over
them, so that a broad label every example scores first does not make the new row a copy of it."""
IMPRINT_UNUSED = 0.1
"""What imprint_rows takes off a new row's weights on the hidden units none of its examples activates, as a share
of the row's mean absolute weight."""


def mix_weights(ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labels a new row is mixed from and their weights (summing to 1), from its examples' best labels `ids`
    and their `scores` (one row per example, -1 / non-finite where an example has fewer): each example's softmax at
    IMPRINT_TEMPERATURE over its scored labels, summed over the examples; the IMPRINT_MIX heaviest labels
    (the lowest id first among equal weights), renormalised. Empty when no example has a scored label."""
    weight: dict[int, float] = {}
    for row_ids, row_scores in zip(ids, np.asarray(scores, np.float64), strict=True):
        ok = (row_ids >= 0) & np.isfinite(row_scores)
        if not ok.any():
            continue
        s = row_scores[ok]
        p = np.exp((s - s.max()) / IMPRINT_TEMPERATURE)
        for j, pj in zip(row_ids[ok].tolist(), (p / p.sum()).tolist(), strict=True):
            weight[j] = weight.get(j, 0.0) + pj
    mix = sorted(weight, key=lambda j: (-weight[j], j))[:IMPRINT_MIX]
    q = np.array([weight[j] for j in mix])
    return np.asarray(mix, np.int64), q / q.sum() if mix else q


def round_down_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 x rounded toward -inf to values bfloat16 holds exactly (storing them then changes nothing)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    cut = bits & np.uint32(0xFFFF0000)  # toward zero
    below = (x < 0) & (cut != bits)  # a negative value cut toward zero moves one step further down instead
    return np.where(below, cut + np.uint32(0x10000), cut).view(np.float32)


def imprint_rows(model: SlideModel, examples: Sequence[Any]) -> np.ndarray:
    """float32 (m, width + 1): one output row per new label from its example points (see the module doc).

    The row and bias start as a convex mix of the rows and biases of the existing labels its examples score
    highest (`mix_weights`). The row then loses IMPRINT_UNUSED times its mean absolute weight on every hidden unit
    that none of its examples activates: an input that activates those units scores it lower, its examples score
    it the same. A bfloat16 layer gets the row rounded down. The hidden activations are never negative, so on any
    input the new label scores at most that mix of their scores, never more than the best of them: it ranks among
    them where they rank high and the examples' units are the active ones. A label whose examples find no scored
    label gets a zero row and the median bias."""
    width = model.weights[-1].shape[1]
    if not examples:
        return np.zeros((0, width), np.float32)
    biases = output_biases(model)
    live = ~np.isneginf(biases)
    rows = np.zeros((len(examples), width), np.float32)
    mixed_rows = np.zeros(len(examples), np.bool_)
    csr = [as_csr(ex) for ex in examples]
    sizes = [len(c[0]) - 1 for c in csr]
    k = min(IMPRINT_CANDIDATES, int(live.sum()))
    if sum(sizes) and k:
        top, scores = example_top_labels(model, csr, k)
        hidden = model.last_hidden(*stacked_points(csr))
        w = model.weights[-1]
        at = 0
        for r, size in enumerate(sizes):
            ids, s, h = top[at : at + size], scores[at : at + size], hidden[at : at + size]
            at += size
            mix, q = mix_weights(ids, s)
            if not mix.size:
                continue  # no examples, or none that the model scores: a zero row, left to training
            mixed = w[mix]
            mixed = from_bfloat16(mixed) if mixed.dtype == np.uint16 else mixed.astype(np.float32)
            row = (q @ mixed).astype(np.float32)
            unused = ~(h > 0).any(axis=0)
            row[:-1][unused] -= IMPRINT_UNUSED * float(np.abs(row[:-1]).mean())
            rows[r] = round_down_bfloat16(row) if w.dtype == np.uint16 else row
            mixed_rows[r] = True
    if not mixed_rows.all():  # the median bias (a pass over every label) only when a row needs it
        rows[~mixed_rows, -1] = float(np.median(biases[live])) if live.any() else 0.0
    return rows


def example_top_labels(model: SlideModel, points: Sequence[tuple], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best labels int32 (n, k) and their scores float32 (n, k) of every point of the CSR triples `points`
    (those with points), one after the other, as model.predict answers in `auto` mode, all in one call."""
    return model.predict(*stacked_points(points), k=k, mode="auto")


def stacked_points(points: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One CSR triple of every point of the CSR triples `points`, one after the other."""
    given = [c for c in points if len(c[0]) > 1]
    indptr = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(c[0]) for c in given]))])
    indices = np.concatenate([c[1][: c[0][-1]] for c in given])
    values = np.concatenate([c[2][: c[0][-1]] for c in given])
    return indptr, indices, values


def as_csr(points: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, indices, values) of a CSR triple or anything with those attributes (scipy.sparse.csr_matrix,
    engine.Dataset's x arrays are given as a triple)."""
    if hasattr(points, "indptr"):
        return np.asarray(points.indptr), np.asarray(points.indices), np.asarray(points.data)
    indptr, indices, values = points
    return np.asarray(indptr), np.asarray(indices), np.asarray(values)


# ---- the tables -----------------------------------------------------------------------------------------
@parallel_kernel
def _insert_rows(offsets, ids, inserted, new_codes, first, capacity, out_offsets, out_ids):
    """out_offsets/out_ids: the buckets of offsets/ids with neurons first..first+m-1 added, neuron first+a to
    bucket new_codes[t, a] of table t; a bucket past capacity keeps its newest members (highest `inserted`,
    the new ones first). The buckets between two that take new rows are copied as one span. One table per thread."""
    n_tables = offsets.shape[0]
    num_buckets = offsets.shape[1] - 1
    m = new_codes.shape[1]
    for t in prange(n_tables):
        order = np.argsort(new_codes[t], kind="mergesort")
        out = 0
        span = 0  # the first bucket not yet written
        p = 0
        while True:
            b = new_codes[t, order[p]] if p < m else num_buckets
            s, e = offsets[t, span], offsets[t, b]
            out_ids[t, out : out + e - s] = ids[t, s:e]
            for x in range(span, b + 1):
                out_offsets[t, x] = offsets[t, x] - s + out
            out += e - s
            if p == m:
                break
            s, e = offsets[t, b], offsets[t, b + 1]
            q = p
            while q < m and new_codes[t, order[q]] == b:
                q += 1
            n_new = min(q - p, capacity)
            keep = min(e - s, capacity - n_new)
            if keep == e - s:
                out_ids[t, out : out + keep] = ids[t, s:e]
                out += keep
            elif keep > 0:
                members = ids[t, s:e]
                rank = np.argsort(-inserted[members], kind="mergesort")[:keep]
                out_ids[t, out : out + keep] = np.sort(members[rank])
                out += keep
            for x in range(q - n_new, q):
                out_ids[t, out] = first + order[x]
                out += 1
            out_offsets[t, b + 1] = out
            p = q
            span = b + 1


@kernel
def _drop_ids(offsets, ids, drop):
    """Remove the neurons with drop[j] true from every bucket, in place (buckets shrink, ids' tails go unused)."""
    n_tables = offsets.shape[0]
    num_buckets = offsets.shape[1] - 1
    for t in range(n_tables):
        out = 0
        start = offsets[t, 0]
        for b in range(num_buckets):
            end = offsets[t, b + 1]
            for x in range(start, end):
                j = ids[t, x]
                if not drop[j]:
                    ids[t, out] = j
                    out += 1
            start = end
            offsets[t, b + 1] = out


def insert_rows(tb: Tables, new_codes: np.ndarray, first: int, capacity: int) -> Tables:
    """New Tables with neurons first.. (codes new_codes int32 (L, m)) inserted into their buckets."""
    n_tables, m = new_codes.shape
    n = tb.codes.shape[1] + m
    offsets = np.empty_like(tb.offsets)
    ids = np.empty((n_tables, n), np.int32)
    inserted = np.concatenate([tb.inserted, np.full(m, tb.inserted.max(initial=0), np.int32)])
    _insert_rows(tb.offsets, tb.ids, inserted, np.ascontiguousarray(new_codes, np.int32), first, capacity, offsets, ids)
    for t in range(n_tables):
        ids[t, offsets[t, -1] :] = 0  # past the last bucket: unused, but written to snapshots (same bytes every run)
    codes = np.concatenate([tb.codes, new_codes], axis=1)
    return tb._replace(codes=codes, inserted=inserted, offsets=offsets, ids=ids)


def drop_from_tables(tb: Tables, drop: np.ndarray) -> Tables:
    """Tables without the neurons drop (bool (n,)) in any bucket; copies read-only arrays first."""
    if not drop.any():
        return tb
    offsets = tb.offsets if tb.offsets.flags.writeable else np.array(tb.offsets)
    ids = tb.ids if tb.ids.flags.writeable else np.array(tb.ids)
    _drop_ids(offsets, ids, np.ascontiguousarray(drop, dtype=np.bool_))
    keep = lambda hubs: hubs[~drop[hubs]] if hubs.size else hubs  # noqa: E731
    return tb._replace(offsets=offsets, ids=ids, hubs=keep(tb.hubs), serve_hubs=keep(tb.serve_hubs))


# ---- changing a model -------------------------------------------------------------------------------------
def _storage(rows: np.ndarray, dtype: type) -> np.ndarray:
    return to_bfloat16(np.ascontiguousarray(rows, np.float32)) if dtype == np.uint16 else rows.astype(np.float32)


def _match_access(model: SlideModel) -> None:
    """Make every weight and table array read-only when the input layer is (a model mapped from a snapshot):
    the kernels take them as tuples, which Numba types only when their arrays agree on writability."""
    if model.weights[0].flags.writeable:
        return
    for w in model.weights:
        w.flags.writeable = False
    for tb in model.tables:
        for a in tb:
            a.flags.writeable = False


def pin_structure(model: SlideModel) -> None:
    """Make the config state the sampled layers as they are, so a model that grows past the auto rule's
    width (sample_output None) keeps its structure, in memory and when read back from a snapshot."""
    model.config = model.config.replace(model=model.config.model.replace(sample_output=bool(model.layer_slot[-1] >= 0)))


def append_output_rows(model: SlideModel, rows: np.ndarray) -> np.ndarray:
    """Append float32 rows (m, width + 1) to the output layer, hashed into every table; returns the new ids."""
    pin_structure(model)
    out = model.depth - 1
    w = model.weights[out]
    first = w.shape[0]
    m = rows.shape[0]
    new_w = np.concatenate([w, _storage(rows, w.dtype)])
    weights = list(model.weights)
    weights[out] = new_w
    model.weights = tuple(weights)
    slot = int(model.layer_slot[out])
    if slot >= 0:
        hf, tb = model.hashes[slot], model.tables[slot]
        new_ids = np.arange(first, first + m, dtype=np.int64)
        codes = lsh.hash_matrix(new_w, hf, new_ids, center=tb.center)
        grown = insert_rows(tb, codes, first, model.config.sampling.bucket_size)
        # served to every query until the layer is rehashed: a row imprinted from a few examples hashes like their
        # mean, not like every query that should find it; a layer without serving hubs of its own serves its hubs
        base = grown.serve_hubs if grown.serve_hubs.size else grown.hubs
        grown = grown._replace(serve_hubs=np.concatenate([base, new_ids.astype(np.int32)]))
        model.tables[slot] = grown
    model.num_labels = int(new_w.shape[0])
    model.serve_tables = model.serve_tables.copy()
    _match_access(model)
    return np.arange(first, first + m, dtype=np.int64)


def add_labels(model: SlideModel, examples: Sequence[Any], names: Sequence[str]) -> np.ndarray:
    """Add one label per name, imprinted from its examples (a CSR point set each); returns their ids, which
    follow the model's existing ones. Raises LabelError for a name in use or repeated, or no examples. A model
    without names calls its old labels by their ids ("0", "1", ...)."""
    names = check_additions(model, examples, names)
    named = model.label_names is not None and len(model.label_names) == model.num_labels
    old_names = model.label_names if named and model.label_names is not None else id_names(model.num_labels)
    rows = imprint_rows(model, examples)
    ids = append_output_rows(model, rows)
    model.label_names = append_names(old_names, names)
    return ids


def check_additions(model: SlideModel, examples: Sequence[Any], names: Sequence[str]) -> list[str]:
    """The names of labels to add, as text, once they are known to be new and distinct and each has between 1
    and MAX_EXAMPLES example points; else LabelError."""
    names = [str(n) for n in names]
    if len(names) != len(examples):
        raise LabelError("examples", f"{len(examples)} example sets for {len(names)} names: give one per name")
    if not names:
        raise LabelError("names", "no labels to add")
    named = model.label_names is not None and len(model.label_names) == model.num_labels
    index = find_names(model.label_names, names) if named and model.label_names is not None else {}
    seen: set[str] = set()
    for pos, name in enumerate(names):
        if not name.strip():
            raise LabelError(f"names[{pos}]", "a label name must not be empty")
        if name in seen:
            raise LabelError(f"names[{pos}]", f"label {name[:80]!r} is given twice")
        seen.add(name)
        taken = index.get(name) if named else _id_of_name(name, model.num_labels)
        if taken is not None:
            raise LabelError(f"names[{pos}]", f"label {name[:80]!r} exists already (id {taken})", conflict=True)
    for pos, ex in enumerate(examples):
        indptr = as_csr(ex)[0]
        if len(indptr) < 2:
            raise LabelError(f"examples[{pos}]", f"label {names[pos][:80]!r} has no example points")
        if len(indptr) - 1 > MAX_EXAMPLES:
            raise LabelError(f"examples[{pos}]", f"at most {MAX_EXAMPLES} examples per label")
    return names


def find_names(label_names: LabelNames, wanted: Sequence[str]) -> dict[str, int]:
    """The ids of those of `wanted` that label_names has (the first label of that name), found in its UTF-8 blob in
    one pass without decoding any name (a dict of 670k names takes about a second to build)."""
    encoded = [name.encode("utf-8") for name in wanted]
    if not encoded:
        return {}
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    wanted_offsets = np.concatenate(([0], np.cumsum(lengths)))
    wanted_data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    found = np.full(len(encoded), -1, np.int64)
    _match_names(np.asarray(label_names.data), np.asarray(label_names.offsets), wanted_data, wanted_offsets, found)
    return {name: int(i) for name, i in zip(wanted, found.tolist(), strict=True) if i >= 0}


@kernel
def _name_hash(data, start, end):
    """FNV-1a of data[start:end]."""
    h = np.uint64(0xCBF29CE484222325)
    for q in range(start, end):
        h = (h ^ np.uint64(data[q])) * np.uint64(0x100000001B3)
    return h


@kernel
def _match_names(data, offsets, wanted_data, wanted_offsets, found):
    """found[w] = the first label whose name (bytes data[offsets[i]:offsets[i + 1]]) is wanted name w (bytes
    wanted_data[wanted_offsets[w]:wanted_offsets[w + 1]]); entries no label has keep their value. The wanted names
    sit in a hash table, and only names of a wanted length are hashed."""
    m = wanted_offsets.shape[0] - 1
    lengths = wanted_offsets[1:] - wanted_offsets[:-1]
    longest = lengths.max()
    of_length = np.zeros(longest + 1, np.bool_)
    size = 1
    while size < 2 * m:
        size *= 2
    mask = np.uint64(size - 1)
    slots = np.full(size, -1, np.int64)
    hashes = np.empty(m, np.uint64)
    for w in range(m):
        of_length[lengths[w]] = True
        h = _name_hash(wanted_data, wanted_offsets[w], wanted_offsets[w + 1])
        hashes[w] = h
        s = h & mask
        while slots[s] >= 0:
            s = (s + np.uint64(1)) & mask
        slots[s] = w
    for i in range(offsets.shape[0] - 1):
        start, end = offsets[i], offsets[i + 1]
        if end - start > longest or not of_length[end - start]:
            continue
        h = _name_hash(data, start, end)
        s = h & mask
        while slots[s] >= 0:
            w = slots[s]
            if hashes[w] == h and found[w] < 0 and lengths[w] == end - start:
                same = True
                at = wanted_offsets[w]
                for q in range(end - start):
                    if data[start + q] != wanted_data[at + q]:
                        same = False
                        break
                if same:
                    found[w] = i
            s = (s + np.uint64(1)) & mask


def _id_of_name(name: str, num_labels: int) -> int | None:
    """The label an unnamed model calls `name` (its id in decimal), or None."""
    if name.isascii() and name.isdigit() and str(int(name)) == name and int(name) < num_labels:
        return int(name)
    return None


def id_names(n: int) -> LabelNames:
    """Names "0", "1", ..., str(n - 1): what the labels of a model without names are called once it has some."""
    from .text import LabelNames

    ids = np.arange(n, dtype=np.int64)
    digits = np.ones(n, np.int64)
    power = 10
    while power <= max(n - 1, 0):
        digits += ids >= power
        power *= 10
    data = np.frombuffer("".join(map(str, range(n))).encode(), dtype=np.uint8)
    return LabelNames(data, np.concatenate(([0], np.cumsum(digits))))


def append_names(old: LabelNames, names: Sequence[str]) -> LabelNames:
    """old's names and then `names`, without decoding old's."""
    from .text import LabelNames

    encoded = [n.encode("utf-8") for n in names]
    lengths = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    data = np.concatenate([np.asarray(old.data), np.frombuffer(b"".join(encoded), dtype=np.uint8)])
    offsets = np.concatenate([np.asarray(old.offsets), old.offsets[-1] + np.cumsum(lengths)])
    return LabelNames(data, offsets)


def retire_labels(model: SlideModel, label_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Retire labels: -inf scores, out of every bucket and hub set. Returns the ids that were live before.
    Raises LabelError for an id out of range."""
    ids = np.unique(np.asarray(label_ids, dtype=np.int64).reshape(-1))
    if ids.size and (ids.min() < 0 or ids.max() >= model.num_labels):
        bad = int(ids[(ids < 0) | (ids >= model.num_labels)][0])
        raise LabelError("ids", f"label {bad} does not exist (the model has {model.num_labels})")
    was_live = ids[~retired_mask(model)[ids]]
    out = model.depth - 1
    w = model.weights[out]
    if not w.flags.writeable:
        w = np.array(w)
    zero_row = np.zeros(w.shape[1], np.float32)
    zero_row[-1] = RETIRED_BIAS
    w[ids] = _storage(zero_row[None, :], w.dtype)
    weights = list(model.weights)
    weights[out] = w
    model.weights = tuple(weights)
    drop_retired_from_tables(model)
    _match_access(model)
    return was_live


def drop_retired_from_tables(model: SlideModel) -> None:
    """Take the retired labels out of the output layer's buckets and hubs (after a rehash put them back)."""
    slot = int(model.layer_slot[-1])
    if slot < 0:
        return
    mask = retired_mask(model)
    if mask.any():
        model.tables[slot] = drop_from_tables(model.tables[slot], mask)


def without_labels(data: Dataset, drop: np.ndarray) -> Dataset:
    """data with the labels drop (bool, indexed by label id) taken off its points."""
    y = np.asarray(data.y_indices)
    keep = ~drop[y]
    if keep.all():
        return data
    ends = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))
    return Dataset(
        data.x_indptr,
        data.x_indices,
        data.x_values,
        ends[np.asarray(data.y_indptr)],
        np.ascontiguousarray(y[keep]),
        data.num_features,
        data.num_labels,
    )


def label_status(model: SlideModel) -> list[str]:
    """`live` or `retired` per label."""
    return ["retired" if r else "live" for r in retired_mask(model)]


def grow_features(model: SlideModel, num_features: int, rng: np.random.Generator) -> None:
    """Give the input layer rows for features up to num_features (N(0, init_std), as a fresh model's)."""
    extra = int(num_features) - model.num_features
    if extra < 0:
        raise ValueError(f"a model cannot shrink from {model.num_features} features to {num_features}")
    if extra == 0:
        return
    w0 = model.weights[0]
    block = rng.standard_normal((extra, w0.shape[1]), dtype=np.float32) * np.float32(model.config.model.init_std)
    model.weights = (np.concatenate([w0, _storage(block, w0.dtype)]), *model.weights[1:])
    model.num_features = int(num_features)
    _match_access(model)


def merge_label_names(old: LabelNames | None, old_count: int, new_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Match a dataset's label names to a model's: (int64 map from dataset label id to model label id, the
    model's names after the dataset's unknown names are appended in order)."""
    names = old.to_list() if old is not None and len(old) == old_count else [str(i) for i in range(old_count)]
    index = {n: i for i, n in enumerate(names)}
    mapping = np.empty(len(new_names), np.int64)
    for i, name in enumerate(new_names):
        if name not in index:
            index[name] = len(names)
            names.append(name)
        mapping[i] = index[name]
    return mapping, names


# ---- instances and snapshots ------------------------------------------------------------------------------
def featurize_instances(model: SlideModel, instances: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR arrays of points given as text (str, through the model's featurizer) or (indices, values) pairs.
    Raises LabelError naming the instance for text without a featurizer or a feature id out of range."""
    rows = []
    for pos, inst in enumerate(instances):
        if isinstance(inst, str):
            if model.featurizer is None:
                raise LabelError(f"examples[{pos}]", "text examples need a model trained on text; send indices")
            ids, vals = model.featurizer.transform_one(inst)
        else:
            ids, vals = np.asarray(inst[0], np.int64), np.asarray(inst[1], np.float32)
            if ids.shape != vals.shape:
                raise LabelError(f"examples[{pos}]", "indices and values must have the same length")
            if ids.size and (ids.min() < 0 or ids.max() >= model.num_features):
                raise LabelError(
                    f"examples[{pos}]", f"feature ids must be in [0, {model.num_features}); got {int(ids.max())}"
                )
        rows.append((ids, vals))
    indptr = np.concatenate(([0], np.cumsum([len(r[0]) for r in rows]))).astype(np.int64)
    indices = np.concatenate([r[0] for r in rows]).astype(np.int32) if rows else np.zeros(0, np.int32)
    values = np.concatenate([r[1] for r in rows]).astype(np.float32) if rows else np.zeros(0, np.float32)
    return indptr, indices, values


class SnapshotEdit(NamedTuple):
    """What `edit_snapshot` did: the ids it added (in the order of the names), those it retired that were live,
    and the version it published (None when nothing changed)."""

    added: np.ndarray
    retired: np.ndarray
    version: int | None


_EDIT_LOCK = ".labels.lock"


def edit_lock(store: SnapshotStore) -> AbstractContextManager[None]:
    """The store's label-edit lock (an exclusive flock on its own file): label edits and compactions of one store
    run one at a time, across processes."""
    return store.file_lock(_EDIT_LOCK)


def edit_snapshot(
    store: SnapshotStore,
    add: Sequence[tuple[str, Sequence[Any]]] = (),
    retire: Sequence[int] = (),
    label_names: LabelNames | None = None,
    model: SlideModel | None = None,
) -> SnapshotEdit:
    """Add labels (name, example instances: text or (indices, values)) and/or retire label ids in the newest
    version of a store, published as the next version: a delta version (engine.delta: the new rows, their buckets
    and names, the retired ids) on top of the newest, or a full version once the chain of deltas is
    engine.delta.MAX_DEPTH long, or when a model without names takes `label_names` (its dataset's). A full version
    hard-links the arrays that do not change (the input layer, the hash functions, Adam's state: a new row's is
    zero, see the module doc). The state a stopped run would continue from is the served model from then on.
    model: the newest version's model when the caller holds it (a server), which is read, never changed. Edits
    of one store are serialised by a lock file; the caller makes sure no trainer writes it."""
    import copy

    from . import delta as deltas
    from .snapshot import load_model, read_manifest

    with edit_lock(store):
        latest = store.latest()
        if latest is None:
            raise LabelError("model", "the model has no snapshot yet")
        version, path = latest
        manifest = read_manifest(path)
        if model is None or getattr(model, "version", None) != version:
            model = load_model(path)
        renamed = model.label_names is None and label_names is not None and len(label_names) == model.num_labels
        if renamed:
            model = copy.copy(model)
            model.label_names = label_names
        first = model.num_labels
        w = model.weights[-1]
        rows = np.zeros((0, w.shape[1]), w.dtype)
        names: list[str] = []
        if add:
            examples = [featurize_instances(model, ex) for _, ex in add]
            names = check_additions(model, examples, [n for n, _ in add])
            rows = _storage(imprint_rows(model, examples), w.dtype)
        slot = int(model.layer_slot[-1])
        if slot >= 0:
            codes = lsh.hash_matrix(rows, model.hashes[slot], center=model.tables[slot].center)
        else:
            codes = np.zeros((0, rows.shape[0]), np.int32)
        ids = np.unique(np.asarray(retire, dtype=np.int64).reshape(-1))
        total = first + rows.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= total):
            bad = int(ids[(ids < 0) | (ids >= total)][0])
            raise LabelError("ids", f"label {bad} does not exist (the model has {total})")
        old = ids[ids < first]
        bias = w[old, -1]
        bias = from_bfloat16(np.ascontiguousarray(bias)) if w.dtype == np.uint16 else bias
        retired = np.concatenate([old[~np.isneginf(bias)], ids[ids >= first]])
        added = np.arange(first, total, dtype=np.int64)
        if not added.size and not retired.size:
            return SnapshotEdit(added, retired, None)
        edit = deltas.Delta(first, rows, codes, retired, names)
        # the structure as it is (pin_structure)
        config = model.config.replace(model=model.config.model.replace(sample_output=slot >= 0))
        state = {k: v for k, v in manifest.get("trainer_state", {}).items() if k != "training_arrays"}
        meta = {
            k: v
            for k, v in manifest.items()
            if k not in ("arrays", "version", "created_at", "format_version", deltas.KEY)
        }
        meta.update(config=config.to_dict(), num_labels=int(total), trainer_state=state, edited_from=version)
        if not renamed and deltas.depth(manifest) < deltas.MAX_DEPTH:
            meta[deltas.KEY] = {"parent": version, "depth": deltas.depth(manifest) + 1}
            published, _ = store.publish(edit.arrays(), meta)
            return SnapshotEdit(added, retired, published)
        arrays, sources = deltas.full_arrays(path, manifest, model=model)
        if renamed and label_names is not None:
            arrays.update(label_names.to_arrays())
        new = deltas.apply_arrays(arrays, edit, config)
        links = {n: sources[n] for n, a in new.items() if n in sources and a is arrays[n]}
        published, _ = store.publish({n: a for n, a in new.items() if n not in links}, meta, links)
        return SnapshotEdit(added, retired, published)
