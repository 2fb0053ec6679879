"""Deterministic synthetic extreme-classification data with planted, learnable structure.

Why: the real benchmarks (Amazon-670K, Delicious-200K) are hundreds of MB and not redistributable
with the code; tests, demos and benchmarks need data with the same shapes and statistics, and with
a signal a SLIDE network can actually learn.

The generative model (fixed by `seed`, shared by the train and test splits):
- Label popularity is Zipf-like: the label of popularity rank r is drawn with probability
  proportional to (r + label_zipf_offset) ** -label_zipf; ranks are shuffled over label ids.
- Labels are grouped into topics of `labels_per_topic` labels (mixed popularity). A topic owns a
  vocabulary of `topic_vocab` features; a label owns `label_vocab` features, half from its topic's
  vocabulary and half anywhere.
- A point draws 1 + Poisson(avg_labels - 1) labels: a few "seed" labels by global popularity fix
  its topics, the rest come from those topics (by popularity within the topic), plus a share of
  stray labels by global popularity. So labels co-occur within topics, as in real data.
- Its number of distinct features is Poisson-Gamma around `avg_features` (over-dispersed as in
  real bag-of-words data). Feature tokens are drawn from the vocabularies of its labels
  (`label_token_share`), of its labels' topics (`topic_token_share`) and from a Zipf background
  distribution over all features (the rest). Repeated tokens are term frequency.
- Values are tf-idf-like: (1 + ln tf) * idf, idf growing with the feature's background rarity,
  each row L2-normalised, rounded to `value_digits` significant digits (short text, exact float32
  round trip through `engine.data`).

Points are produced in chunks of `chunk_points`, each chunk from its own random stream
(seed, split, chunk index), so in-memory `generate` and streamed `generate_to_files` give the same
points, and memory is bounded by one chunk plus the model (~ (label_vocab + 3) * num_labels ints).
Each row's feature and label ids are sorted ascending.
"""

from __future__ import annotations

import dataclasses
import gzip as _gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from engine._numba import kernel
from engine.data import format_xmc_rows
from engine.sparse import Dataset

__all__ = ["SynthParams", "PRESETS", "generate", "generate_split", "generate_to_files", "resolve_params"]

_TRAIN, _TEST, _MODEL = 1, 2, 0


@dataclass(frozen=True)
class SynthParams:
    """Sizes and statistics of a synthetic dataset; checked on creation."""

    num_train: int
    num_test: int
    num_features: int
    num_labels: int
    avg_features: float
    """Mean distinct non-zero features per point."""
    avg_labels: float
    """Mean labels per point (every point has at least one)."""
    name: str = "custom"
    labels_per_topic: int = 32
    topic_vocab: int = 200
    label_vocab: int = 12
    label_zipf: float = 1.0
    label_zipf_offset: float = 10.0
    feature_zipf: float = 1.0
    label_token_share: float = 0.2
    topic_token_share: float = 0.3
    """Shares of a point's feature tokens from its labels' and topics' vocabularies; the rest is background."""
    labels_per_topic_point: float = 3.0
    """Mean labels a point takes from each of its topics."""
    stray_label_share: float = 0.1
    """Share of a point's labels drawn by global popularity, ignoring its topics."""
    feature_dispersion: float = 3.0
    """Gamma shape of the features-per-point distribution (smaller = more spread)."""
    value_digits: int = 4
    chunk_points: int = 4096

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, msg: str) -> None:
            if not ok:
                raise ValueError(f"SynthParams.{field}: {msg}; got {getattr(self, field)!r}")

        need(self.num_train >= 1, "num_train", "must be >= 1")
        need(self.num_test >= 0, "num_test", "must be >= 0")
        need(1 <= self.num_features <= 2**31 - 1, "num_features", "must be in [1, 2^31-1] (int32 ids)")
        need(1 <= self.num_labels <= 2**31 - 1, "num_labels", "must be in [1, 2^31-1] (int32 ids)")
        need(1 <= self.avg_labels <= self.num_labels, "avg_labels", "must be in [1, num_labels]")
        need(
            1 <= self.avg_features <= self.num_features / 4,
            "avg_features",
            "must be in [1, num_features / 4] so points stay sparse; raise num_features",
        )
        need(self.labels_per_topic >= 1, "labels_per_topic", "must be >= 1")
        need(self.topic_vocab >= 1 and self.label_vocab >= 1, "topic_vocab", "vocabularies must be >= 1")
        need(self.label_zipf >= 0 and self.feature_zipf >= 0, "label_zipf", "Zipf exponents must be >= 0")
        need(self.label_zipf_offset > 0, "label_zipf_offset", "must be > 0")
        need(
            0 <= self.label_token_share
            and 0 <= self.topic_token_share
            and self.label_token_share + self.topic_token_share <= 1,
            "label_token_share",
            "label_token_share and topic_token_share must be >= 0 with a sum <= 1",
        )
        need(self.labels_per_topic_point >= 1, "labels_per_topic_point", "must be >= 1")
        need(0 <= self.stray_label_share <= 1, "stray_label_share", "must be in [0, 1]")
        need(self.feature_dispersion > 0, "feature_dispersion", "must be > 0")
        need(1 <= self.value_digits <= 9, "value_digits", "must be in [1, 9] (float32 holds ~7 digits)")
        need(self.chunk_points >= 1, "chunk_points", "must be >= 1")

    @property
    def num_topics(self) -> int:
        return -(-self.num_labels // self.labels_per_topic)

    @property
    def max_labels(self) -> int:
        """Cap on labels per point (keeps the Poisson tail and deduplication in check)."""
        return int(min(self.num_labels, math.ceil(3 * self.avg_labels + 10)))

    def scaled(self, factor: float | None = None, **overrides: Any) -> SynthParams:
        """Multiply point, feature and label counts by `factor` (per-point averages kept), then apply overrides.

        `PRESETS["amazon670k"].scaled(0.05)` keeps Amazon's statistics at 1/20 of the size;
        `.scaled(num_train=20000)` only changes that field.
        """
        changes: dict[str, Any] = {}
        if factor is not None:
            if not factor > 0:
                raise ValueError(f"scale factor must be > 0; got {factor}")
            changes = {
                "num_train": max(1, round(self.num_train * factor)),
                "num_test": max(0, round(self.num_test * factor)),
                "num_features": max(1, round(self.num_features * factor)),
                "num_labels": max(1, round(self.num_labels * factor)),
            }
            changes["num_features"] = max(changes["num_features"], math.ceil(4 * self.avg_features))
            changes["num_labels"] = max(changes["num_labels"], math.ceil(self.avg_labels))
        changes.update(overrides)
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(
                f"unknown SynthParams field {unknown[0]!r}; known fields are "
                f"{[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, SynthParams] = {
    "tiny": SynthParams(
        2_000,
        500,
        2_000,
        500,
        avg_features=40,
        avg_labels=3,
        name="tiny",
        labels_per_topic=25,
        topic_vocab=100,
        label_vocab=10,
    ),
    "small": SynthParams(
        20_000, 5_000, 20_000, 5_000, avg_features=60, avg_labels=4, name="small", topic_vocab=200, label_vocab=12
    ),
    "amazon670k": SynthParams(
        490_449,
        153_025,
        135_909,
        670_091,
        avg_features=75,
        avg_labels=5.4,
        name="amazon670k",
        topic_vocab=256,
        label_vocab=16,
        label_zipf_offset=20,
    ),
    "delicious200k": SynthParams(
        196_606,
        100_095,
        782_585,
        205_443,
        avg_features=300,
        avg_labels=75,
        name="delicious200k",
        labels_per_topic=64,
        labels_per_topic_point=4,
        topic_vocab=512,
        label_vocab=16,
        label_zipf_offset=20,
    ),
}


def resolve_params(preset_or_params: str | SynthParams, **overrides: Any) -> SynthParams:
    """A preset name or SynthParams, with field overrides (`num_train=20000`, ...)."""
    if isinstance(preset_or_params, SynthParams):
        params = preset_or_params
    else:
        try:
            params = PRESETS[preset_or_params]
        except KeyError:
            raise ValueError(
                f"unknown preset {preset_or_params!r}; choose one of {sorted(PRESETS)} or pass a SynthParams"
            ) from None
    return params.scaled(**overrides) if overrides else params


# ---------------------------------------------------------------------------------------------
# The model: everything shared by all points of a seed
# ---------------------------------------------------------------------------------------------


class _Model(NamedTuple):
    """Alias tables (Walker/Vose: O(1) per draw) for the big distributions, CDFs for the small ones."""

    label_prob: np.ndarray  # float64 (L,): alias table over label ids, by popularity
    label_alias: np.ndarray  # int64 (L,)
    topic_of_label: np.ndarray  # int32 (L,)
    by_topic: np.ndarray  # int32 (L,): label ids ordered by topic
    topic_start: np.ndarray  # int64 (T+1,): segment of each topic in by_topic
    topic_prob: np.ndarray  # float64 (L,): per-topic alias tables over by_topic positions
    topic_alias: np.ndarray  # int64 (L,)
    topic_feats: np.ndarray  # int32 (T, topic_vocab)
    topic_pos_cdf: np.ndarray  # float64 (topic_vocab,)
    label_feats: np.ndarray  # int32 (L, label_vocab)
    label_pos_cdf: np.ndarray  # float64 (label_vocab,)
    background_prob: np.ndarray  # float64 (D,): alias table over feature ids
    background_alias: np.ndarray  # int64 (D,)
    idf: np.ndarray  # float64 (D,)


@kernel
def _alias_tables(weights, starts, prob, alias):
    """Vose alias tables for each segment [starts[s], starts[s+1]) of `weights` (float64, > 0).

    Drawing position i uniformly in a segment, then keeping it with probability prob[i] or else
    taking alias[i] (a global position in the same segment), samples proportionally to `weights`.
    """
    small = np.empty(len(weights), dtype=np.int64)
    large = np.empty(len(weights), dtype=np.int64)
    scaled = np.empty(len(weights), dtype=np.float64)
    for seg in range(len(starts) - 1):
        lo = starts[seg]
        hi = starts[seg + 1]
        total = 0.0
        for i in range(lo, hi):
            total += weights[i]
        ns = 0
        nl = 0
        for i in range(lo, hi):
            scaled[i] = weights[i] * (hi - lo) / total
            alias[i] = i
            if scaled[i] < 1.0:
                small[ns] = i
                ns += 1
            else:
                large[nl] = i
                nl += 1
        while ns > 0 and nl > 0:
            ns -= 1
            sm = small[ns]
            lg = large[nl - 1]
            prob[sm] = scaled[sm]
            alias[sm] = lg
            scaled[lg] = scaled[lg] + scaled[sm] - 1.0
            if scaled[lg] < 1.0:
                nl -= 1
                small[ns] = lg
                ns += 1
        for t in range(nl):
            prob[large[t]] = 1.0
        for t in range(ns):
            prob[small[t]] = 1.0


def _alias(weights: np.ndarray, starts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if starts is None:
        starts = np.array([0, len(weights)], dtype=np.int64)
    prob = np.empty(len(weights), dtype=np.float64)
    alias = np.empty(len(weights), dtype=np.int64)
    _alias_tables(weights, np.ascontiguousarray(starts, dtype=np.int64), prob, alias)
    return prob, alias


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    c /= c[-1]
    c[-1] = 1.0
    return c


def _build_model(p: SynthParams, seed: int) -> _Model:
    rng = np.random.default_rng([seed, _MODEL])
    L, D, T = p.num_labels, p.num_features, p.num_topics
    ranks = np.arange(L, dtype=np.float64)
    popularity = np.empty(L)
    popularity[rng.permutation(L)] = (ranks + p.label_zipf_offset) ** -p.label_zipf
    topic_of_label = np.empty(L, dtype=np.int32)
    topic_of_label[rng.permutation(L)] = np.arange(L) // p.labels_per_topic
    by_topic = np.argsort(topic_of_label, kind="stable").astype(np.int32)
    topic_start = np.concatenate([[0], np.cumsum(np.bincount(topic_of_label, minlength=T))]).astype(np.int64)
    topic_feats = rng.integers(0, D, (T, p.topic_vocab), dtype=np.int32)
    own = rng.integers(0, D, (L, p.label_vocab), dtype=np.int32)
    from_topic = topic_feats[topic_of_label[:, None], rng.integers(0, p.topic_vocab, (L, p.label_vocab))]
    label_feats = np.where(rng.random((L, p.label_vocab)) < 0.5, from_topic, own).astype(np.int32)
    background = rng.permutation(D)
    bg_weight = np.empty(D)
    bg_weight[background] = (np.arange(D) + 1.0) ** -p.feature_zipf
    bg_rank = np.empty(D)
    bg_rank[background] = np.arange(D)
    label_prob, label_alias = _alias(popularity)
    # Within a topic, popularity is flattened (square root): otherwise a topic holding a head label
    # offers little else, and points drawing several labels from it lose them to repeats.
    topic_prob, topic_alias = _alias(np.sqrt(popularity[by_topic]), topic_start)
    background_prob, background_alias = _alias(bg_weight)
    return _Model(
        label_prob=label_prob,
        label_alias=label_alias,
        topic_of_label=topic_of_label,
        by_topic=by_topic,
        topic_start=topic_start,
        topic_prob=topic_prob,
        topic_alias=topic_alias,
        topic_feats=topic_feats,
        topic_pos_cdf=_cdf(1.0 / (np.arange(p.topic_vocab) + 1.0)),
        label_feats=label_feats,
        label_pos_cdf=_cdf(1.0 / np.sqrt(np.arange(p.label_vocab) + 1.0)),
        background_prob=background_prob,
        background_alias=background_alias,
        idf=1.0 + np.log1p(bg_rank / 10.0),
    )


def _draw_labels(m: _Model, rng: np.random.Generator, n: int) -> np.ndarray:
    """n label ids by global popularity."""
    u = rng.random((2, n))
    i = (u[0] * len(m.label_prob)).astype(np.int64)
    return np.where(u[1] < m.label_prob[i], i, m.label_alias[i])


def _draw_features(m: _Model, rng: np.random.Generator, n: int) -> np.ndarray:
    """n background feature ids (Zipf over a shuffled vocabulary)."""
    u = rng.random((2, n))
    i = (u[0] * len(m.background_prob)).astype(np.int64)
    return np.where(u[1] < m.background_prob[i], i, m.background_alias[i])


def _draw_in_topics(m: _Model, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per entry of `topics`, by (flattened) popularity within that topic."""
    lo = m.topic_start[topics]
    size = m.topic_start[topics + 1] - lo
    u = rng.random((2, len(topics)))
    i = lo + (u[0] * size).astype(np.int64)
    return m.by_topic[np.where(u[1] < m.topic_prob[i], i, m.topic_alias[i])]


def _draw_cdf(cdf: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


def _segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row id of every slot and the CSR start of every row, for `counts` slots per row."""
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return np.repeat(np.arange(len(counts)), counts), starts


@kernel
def _sort_segment(ids, w, lo, hi):
    """Sort ids[lo:hi] ascending, w along: insertion sort for the usual short rows, argsort beyond."""
    if hi - lo <= 48:
        for i in range(lo + 1, hi):
            key = ids[i]
            kw = w[i]
            j = i - 1
            while j >= lo and ids[j] > key:
                ids[j + 1] = ids[j]
                w[j + 1] = w[j]
                j -= 1
            ids[j + 1] = key
            w[j + 1] = kw
        return
    order = np.argsort(ids[lo:hi])
    sorted_ids = ids[lo:hi][order]
    sorted_w = w[lo:hi][order]
    ids[lo:hi] = sorted_ids
    w[lo:hi] = sorted_w


@kernel
def _group_rows(rows, ids, weights, n, dim, sort_rows, indptr, out_ids, out_w):
    """Group (row, id, weight) triples by row, merge repeated ids (weights add), optionally sort ids per row.

    rows int64 (t,) in [0, n); ids int32/int64 (t,) in [0, dim); weights float64 (t,).
    indptr int64 (n+1,), out_ids int32 (>= t,), out_w float64 (>= t,): filled CSR. Returns nnz.
    A counting sort by row plus a last-position mark per id: O(t + dim), no global sort.
    Within a row, ids keep first-appearance order unless `sort_rows`.
    """
    start = np.zeros(n + 1, dtype=np.int64)
    for t in range(len(rows)):
        start[rows[t] + 1] += 1
    for r in range(n):
        start[r + 1] += start[r]
    fill = start[:-1].copy()
    g_ids = np.empty(len(rows), dtype=np.int64)
    g_w = np.empty(len(rows), dtype=np.float64)
    for t in range(len(rows)):
        r = rows[t]
        g_ids[fill[r]] = ids[t]
        g_w[fill[r]] = weights[t]
        fill[r] += 1
    mark = np.full(dim, -1, dtype=np.int64)
    o = 0
    indptr[0] = 0
    for r in range(n):
        begin = o
        for t in range(start[r], start[r + 1]):
            f = g_ids[t]
            j = mark[f]
            if j >= begin:
                out_w[j] += g_w[t]
            else:
                mark[f] = o
                out_ids[o] = f
                out_w[o] = g_w[t]
                o += 1
        if sort_rows and o - begin > 1:
            _sort_segment(out_ids, out_w, begin, o)
        indptr[r + 1] = o
    return o


def _group(rows: np.ndarray, ids: np.ndarray, weights: np.ndarray, n: int, dim: int, sort_rows: bool = True):
    """(indptr, ids int32, summed weights) of the triples grouped by row; see `_group_rows`."""
    indptr = np.empty(n + 1, dtype=np.int64)
    out_ids = np.empty(len(rows), dtype=np.int32)
    out_w = np.empty(len(rows), dtype=np.float64)
    nnz = _group_rows(
        np.ascontiguousarray(rows, dtype=np.int64),
        np.ascontiguousarray(ids, dtype=np.int64),
        np.ascontiguousarray(weights, dtype=np.float64),
        n,
        dim,
        sort_rows,
        indptr,
        out_ids,
        out_w,
    )
    return indptr, out_ids[:nnz], out_w[:nnz]


def _csr_rows(indptr: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


# ---------------------------------------------------------------------------------------------
# One chunk of points
# ---------------------------------------------------------------------------------------------


def _chunk_labels(p: SynthParams, m: _Model, rng: np.random.Generator, n: int):
    L = p.num_labels
    target = np.minimum(1 + rng.poisson(p.avg_labels - 1, n), p.max_labels)
    n_topics = 1 + rng.binomial(target - 1, 1.0 / p.labels_per_topic_point)
    seed_rows, seed_start = _segments(n_topics)
    seeds = _draw_labels(m, rng, len(seed_rows))
    seed_topics = m.topic_of_label[seeds]

    def extra(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, _ = _segments(counts)
        k = (rng.random(len(rows)) * n_topics[rows]).astype(np.int64)
        labels = _draw_in_topics(m, seed_topics[seed_start[rows] + k], rng)
        stray = rng.random(len(rows)) < p.stray_label_share
        labels[stray] = _draw_labels(m, rng, int(stray.sum()))
        return rows, labels

    rows, labels = extra(target - n_topics)
    rows = np.concatenate([seed_rows, rows])
    labels = np.concatenate([seeds, labels])
    indptr, labels, _ = _group(rows, labels, np.ones(len(rows)), n, L, sort_rows=False)
    for _ in range(4):  # top up points that lost labels to repeats
        deficit = target - np.diff(indptr)
        if not (deficit > 0).any():
            break
        new_rows, new_labels = extra(np.maximum(deficit, 0))
        rows = np.concatenate([_csr_rows(indptr), new_rows])
        indptr, labels, _ = _group(
            rows, np.concatenate([labels, new_labels]), np.ones(len(rows)), n, L, sort_rows=False
        )
    indptr, labels, _ = _group(_csr_rows(indptr), labels, np.ones(len(labels)), n, L)
    return indptr, labels


def _chunk_features(p: SynthParams, m: _Model, rng: np.random.Generator, n: int, y_indptr, y_indices):
    D = p.num_features
    shape = p.feature_dispersion
    target = 1 + rng.poisson(rng.gamma(shape, (p.avg_features - 1) / shape, n))
    target = np.minimum(target, min(D // 2, int(6 * p.avg_features) + 10))
    y_count = np.diff(y_indptr)
    label_share = p.label_token_share
    topic_share = p.topic_token_share / (1.0 - label_share) if label_share < 1 else 0.0

    def tokens(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_label = rng.binomial(counts, label_share)
        n_topic = rng.binomial(counts - n_label, min(1.0, topic_share))
        n_bg = counts - n_label - n_topic
        r_label, _ = _segments(n_label)
        lab = y_indices[y_indptr[r_label] + (rng.random(len(r_label)) * y_count[r_label]).astype(np.int64)]
        f_label = m.label_feats[lab, _draw_cdf(m.label_pos_cdf, rng, len(lab))]
        r_topic, _ = _segments(n_topic)
        lab = y_indices[y_indptr[r_topic] + (rng.random(len(r_topic)) * y_count[r_topic]).astype(np.int64)]
        f_topic = m.topic_feats[m.topic_of_label[lab], _draw_cdf(m.topic_pos_cdf, rng, len(lab))]
        r_bg, _ = _segments(n_bg)
        f_bg = _draw_features(m, rng, len(r_bg))
        return np.concatenate([r_label, r_topic, r_bg]), np.concatenate([f_label, f_topic, f_bg])

    rows, feats = tokens(target)
    x_indptr, feats, tf = _group(rows, feats, np.ones(len(rows)), n, D, sort_rows=False)
    for _ in range(4):  # top up points whose tokens repeated: repeats are term frequency
        deficit = target - np.diff(x_indptr)
        if not (deficit > 0).any():
            break
        new_rows, new_feats = tokens(np.maximum(deficit, 0))
        x_indptr, feats, tf = _group(
            np.concatenate([_csr_rows(x_indptr), new_rows]),
            np.concatenate([feats, new_feats]),
            np.concatenate([tf, np.ones(len(new_rows))]),
            n,
            D,
            sort_rows=False,
        )
    rows = _csr_rows(x_indptr)
    x_indptr, feats, tf = _group(rows, feats, tf, n, D)
    vals = (1.0 + np.log(tf)) * m.idf[feats]
    norms = np.sqrt(np.bincount(rows, weights=vals * vals, minlength=n))
    vals /= norms[rows]
    exp = np.floor(np.log10(vals))
    scale = 10.0 ** (p.value_digits - 1 - exp)
    vals = (np.round(vals * scale) / scale).astype(np.float32)
    return x_indptr, feats, vals


def _chunk(p: SynthParams, m: _Model, seed: int, split: int, index: int, n: int) -> Dataset:
    rng = np.random.default_rng([seed, split, index])
    y_indptr, y_indices = _chunk_labels(p, m, rng, n)
    x_indptr, x_indices, x_values = _chunk_features(p, m, rng, n, y_indptr, y_indices)
    return Dataset(x_indptr, x_indices, x_values, y_indptr, y_indices, p.num_features, p.num_labels)


def _chunks(p: SynthParams, m: _Model, seed: int, split: int):
    total = p.num_train if split == _TRAIN else p.num_test
    for index, start in enumerate(range(0, total, p.chunk_points)):
        yield _chunk(p, m, seed, split, index, min(p.chunk_points, total - start))


def _concat(parts: list[Dataset], p: SynthParams) -> Dataset:
    if not parts:
        return Dataset(
            np.zeros(1, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.float32),
            np.zeros(1, np.int64),
            np.zeros(0, np.int32),
            p.num_features,
            p.num_labels,
        )

    def indptr(name: str) -> np.ndarray:
        offsets = np.cumsum([0] + [int(getattr(d, name)[-1]) for d in parts[:-1]])
        return np.concatenate([[0]] + [getattr(d, name)[1:] + o for d, o in zip(parts, offsets, strict=True)]).astype(
            np.int64
        )

    return Dataset(
        indptr("x_indptr"),
        np.concatenate([d.x_indices for d in parts]),
        np.concatenate([d.x_values for d in parts]),
        indptr("y_indptr"),
        np.concatenate([d.y_indices for d in parts]),
        p.num_features,
        p.num_labels,
    )


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def generate(preset_or_params: str | SynthParams = "tiny", seed: int = 0, **overrides: Any) -> tuple[Dataset, Dataset]:
    """(train, test) in memory, e.g. `generate("tiny")` or `generate("amazon670k", num_train=20000)`.

    Meant for sizes that fit comfortably in memory; use `generate_to_files` for the full presets.
    """
    p = resolve_params(preset_or_params, **overrides)
    _check_seed(seed)
    m = _build_model(p, seed)
    return _concat(list(_chunks(p, m, seed, _TRAIN)), p), _concat(list(_chunks(p, m, seed, _TEST)), p)


def generate_split(preset_or_params: str | SynthParams, split: str, seed: int = 0, **overrides: Any):
    """Iterate over the chunks (Datasets of up to `chunk_points` points) of "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    p = resolve_params(preset_or_params, **overrides)
    _check_seed(seed)
    return _chunks(p, _build_model(p, seed), seed, _TRAIN if split == "train" else _TEST)


def generate_to_files(
    preset_or_params: str | SynthParams, out_dir: str | os.PathLike, seed: int = 0, gzip: bool = False, **overrides: Any
) -> tuple[Path, Path]:
    """Stream train and test to `out_dir/{name}_train.txt` and `..._test.txt` (`.txt.gz` with gzip).

    Bounded memory (one chunk of points at a time); each file is written under a temporary name and
    renamed when complete. Same arguments -> byte-identical files (the gzip header has no name or time).
    """
    p = resolve_params(preset_or_params, **overrides)
    _check_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = _build_model(p, seed)
    suffix = ".txt.gz" if gzip else ".txt"
    paths = []
    for split, count, label in ((_TRAIN, p.num_train, "train"), (_TEST, p.num_test, "test")):
        path = out / f"{p.name}_{label}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as raw:
                f = _gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=1) if gzip else raw
                try:
                    f.write(f"{count} {p.num_features} {p.num_labels}\n".encode())
                    for chunk in _chunks(p, m, seed, split):
                        f.write(format_xmc_rows(chunk))
                finally:
                    if gzip:
                        f.close()
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths[0], paths[1]


def _check_seed(seed: int) -> None:
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2^63); got {seed!r}")
