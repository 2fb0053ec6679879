"""A multi-label generator of another kind than `engine.synth`: labels are sparse linear functions of the input.

The generative process (all of it fixed by `seed`; train and test are one pool split at random):
- Features have a Zipf background distribution. There are `num_clusters` feature clusters, each with
  its own vocabulary of `cluster_vocab` features (Zipf within it; clusters may share features).
- A point mixes 1 + Poisson(`extra_clusters`) clusters, chosen by a Zipf popularity, so clusters
  overlap across points. Its number of tokens is Poisson-Gamma around `avg_tokens`; a token comes from
  one of its clusters with probability `cluster_token_share`, else from the background. Features
  are TF-IDF of the token counts (sublinear tf, IDF from the training split, rows L2-normalised).
- Label l has a weight vector w_l with `label_support` non-zeros, drawn from the vocabularies of one
  or two clusters (so labels of a cluster overlap and co-occur), log-normal magnitudes and a share
  `negative_share` of negative weights. Label frequencies follow a power law: label of rank r is
  given to n_r ~ (r + `label_zipf_offset`) ** -`label_zipf` of the points (scaled so that the mean
  is `avg_labels` labels per point, at least one point each), namely to the points with the highest
  score w_l . x + noise, among those with a positive score (`score_noise` times the score's spread
  on them, Gaussian).
- A share `label_flip` of the label entries is then replaced by a label drawn by popularity (noise
  that no model can learn), and points left without labels or features are dropped.

Unlike `engine.synth` (tokens drawn from the labels' own vocabularies), here the input comes first
and labels are read from it: a linear model of the right support is the best predictor, the
frequency tail is long, and a label's evidence is spread over a few weak features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from engine import Dataset

__all__ = ["SparseLinearParams", "PRESETS", "generate"]


@dataclass(frozen=True)
class SparseLinearParams:
    num_points: int
    """Train + test points before dropping empty ones."""
    num_features: int
    num_labels: int
    num_clusters: int
    avg_tokens: float = 60.0
    avg_labels: float = 5.0
    test_fraction: float = 0.2
    cluster_vocab: int = 300
    extra_clusters: float = 1.0
    cluster_zipf: float = 0.8
    cluster_token_share: float = 0.6
    token_dispersion: float = 3.0
    feature_zipf: float = 1.0
    label_support: int = 12
    two_cluster_share: float = 0.5
    negative_share: float = 0.2
    label_zipf: float = 1.1
    label_zipf_offset: float = 5.0
    score_noise: float = 0.5
    label_flip: float = 0.05
    chunk_entries: int = 30_000_000
    """Bound on the score entries held at once (labels are scored in chunks)."""

    def __post_init__(self) -> None:
        for f in ("num_points", "num_features", "num_labels", "num_clusters", "cluster_vocab", "label_support"):
            if getattr(self, f) < 1:
                raise ValueError(f"SparseLinearParams.{f} must be >= 1; got {getattr(self, f)}")
        if self.cluster_vocab > self.num_features or self.label_support > self.cluster_vocab:
            raise ValueError("need label_support <= cluster_vocab <= num_features")
        for f in ("test_fraction", "cluster_token_share", "two_cluster_share", "negative_share", "label_flip"):
            if not 0 <= getattr(self, f) <= 1:
                raise ValueError(f"SparseLinearParams.{f} must be in [0, 1]; got {getattr(self, f)}")
        if not 1 <= self.avg_labels <= self.num_labels or self.avg_tokens < 1:
            raise ValueError("need 1 <= avg_labels <= num_labels and avg_tokens >= 1")


PRESETS = {
    "default": SparseLinearParams(num_points=50_000, num_features=20_000, num_labels=8_000, num_clusters=250),
    "amazon670k": SparseLinearParams(
        num_points=643_474,
        num_features=135_909,
        num_labels=670_091,
        num_clusters=20_000,
        avg_tokens=110.0,
        avg_labels=5.4,
        test_fraction=153_025 / 643_474,
        cluster_vocab=400,
    ),
}


def _zipf_cdf(n: int, a: float, offset: float = 1.0) -> np.ndarray:
    w = (np.arange(n) + offset) ** -a
    c = np.cumsum(w)
    return c / c[-1]


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _features(p: SparseLinearParams, rng: np.random.Generator) -> tuple[sp.csr_matrix, np.ndarray]:
    """Token counts (points x features) and the cluster vocabularies (clusters x cluster_vocab)."""
    F, C, V = p.num_features, p.num_clusters, p.cluster_vocab
    bg_ids = rng.permutation(F)  # background rank -> feature id
    bg_cdf = _zipf_cdf(F, p.feature_zipf)
    vocab = np.stack([rng.choice(F, V, replace=False) for _ in range(C)])  # rank within cluster -> feature
    in_cdf = _zipf_cdf(V, 1.0, 2.0)
    cl_cdf = _zipf_cdf(C, p.cluster_zipf, 5.0)
    cl_ids = rng.permutation(C)

    n = p.num_points
    k = 1 + rng.poisson(p.extra_clusters, n)
    k = np.minimum(k, 5)
    kptr = np.concatenate(([0], np.cumsum(k)))
    point_clusters = cl_ids[_draw(cl_cdf, rng.random(int(kptr[-1])))]
    lam = rng.gamma(p.token_dispersion, p.avg_tokens / p.token_dispersion, n)
    ntok = np.maximum(1, rng.poisson(lam))
    owner = np.repeat(np.arange(n), ntok)
    from_cluster = rng.random(len(owner)) < p.cluster_token_share
    pick = kptr[owner] + (rng.random(len(owner)) * k[owner]).astype(np.int64)
    cluster = point_clusters[pick]
    feat = np.where(
        from_cluster,
        vocab[cluster, _draw(in_cdf, rng.random(len(owner)))],
        bg_ids[_draw(bg_cdf, rng.random(len(owner)))],
    )
    counts = sp.csr_matrix((np.ones(len(owner), dtype=np.float32), (owner, feat)), shape=(n, F))
    counts.sum_duplicates()
    return counts, vocab


def _label_weights(p: SparseLinearParams, vocab: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """W (labels x features): each row `label_support` non-zeros from one or two clusters' vocabularies."""
    L, S, V = p.num_labels, p.label_support, p.cluster_vocab
    c1 = rng.integers(0, p.num_clusters, L)
    c2 = np.where(rng.random(L) < p.two_cluster_share, rng.integers(0, p.num_clusters, L), c1)
    second = rng.random((L, S)) < 0.5
    cl = np.where(second, c2[:, None], c1[:, None])
    cols = vocab[cl, rng.integers(0, V, (L, S))]
    vals = rng.lognormal(0.0, 0.5, (L, S)) * np.where(rng.random((L, S)) < p.negative_share, -1.0, 1.0)
    w = sp.csr_matrix((vals.ravel(), (np.repeat(np.arange(L), S), cols.ravel())), shape=(L, p.num_features))
    w.sum_duplicates()
    return w


def _assign(p: SparseLinearParams, x: sp.csr_matrix, w: sp.csr_matrix, rng: np.random.Generator):
    """(point, label) pairs: each label to its n_l top-scoring points (noisy scores, positive only)."""
    L, n = p.num_labels, x.shape[0]
    rank = rng.permutation(L)  # label id -> popularity rank
    share = _zipf_cdf(L, p.label_zipf, p.label_zipf_offset)
    share = np.diff(np.concatenate(([0.0], share)))[rank]
    target = np.maximum(1, np.round(share * p.avg_labels * n)).astype(np.int64)
    xt = x.T.tocsr()
    per_label = max(1.0, x.nnz * p.label_support / p.num_features)
    step = max(1, int(p.chunk_entries / per_label))
    rows, cols = [], []
    for l0 in range(0, L, step):
        l1 = min(L, l0 + step)
        s = (w[l0:l1] @ xt).tocsr()  # labels x points
        s.eliminate_zeros()
        for j in range(l1 - l0):
            a, b = s.indptr[j], s.indptr[j + 1]
            if a == b:
                continue
            pts, sc = s.indices[a:b], s.data[a:b]
            pos = sc > 0
            pts, sc = pts[pos], sc[pos]
            if not len(sc):
                continue
            sc = sc + rng.normal(0.0, p.score_noise * (sc.std() + 1e-12), len(sc))
            t = int(min(target[l0 + j], len(sc)))
            top = np.argpartition(-sc, t - 1)[:t] if t < len(sc) else np.arange(len(sc))
            rows.append(pts[top])
            cols.append(np.full(t, l0 + j, dtype=np.int64))
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    flip = rng.random(len(cols)) < p.label_flip
    pop_cdf = np.cumsum(target / target.sum())
    cols[flip] = _draw(pop_cdf, rng.random(int(flip.sum())))
    y = sp.csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, L))
    y.sum_duplicates()
    return y


def generate(params: SparseLinearParams | str = "default", seed: int = 0, **overrides) -> tuple[Dataset, Dataset]:
    """(train, test) engine Datasets, e.g. `generate("default")` or `generate("default", num_points=5000)`."""
    p = PRESETS[params] if isinstance(params, str) else params
    if overrides:
        p = dataclasses.replace(p, **overrides)
    from sklearn.feature_extraction.text import TfidfTransformer

    rng = np.random.default_rng(seed)
    counts, vocab = _features(p, rng)
    n = counts.shape[0]
    perm = rng.permutation(n)
    n_test = int(round(n * p.test_fraction))
    train_rows, test_rows = np.sort(perm[n_test:]), np.sort(perm[:n_test])
    tfidf = TfidfTransformer(sublinear_tf=True).fit(counts[train_rows])
    x = tfidf.transform(counts).astype(np.float32).tocsr()
    w = _label_weights(p, vocab, rng)
    y = _assign(p, x, w, rng)
    keep = (np.diff(y.indptr) > 0) & (np.diff(x.indptr) > 0)
    return _take(x, y, train_rows[keep[train_rows]]), _take(x, y, test_rows[keep[test_rows]])


def _take(x: sp.csr_matrix, y: sp.csr_matrix, rows: np.ndarray) -> Dataset:
    xs, ys = x[rows], y[rows]
    xs.sort_indices()
    ys.sort_indices()
    return Dataset(
        np.asarray(xs.indptr, dtype=np.int64),
        np.asarray(xs.indices, dtype=np.int32),
        np.asarray(xs.data, dtype=np.float32),
        np.asarray(ys.indptr, dtype=np.int64),
        np.asarray(ys.indices, dtype=np.int32),
        int(x.shape[1]),
        int(y.shape[1]),
    )
