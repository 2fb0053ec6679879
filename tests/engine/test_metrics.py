"""Metrics against hand-computed cases and a naive pure-Python twin on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.metrics import (
    evaluate,
    hit_matrix,
    ndcg_at_k,
    precision_at_k,
    propensity_scores,
    psp_at_k,
)
from engine.sparse import Dataset


def csr(rows):
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.array([x for r in rows for x in r], dtype=np.int32)
    return indptr, indices


# --- naive twins: one point at a time, straight from the definitions -----------------------


def naive_hits(pred_row, labels, k):
    seen, hits = set(), []
    for j in range(k):
        lab = pred_row[j] if j < len(pred_row) else -1
        hits.append(1 if lab >= 0 and lab in labels and lab not in seen else 0)
        seen.add(lab)
    return hits


def naive_p(pred, rows, k):
    return sum(sum(naive_hits(p, set(r), k)) for p, r in zip(pred, rows, strict=True)) / (len(rows) * k)


def naive_ndcg(pred, rows, k):
    total = 0.0
    for p, r in zip(pred, rows, strict=True):
        if not r:
            continue
        dcg = sum(h / math.log2(j + 2) for j, h in enumerate(naive_hits(p, set(r), k)))
        idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(r))))
        total += dcg / idcg
    return total / len(rows)


def naive_psp(pred, rows, w, k):
    num = den = 0.0
    for p, r in zip(pred, rows, strict=True):
        hits = naive_hits(p, set(r), k)
        num += sum(w[p[j]] for j in range(k) if hits[j])
        den += sum(sorted((w[label] for label in r), reverse=True)[:k])
    return num / den


# --- hand-computed ---------------------------------------------------------------------------


def test_hand_computed_small_case():
    rows = [[1, 2], [3], []]
    pred = np.array([[2, 5, 1], [0, 3, -1], [4, -1, -1]])
    yp, yi = csr(rows)
    # hits: [1,0,1], [0,1,0], [0,0,0]
    assert precision_at_k(pred, yp, yi, 1) == pytest.approx(1 / 3)
    assert precision_at_k(pred, yp, yi, 3) == pytest.approx(3 / 9)
    d = 1 / np.log2([2, 3, 4])
    expected_ndcg3 = ((d[0] + d[2]) / (d[0] + d[1]) + d[1] / d[0] + 0.0) / 3
    assert ndcg_at_k(pred, yp, yi, 3) == pytest.approx(expected_ndcg3)
    assert ndcg_at_k(pred, yp, yi, 1) == pytest.approx(1 / 3)
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    # achieved: point0 -> w2 + w1 = 5, point1 -> w3 = 4; best@3: (3+2) + 4 = 9
    assert psp_at_k(pred, yp, yi, w, 3) == pytest.approx(9 / 9)
    # @1: achieved w2 = 3 (point1's first guess misses); best@1: max(w1, w2) + w3 = 3 + 4
    assert psp_at_k(pred, yp, yi, w, 1) == pytest.approx(3 / 7)


def test_padding_repeats_and_short_rows_are_misses():
    yp, yi = csr([[7, 8]])
    assert precision_at_k(np.array([[7, 7, 7]]), yp, yi, 3) == pytest.approx(1 / 3)
    assert precision_at_k(np.array([[-1, 8]]), yp, yi, 2) == pytest.approx(1 / 2)
    assert precision_at_k(np.array([[8]]), yp, yi, 5) == pytest.approx(1 / 5)  # width < k
    np.testing.assert_array_equal(hit_matrix(np.array([[8, 8, 7]]), yp, yi, 3), [[1, 0, 1]])


def test_points_without_labels_count_in_the_denominator():
    yp, yi = csr([[1], []])
    pred = np.array([[1], [1]])
    assert precision_at_k(pred, yp, yi, 1) == 0.5
    assert ndcg_at_k(pred, yp, yi, 1) == 0.5


def test_perfect_prediction_scores_one():
    rows = [[3, 1, 4], [0], [2, 5]]
    yp, yi = csr(rows)
    w = propensity_scores(np.array([5, 1, 9, 2, 1, 30]), 50)
    best = np.array([sorted(r, key=lambda label: -w[label]) + [-1] * (5 - len(r)) for r in rows])
    assert ndcg_at_k(best, yp, yi, 5) == pytest.approx(1.0)
    assert psp_at_k(best, yp, yi, w, 1) == pytest.approx(1.0)
    assert psp_at_k(best, yp, yi, w, 5) == pytest.approx(1.0)
    assert precision_at_k(best, yp, yi, 1) == 1.0


def test_propensity_formula_and_ordering():
    counts = np.array([0, 1, 10, 1000])
    n = 5000
    A, B = 0.55, 1.5
    c = (math.log(n) - 1) * (B + 1) ** A
    expected = [1 + c * (x + B) ** -A for x in counts]
    got = propensity_scores(counts, n)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected)
    assert np.all(np.diff(got) < 0) and np.all(got > 1)  # rarer labels weigh more
    np.testing.assert_allclose(
        propensity_scores(counts, n, 0.6, 2.6), 1 + (math.log(n) - 1) * 3.6**0.6 * (counts + 2.6) ** -0.6
    )
    with pytest.raises(ValueError, match="num_points"):
        propensity_scores(counts, 0)


# --- against the naive twin --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_random_against_naive(seed):
    rng = np.random.default_rng(seed)
    n, L = 200, 30
    rows = [list(rng.choice(L, rng.integers(0, 8), replace=False)) for _ in range(n)]
    width = int(rng.integers(1, 7))
    pred = rng.integers(-1, L, (n, width))
    pred[rng.random((n, width)) < 0.1] = -1
    yp, yi = csr(rows)
    w = propensity_scores(np.bincount(yi, minlength=L), n)
    plist = pred.tolist()
    for k in (1, 3, 5):
        assert precision_at_k(pred, yp, yi, k) == pytest.approx(naive_p(plist, rows, k))
        assert ndcg_at_k(pred, yp, yi, k) == pytest.approx(naive_ndcg(plist, rows, k))
        padded = [p + [-1] * (k - len(p)) for p in plist]
        assert psp_at_k(pred, yp, yi, w, k) == pytest.approx(naive_psp(padded, rows, w, k))


def test_evaluate_keys_and_values_match_single_metrics():
    rng = np.random.default_rng(9)
    n, L = 100, 20
    rows = [list(rng.choice(L, rng.integers(1, 5), replace=False)) for _ in range(n)]
    yp, yi = csr(rows)
    ds = Dataset(np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32), yp, yi, 1, L)
    pred = rng.integers(0, L, (n, 5)).astype(np.int32)
    w = propensity_scores(ds.label_counts(), n)
    res = evaluate(pred, ds, inv_propensity=w)
    assert set(res) == {f"{m}_at_{k}" for m in ("p", "ndcg", "psp") for k in (1, 3, 5)}
    for k in (1, 3, 5):
        assert res[f"p_at_{k}"] == pytest.approx(precision_at_k(pred, yp, yi, k))
        assert res[f"ndcg_at_{k}"] == pytest.approx(ndcg_at_k(pred, yp, yi, k))
        assert res[f"psp_at_{k}"] == pytest.approx(psp_at_k(pred, yp, yi, w, k))
    assert set(evaluate(pred, ds, ks=(1, 10))) == {"p_at_1", "p_at_10", "ndcg_at_1", "ndcg_at_10"}


def test_bad_inputs_say_how_to_fix():
    yp, yi = csr([[1], [2]])
    with pytest.raises(ValueError, match="rows but the labels describe 2 points"):
        precision_at_k(np.zeros((3, 1), int), yp, yi, 1)
    with pytest.raises(ValueError, match="integer array"):
        precision_at_k(np.zeros((2, 1)), yp, yi, 1)
    with pytest.raises(ValueError, match="-1 marks padding"):
        precision_at_k(np.full((2, 1), -2), yp, yi, 1)
    with pytest.raises(ValueError, match="inv_propensity has only 2"):
        psp_at_k(np.full((2, 1), 5), yp, yi, np.ones(2), 1)
    with pytest.raises(ValueError, match="k must be"):
        precision_at_k(np.zeros((2, 1), int), yp, yi, 0)


def test_empty_evaluation_is_zero():
    yp, yi = csr([])
    assert precision_at_k(np.zeros((0, 5), int), yp, yi, 5) == 0.0
    assert ndcg_at_k(np.zeros((0, 5), int), yp, yi, 5) == 0.0
