"""Ranking metrics of extreme classification: P@k, nDCG@k and propensity-scored PSP@k.

Conventions, matching the Extreme Classification Repository (and pyxclib):
- `pred_labels` is an int array (n, width): each row the predicted label ids, best first. Only the
  first k columns count. A row with fewer than k candidates is padded with -1: a padded slot is a
  miss. A label repeated within a row counts once (its later copies are misses).
  If width < k the missing columns are misses too.
- Every point is in the denominator, including points without any true label (they score 0):
  P@k = (hits in the top k, summed over points) / (n k).
- nDCG@k of a point = DCG@k / IDCG@k with DCG@k = sum_{j<k} hit_j / log2(j + 2) and IDCG@k the DCG of
  a perfect ranking, i.e. over min(k, |true labels|) slots; points without labels score 0.
- PSP@k is normalised: sum over points of the propensity-weighted hits, divided by the same sum for
  the best achievable prediction (each point's true labels ranked by inverse propensity). It is a
  ratio of totals, not a mean of per-point ratios.
- An empty prediction set (n = 0) scores 0.0 everywhere, so results stay JSON-serialisable.
"""

from __future__ import annotations

import numpy as np

from engine._numba import kernel

__all__ = [
    "precision_at_k",
    "ndcg_at_k",
    "psp_at_k",
    "propensity_scores",
    "evaluate",
    "hit_matrix",
    "evaluate_model",
    "topk_recall",
    "softmax_rows",
    "AMAZON_PROPENSITY",
    "DEFAULT_PROPENSITY",
]

DEFAULT_PROPENSITY = (0.55, 1.5)
"""(A, B) of Jain et al. 2016 for most datasets."""
AMAZON_PROPENSITY = (0.6, 2.6)
"""(A, B) used for the Amazon datasets (Amazon-670K, AmazonTitles, ...)."""


@kernel
def _hits(pred, y_indptr, y_indices, k, out):
    """out[i, j] = 1 if pred[i, j] is a true label of point i and not repeated in pred[i, :j].

    pred int64 (n, >= k); y_indptr int64 (n+1,); y_indices int32; out uint8 (n, k).
    Label lists are scanned linearly: they are short (~5-75) and need not be sorted.
    """
    for i in range(pred.shape[0]):
        s = y_indptr[i]
        e = y_indptr[i + 1]
        for j in range(k):
            lab = pred[i, j]
            out[i, j] = 0
            if lab < 0:
                continue
            repeated = False
            for jj in range(j):
                if pred[i, jj] == lab:
                    repeated = True
                    break
            if repeated:
                continue
            for t in range(s, e):
                if y_indices[t] == lab:
                    out[i, j] = 1
                    break


@kernel
def _ideal_weight_sums(y_indptr, y_indices, weights, k, out):
    """out[i] = sum of the k largest weights[l] over the true labels l of point i (all if fewer)."""
    for i in range(len(y_indptr) - 1):
        s = y_indptr[i]
        e = y_indptr[i + 1]
        w = np.empty(e - s, dtype=np.float64)
        for t in range(s, e):
            w[t - s] = weights[y_indices[t]]
        w.sort()
        total = 0.0
        m = min(k, e - s)
        for t in range(m):
            total += w[e - s - 1 - t]
        out[i] = total


def _checked(pred_labels, y_indptr, y_indices, k: int, num_labels: int | None = None):
    """Validate once and convert to the kernel's types; pad pred with -1 up to k columns."""
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    k = int(k)
    pred = np.asarray(pred_labels)
    if pred.ndim == 1:
        pred = pred[:, None]
    if pred.ndim != 2 or (pred.size and not np.issubdtype(pred.dtype, np.integer)):
        raise ValueError(
            f"pred_labels must be an integer array of shape (n, k) holding label ids, best "
            f"first (-1 for padding); got dtype {pred.dtype} shape {pred.shape}"
        )
    y_indptr = np.ascontiguousarray(y_indptr, dtype=np.int64)
    y_indices = np.ascontiguousarray(y_indices, dtype=np.int32)
    n = len(y_indptr) - 1
    if pred.shape[0] != n:
        raise ValueError(
            f"pred_labels has {pred.shape[0]} rows but the labels describe {n} points; "
            f"predict for every point of the evaluated dataset, in order"
        )
    if pred.shape[1] < k:
        pred = np.concatenate([pred, np.full((n, k - pred.shape[1]), -1, dtype=pred.dtype)], axis=1)
    pred = np.ascontiguousarray(pred[:, :k], dtype=np.int64)
    if pred.size and pred.min() < -1:
        raise ValueError(f"pred_labels holds {pred.min()}; label ids are >= 0 and -1 marks padding")
    if num_labels is not None and pred.size and pred.max() >= num_labels:
        raise ValueError(
            f"pred_labels holds label {pred.max()} but inv_propensity has only {num_labels} "
            f"entries; compute propensities over all labels of the dataset"
        )
    return pred, y_indptr, y_indices, k


def hit_matrix(pred_labels, y_indptr, y_indices, k: int) -> np.ndarray:
    """uint8 (n, k): 1 where the prediction in that slot is a (first-time) true label."""
    pred, y_indptr, y_indices, k = _checked(pred_labels, y_indptr, y_indices, k)
    out = np.empty((pred.shape[0], k), dtype=np.uint8)
    _hits(pred, y_indptr, y_indices, k, out)
    return out


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(k, dtype=np.float64) + 2.0)


def _precision(hits: np.ndarray, k: int) -> float:
    n = hits.shape[0]
    return float(hits[:, :k].sum(dtype=np.int64)) / (n * k) if n else 0.0


def _ndcg(hits: np.ndarray, counts: np.ndarray, k: int) -> float:
    n = hits.shape[0]
    if n == 0:
        return 0.0
    disc = _discounts(k)
    dcg = hits[:, :k] @ disc
    ideal = np.concatenate([[0.0], np.cumsum(disc)])[np.minimum(counts, k)]
    per_point = np.divide(dcg, ideal, out=np.zeros(n), where=ideal > 0)
    return float(per_point.mean())


def _psp(hits, pred, y_indptr, y_indices, inv_p, k: int) -> float:
    if hits.shape[0] == 0:
        return 0.0
    top = pred[:, :k]
    gained = float((hits[:, :k] * inv_p[np.maximum(top, 0)]).sum())
    best = np.empty(hits.shape[0], dtype=np.float64)
    _ideal_weight_sums(y_indptr, y_indices, inv_p, k, best)
    total = float(best.sum())
    return gained / total if total > 0 else 0.0


def precision_at_k(pred_labels, y_indptr, y_indices, k: int) -> float:
    """P@k: true labels among the first k predictions, averaged over all points (divided by k)."""
    return _precision(hit_matrix(pred_labels, y_indptr, y_indices, k), k)


def ndcg_at_k(pred_labels, y_indptr, y_indices, k: int) -> float:
    """nDCG@k with binary relevance, averaged over all points (points without labels score 0)."""
    hits = hit_matrix(pred_labels, y_indptr, y_indices, k)
    counts = np.diff(np.asarray(y_indptr, dtype=np.int64))
    return _ndcg(hits, counts, k)


def psp_at_k(pred_labels, y_indptr, y_indices, inv_propensity, k: int) -> float:
    """Normalised propensity-scored precision PSP@k in [0, 1] (see the module docstring).

    `inv_propensity`: float (L,) from `propensity_scores` computed on the *training* labels.
    """
    inv_p = np.ascontiguousarray(inv_propensity, dtype=np.float64)
    pred, y_indptr, y_indices, k = _checked(pred_labels, y_indptr, y_indices, k, num_labels=len(inv_p))
    _check_label_range(y_indices, len(inv_p))
    hits = np.empty((pred.shape[0], k), dtype=np.uint8)
    _hits(pred, y_indptr, y_indices, k, hits)
    return _psp(hits, pred, y_indptr, y_indices, inv_p, k)


def propensity_scores(
    label_counts, num_points: int, A: float = DEFAULT_PROPENSITY[0], B: float = DEFAULT_PROPENSITY[1]
) -> np.ndarray:
    """Inverse propensities 1/p_l = 1 + C (N_l + B)^-A, C = (ln N - 1)(B + 1)^A (Jain et al. 2016).

    Returns the *inverse* propensity (>= 1, large for rare labels): the weight PSP@k gives a hit.
    label_counts int (L,): training points carrying each label (`Dataset.label_counts()`);
    num_points: training points N. Use `AMAZON_PROPENSITY` (A=0.6, B=2.6) for Amazon datasets.
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    if counts.ndim != 1 or (counts.size and counts.min() < 0):
        raise ValueError("label_counts must be a 1-d array of non-negative counts, one per label")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1 (the number of training points); got {num_points}")
    if not (A > 0 and B >= 0):
        raise ValueError(f"propensity parameters need A > 0 and B >= 0; got A={A}, B={B}")
    c = (np.log(num_points) - 1.0) * (B + 1.0) ** A
    return 1.0 + c * np.power(counts + B, -A)


def evaluate(pred_labels, dataset, ks=(1, 3, 5), inv_propensity=None) -> dict[str, float]:
    """All metrics of `pred_labels` against `dataset`'s labels, one pass over the hits.

    Keys: p_at_{k}, ndcg_at_{k} for k in ks, and psp_at_{k} when `inv_propensity` is given
    (from the training set; PSP without it would silently use the wrong label frequencies).
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers such as (1, 3, 5); got {ks}")
    kmax = max(ks)
    inv_p = None
    if inv_propensity is not None:
        inv_p = np.ascontiguousarray(inv_propensity, dtype=np.float64)
        if len(inv_p) != dataset.num_labels:
            raise ValueError(f"inv_propensity has {len(inv_p)} entries but the dataset has {dataset.num_labels} labels")
    pred, y_indptr, y_indices, kmax = _checked(
        pred_labels, dataset.y_indptr, dataset.y_indices, kmax, num_labels=None if inv_p is None else len(inv_p)
    )
    if inv_p is not None:
        _check_label_range(y_indices, len(inv_p))
    hits = np.empty((pred.shape[0], kmax), dtype=np.uint8)
    _hits(pred, y_indptr, y_indices, kmax, hits)
    counts = np.diff(y_indptr)
    out: dict[str, float] = {}
    for k in ks:
        out[f"p_at_{k}"] = _precision(hits, k)
    for k in ks:
        out[f"ndcg_at_{k}"] = _ndcg(hits, counts, k)
    if inv_p is not None:
        for k in ks:
            out[f"psp_at_{k}"] = _psp(hits, pred, y_indptr, y_indices, inv_p, k)
    return out


def _check_label_range(y_indices: np.ndarray, num_labels: int) -> None:
    if y_indices.size and (y_indices.min() < 0 or y_indices.max() >= num_labels):
        raise ValueError(
            f"true labels range over [{y_indices.min()}, {y_indices.max()}] but inv_propensity "
            f"has {num_labels} entries; compute propensities over all labels"
        )


def topk_recall(approx, exact) -> float:
    """Mean fraction of each row's exact top-k labels (ids >= 0) that the approximate top-k also returns."""
    approx = np.asarray(approx)
    exact = np.asarray(exact)
    if exact.shape[0] == 0:
        return 0.0
    hits = sum(
        len(set(a[a >= 0].tolist()) & set(e[e >= 0].tolist())) / max(1, int((e >= 0).sum()))
        for a, e in zip(approx, exact, strict=True)
    )
    return hits / exact.shape[0]


def evaluate_model(model, dataset, k: int = 5, mode: str = "auto", inv_propensity=None) -> dict:
    """Predict `dataset` with `model` and score it: p_at_1/3/5, ndcg_at_1/3/5, psp_at_* (with `inv_propensity`),
    `points`, `mean_scored` (labels scored per query), `mode` (the mode that answered) and, for a requested mode
    other than exact, `recall_vs_exact` (the share of the exact top-k it returns)."""
    if dataset.num_features > model.num_features or dataset.num_labels > model.num_labels:
        raise ValueError(
            f"the dataset has {dataset.num_features} features and {dataset.num_labels} labels; the model "
            f"{model.num_features} and {model.num_labels}: it is not in the model's feature and label space"
        )
    kk = min(max(5, int(k)), int(model.num_labels))
    args = (dataset.x_indptr, dataset.x_indices, dataset.x_values)
    pred, _, scored, used = model.predict_with_stats(*args, k=kk, mode=mode)
    out: dict = {"points": int(dataset.num_points), **evaluate(pred, dataset, inv_propensity=inv_propensity)}
    out["mean_scored"] = float(np.mean(scored)) if len(scored) else 0.0
    out["mode"] = used
    if mode != "exact":
        kr = min(int(k), int(model.num_labels))
        exact, _ = model.predict(*args, k=kr, mode="exact")
        out["recall_vs_exact"] = topk_recall(np.asarray(pred)[:, :kr], exact)
    return out


def softmax_rows(scores: list[list[float]]) -> list[list[float]]:
    """Softmax of each row of scores (rows may differ in length): probabilities over that row's labels only."""
    out: list[list[float]] = []
    for row in scores:
        if not row:
            out.append([])
            continue
        s = np.asarray(row, dtype=np.float64)
        e = np.exp(s - s.max())
        out.append((e / e.sum()).tolist())
    return out
