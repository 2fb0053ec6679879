"""PyTorch CPU dense baseline for the SLIDE network: sparse input -> 128 ReLU -> full softmax over all labels.

The fastest honest PyTorch we could write for this shape, so the engine is compared against a
serious baseline rather than a strawman:

- First layer: `nn.EmbeddingBag(mode="sum", per_sample_weights=...)` over the CSR input, i.e. a sparse
  x @ W1 that touches only the rows of the input's non-zero features; sparse gradients + `SparseAdam`.
- Output layer (num_labels x hidden, 86M weights on Amazon-670K) and softmax cross-entropy are written
  by hand instead of autograd through a (batch x num_labels) logits tensor: one preallocated buffer
  holds the logits, then (in place) the probabilities, then the gradient; the GEMMs write into
  preallocated outputs. The buffer is label-major (num_labels x batch): on this CPU that GEMM runs
  ~1.8x faster than the batch-major one.
- Same maths as autograd: multi-label target uniform over the point's labels (the SLIDE loss), mean
  over the points of the batch that have labels (points without labels contribute nothing); plain
  dense Adam (`fused=True`) on the output layer, since every output weight gets a gradient.
- Data order is exactly as given (or `epoch_order(epoch)` for a permutation shared with the engine).
  Evaluation time is not counted in `elapsed_s`, so runs can be compared at equal training wall time.

Usage: `train_torch_dense(train, test, ...) -> dict` and `predict_topk(model, dataset, k)`;
`python benchmarks/torch_dense.py` runs a self-check (gradients against autograd, learning on a small
planted problem) and `--speed` measures samples/s on an amazon670k-shaped problem.
torch is only a `bench` extra: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from engine.metrics import precision_at_k  # noqa: E402 (the engine's metric, so both report the same thing)
from engine.sparse import Dataset  # noqa: E402

EvalCallback = Callable[[dict], None]


class DenseSlideNet(nn.Module):
    """x (sparse) -> ReLU(x @ W1 + b1) -> W2 h + b2, one output row per label."""

    def __init__(self, num_features: int, num_labels: int, hidden: int = 128, init_std: float = 0.01):
        super().__init__()
        self.embedding = nn.EmbeddingBag(num_features, hidden, mode="sum", sparse=True)
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))
        self.out_weight = nn.Parameter(torch.empty(num_labels, hidden))
        self.out_bias = nn.Parameter(torch.zeros(num_labels))
        with torch.no_grad():
            self.embedding.weight.normal_(0.0, init_std)
            self.out_weight.normal_(0.0, init_std)

    @property
    def num_labels(self) -> int:
        return self.out_weight.shape[0]

    def hidden(self, batch: _Batch) -> torch.Tensor:
        """(b, hidden) activations of the hidden layer (autograd-tracked)."""
        pre = self.embedding(batch.indices, batch.offsets, per_sample_weights=batch.values)
        return torch.relu(pre + self.hidden_bias)


class _Batch:
    """One batch of CSR rows as the tensors EmbeddingBag wants, plus the labels as (row, label, weight)."""

    __slots__ = ("size", "indices", "offsets", "values", "label_ids", "label_cols", "label_weights", "labeled")

    def __init__(self, ds: Dataset, rows: np.ndarray | slice):
        if isinstance(rows, slice):
            xp = np.asarray(ds.x_indptr[rows.start : rows.stop + 1])
            yp = np.asarray(ds.y_indptr[rows.start : rows.stop + 1])
            idx = np.asarray(ds.x_indices[xp[0] : xp[-1]], dtype=np.int64)
            val = np.array(ds.x_values[xp[0] : xp[-1]], dtype=np.float32)
            lab = np.asarray(ds.y_indices[yp[0] : yp[-1]], dtype=np.int64)
            x_counts, y_counts = np.diff(xp), np.diff(yp)
        else:
            idx, val, x_counts = _gather_csr(ds.x_indptr, ds.x_indices, rows, ds.x_values)
            lab, _, y_counts = _gather_csr(ds.y_indptr, ds.y_indices, rows)
            idx, lab = idx.astype(np.int64), lab.astype(np.int64)
        n = len(x_counts)
        self.size = n
        self.indices = torch.from_numpy(idx)
        self.offsets = torch.from_numpy(np.concatenate(([0], np.cumsum(x_counts)[:-1])).astype(np.int64))
        self.values = torch.from_numpy(val)
        cols = np.repeat(np.arange(n, dtype=np.int64), y_counts)
        self.label_ids = torch.from_numpy(lab)
        self.label_cols = torch.from_numpy(cols)
        weights = (1.0 / np.maximum(y_counts, 1)).astype(np.float32)
        self.label_weights = torch.from_numpy(weights[cols])
        self.labeled = y_counts > 0  # numpy bool (n,)


def _gather_csr(indptr, indices, rows, values=None):
    rows = np.asarray(rows, dtype=np.int64)
    starts, stops = np.asarray(indptr)[rows], np.asarray(indptr)[rows + 1]
    counts = stops - starts
    take = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(counts.sum())
    vals = None if values is None else np.asarray(values, dtype=np.float32)[take]
    return np.asarray(indices)[take], vals, counts


class DenseTrainer:
    """Owns the model, the optimizers and the preallocated output-layer buffers."""

    def __init__(self, model: DenseSlideNet, batch_size: int, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        self.model = model
        self.batch_size = batch_size
        self.opt_sparse = torch.optim.SparseAdam([model.embedding.weight], lr=lr, betas=betas, eps=eps)
        self.opt_hidden_bias = torch.optim.Adam([model.hidden_bias], lr=lr, betas=betas, eps=eps)
        self.opt_out = torch.optim.Adam([model.out_weight, model.out_bias], lr=lr, betas=betas, eps=eps, fused=True)
        # Gradients of the output layer are written straight into these (no zeroing, no allocation).
        model.out_weight.grad = torch.empty_like(model.out_weight)
        model.out_bias.grad = torch.empty_like(model.out_bias)
        self.buffer = torch.empty(model.num_labels * batch_size)  # logits -> probabilities -> dlogits

    def step(self, batch: _Batch) -> float:
        """One Adam step on `batch`; returns the mean cross-entropy over its labeled points (nan if none)."""
        loss = self.compute_gradients(batch)
        if not math.isnan(loss):
            self.opt_out.step()
            self.opt_sparse.step()
            self.opt_hidden_bias.step()
        return loss

    def compute_gradients(self, batch: _Batch) -> float:
        """Forward + backward: fills the .grad of every parameter; returns the loss."""
        m, b = self.model, batch.size
        n_labeled = int(batch.labeled.sum())
        if n_labeled == 0:
            return float("nan")
        h = m.hidden(batch)  # (b, H), autograd graph through EmbeddingBag + bias + ReLU only
        hd = h.detach()
        z = self.buffer[: m.num_labels * b].view(m.num_labels, b)  # (L, b), label-major
        with torch.no_grad():
            torch.addmm(m.out_bias.unsqueeze(1), m.out_weight, hd.t(), out=z)
            torch.ops.aten._softmax.out(z, 0, False, out=z)  # column-wise softmax, in place
            p_true = z[batch.label_ids, batch.label_cols]
            loss = -(torch.log(p_true.clamp_min(1e-30)) * batch.label_weights).sum().item() / n_labeled
            # dL/dz = (p - target) / n_labeled, target = 1/|labels| on each of the point's labels
            z.index_put_((batch.label_ids, batch.label_cols), -batch.label_weights, accumulate=True)
            if n_labeled < b:
                z[:, torch.from_numpy(~batch.labeled)] = 0.0
            scale = 1.0 / n_labeled
            m.out_weight.grad.addmm_(z, hd, beta=0.0, alpha=scale)  # (L, b) @ (b, H)
            torch.sum(z, 1, out=m.out_bias.grad).mul_(scale)
            grad_h = torch.mm(z.t(), m.out_weight).mul_(scale)  # (b, H), before the weights move
        m.embedding.weight.grad = None
        m.hidden_bias.grad = None
        h.backward(grad_h)
        return loss


@torch.no_grad()
def predict_topk(
    model: DenseSlideNet, dataset: Dataset, k: int = 5, batch_size: int = 128, buffer: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over all labels: (labels int64 (N, k), scores float32 (N, k)); scores are logits.

    `buffer` (>= batch_size * num_labels floats, e.g. a trainer's) avoids allocating the logits block.
    """
    n, k = dataset.num_points, min(k, model.num_labels)
    labels = np.empty((n, k), np.int64)
    scores = np.empty((n, k), np.float32)
    if buffer is None or buffer.numel() < batch_size * model.num_labels:
        buffer = torch.empty(min(batch_size, max(n, 1)) * model.num_labels)
    for s in range(0, n, batch_size):
        e = min(n, s + batch_size)
        batch = _Batch(dataset, slice(s, e))
        z = buffer[: (e - s) * model.num_labels].view(e - s, model.num_labels)  # batch-major: fast top-k
        torch.addmm(model.out_bias, model.hidden(batch), model.out_weight.t(), out=z)
        top = torch.topk(z, k, dim=1)
        labels[s:e], scores[s:e] = top.indices.numpy(), top.values.numpy()
    return labels, scores


def engine_eval_rows(num_test: int, eval_points: int, seed: int) -> np.ndarray:
    """The test subset the engine's Trainer evaluates on, so both report on the same points."""
    from engine.trainer import eval_rows

    return eval_rows(num_test, eval_points or None, seed)  # 0 = all


def train_torch_dense(
    train: Dataset,
    test: Dataset | None,
    hidden: int = 128,
    batch_size: int = 128,
    lr: float = 1e-3,
    epochs: int = 1,
    time_budget_s: float | None = None,
    threads: int = 2,
    seed: int = 0,
    eval_points: int = 2000,
    eval_rows: np.ndarray | None = None,
    eval_every_s: float | None = None,
    eval_every_samples: int | None = None,
    epoch_order: Callable[[int], np.ndarray] | None = None,
    init_std: float = 0.01,
    on_eval: EvalCallback | None = None,
    return_model: bool = False,
) -> dict:
    """Train the dense network on `train`, evaluating P@1/P@5 on `test` along the way.

    Evaluations happen every `eval_every_s` seconds of training and/or every `eval_every_samples`
    samples, at the end of each epoch and when the `time_budget_s` of training time runs out.
    `eval_rows` (else `eval_points` chosen like the engine does, 0 = all) selects the test points.
    `epoch_order(epoch)` gives the order of the training points in an epoch (default: as stored); pass
    an engine `Trainer`'s `epoch_order` to train on exactly the engine's per-epoch permutations.
    Each evaluation record holds step, epoch, samples, elapsed_s (training only), eval_s, wall_s,
    samples_per_s, loss (mean since the previous record), p_at_1, p_at_5; `on_eval` gets each one.
    """
    if train.num_features != (test.num_features if test else train.num_features) or (
        test is not None and test.num_labels != train.num_labels
    ):
        raise ValueError("train and test must have the same num_features and num_labels")
    if train.num_points == 0:
        raise ValueError("the training set has no points")
    if threads < 1 or batch_size < 1 or hidden < 1:
        raise ValueError(f"threads, batch_size and hidden must be >= 1; got {threads}, {batch_size}, {hidden}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = DenseSlideNet(train.num_features, train.num_labels, hidden, init_std)
    trainer = DenseTrainer(model, batch_size, lr)
    if test is not None and eval_rows is None:
        eval_rows = engine_eval_rows(test.num_points, eval_points, seed)
    eval_set = None if test is None or len(eval_rows) == 0 else _take(test, eval_rows)

    records: list[dict] = []
    n = train.num_points
    step = samples = 0
    train_s = eval_total_s = 0.0
    loss_sum, loss_n = 0.0, 0
    last_eval_s, last_eval_samples = 0.0, 0
    wall0 = time.perf_counter()

    def evaluate(epoch_pos: float) -> None:
        nonlocal eval_total_s, loss_sum, loss_n, last_eval_s, last_eval_samples
        t0 = time.perf_counter()
        rec = {
            "step": step,
            "epoch": round(epoch_pos, 4),
            "samples": samples,
            "elapsed_s": train_s,
            "samples_per_s": samples / train_s if train_s else 0.0,
            "loss": loss_sum / loss_n if loss_n else None,
            "p_at_1": None,
            "p_at_5": None,
        }
        if eval_set is not None:
            pred, _ = predict_topk(model, eval_set, 5, batch_size=batch_size, buffer=trainer.buffer)
            rec["p_at_1"] = precision_at_k(pred, eval_set.y_indptr, eval_set.y_indices, 1)
            rec["p_at_5"] = precision_at_k(pred, eval_set.y_indptr, eval_set.y_indices, 5)
        rec["eval_s"] = time.perf_counter() - t0
        eval_total_s += rec["eval_s"]
        rec["wall_s"] = time.perf_counter() - wall0
        records.append(rec)
        loss_sum, loss_n = 0.0, 0
        last_eval_s, last_eval_samples = train_s, samples
        if on_eval is not None:
            on_eval(rec)

    stopped = False
    for epoch in range(epochs):
        order = None if epoch_order is None else np.asarray(epoch_order(epoch), dtype=np.int64)
        if order is not None and len(order) != n:
            raise ValueError(f"epoch_order({epoch}) has {len(order)} entries for {n} training points")
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            t0 = time.perf_counter()
            batch = _Batch(train, slice(s, e) if order is None else order[s:e])
            loss = trainer.step(batch)
            train_s += time.perf_counter() - t0
            step += 1
            samples += e - s
            if not math.isnan(loss):
                loss_sum, loss_n = loss_sum + loss, loss_n + 1
            out_of_time = time_budget_s is not None and train_s >= time_budget_s
            if out_of_time or e == n:
                break
            if (eval_every_s and train_s - last_eval_s >= eval_every_s) or (
                eval_every_samples and samples - last_eval_samples >= eval_every_samples
            ):
                evaluate(epoch + e / n)
        evaluate(epoch + e / n)
        if time_budget_s is not None and train_s >= time_budget_s:
            stopped = epoch + 1 < epochs or e < n
            break

    result = {
        "records": records,
        "samples": samples,
        "steps": step,
        "train_s": train_s,
        "eval_s": eval_total_s,
        "samples_per_s": samples / train_s if train_s else 0.0,
        "stopped_by_budget": stopped,
        "p_at_1": records[-1]["p_at_1"] if records else None,
        "p_at_5": records[-1]["p_at_5"] if records else None,
        "config": {
            "hidden": hidden,
            "batch_size": batch_size,
            "lr": lr,
            "epochs": epochs,
            "threads": threads,
            "seed": seed,
            "init_std": init_std,
            "time_budget_s": time_budget_s,
            "eval_points": 0 if eval_set is None else eval_set.num_points,
        },
        "versions": {"torch": torch.__version__, "numpy": np.__version__},
    }
    if return_model:
        result["model"] = model
    return result


def _take(ds: Dataset, rows: np.ndarray) -> Dataset:
    rows = np.asarray(rows, dtype=np.int64)
    xi, xv, xc = _gather_csr(ds.x_indptr, ds.x_indices, rows, ds.x_values)
    yi, _, yc = _gather_csr(ds.y_indptr, ds.y_indices, rows)
    return Dataset(
        np.concatenate(([0], np.cumsum(xc))).astype(np.int64),
        xi.astype(np.int32),
        xv,
        np.concatenate(([0], np.cumsum(yc))).astype(np.int64),
        yi.astype(np.int32),
        ds.num_features,
        ds.num_labels,
    )


# ------------------------------------------------------------------------------------------------
# Self-check: `python benchmarks/torch_dense.py [--speed [N_POINTS]]`


def planted_dataset(
    num_points: int,
    num_features: int,
    num_labels: int,
    seed: int = 0,
    feats_per_point: int = 40,
    labels_per_point: float = 2.0,
    feats_per_label: int = 20,
    noise: float = 0.3,
) -> Dataset:
    """Learnable synthetic data: Zipf label popularity, each label owns a few topic features; a point's features
    are drawn from its labels' topic features plus `noise` fraction of uniform ones. Rows are vectorised."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, num_labels + 1) ** 0.8
    pop = rng.permutation(pop / pop.sum())
    topics = rng.integers(0, num_features, size=(num_labels, feats_per_label))
    n_lab = np.clip(rng.poisson(labels_per_point - 1, num_points) + 1, 1, 8)
    y_indptr = np.concatenate(([0], np.cumsum(n_lab))).astype(np.int64)
    y = rng.choice(num_labels, size=int(y_indptr[-1]), p=pop).astype(np.int32)
    nf = np.full(num_points, feats_per_point)
    owner = np.repeat(np.arange(num_points), nf)
    pick = y_indptr[owner] + (rng.random(len(owner)) * n_lab[owner]).astype(np.int64)  # one of the point's labels
    feats = topics[y[pick], rng.integers(0, feats_per_label, len(owner))]
    is_noise = rng.random(len(owner)) < noise
    feats[is_noise] = rng.integers(0, num_features, int(is_noise.sum()))
    # sort + dedupe per row (sum duplicate weights)
    key = owner.astype(np.int64) * num_features + feats
    uniq, counts = np.unique(key, return_counts=True)
    rows, cols = uniq // num_features, (uniq % num_features).astype(np.int32)
    x_indptr = np.concatenate(([0], np.cumsum(np.bincount(rows, minlength=num_points)))).astype(np.int64)
    vals = counts.astype(np.float32)
    norms = np.sqrt(np.add.reduceat(vals**2, x_indptr[:-1]))
    vals /= np.repeat(norms, np.diff(x_indptr))
    # dedupe labels within a row
    lkey = np.repeat(np.arange(num_points, dtype=np.int64), n_lab) * num_labels + y
    lu = np.unique(lkey)
    y_indptr = np.concatenate(([0], np.cumsum(np.bincount(lu // num_labels, minlength=num_points)))).astype(np.int64)
    return Dataset(x_indptr, cols, vals, y_indptr, (lu % num_labels).astype(np.int32), num_features, num_labels)


def _check_gradients() -> None:
    """Hand-written output layer + loss == autograd through log_softmax, unlabeled points included."""
    torch.manual_seed(1)
    ds = planted_dataset(7, 50, 30, seed=3, feats_per_point=6)
    ds = Dataset(
        ds.x_indptr,
        ds.x_indices,
        ds.x_values,  # make point 2 label-less
        np.concatenate((ds.y_indptr[:3], ds.y_indptr[3:] - (ds.y_indptr[3] - ds.y_indptr[2]))),
        np.concatenate((ds.y_indices[: ds.y_indptr[2]], ds.y_indices[ds.y_indptr[3] :])),
        50,
        30,
    )
    model = DenseSlideNet(50, 30, hidden=8, init_std=0.3)
    trainer = DenseTrainer(model, batch_size=8)
    batch = _Batch(ds, slice(0, 7))
    loss = trainer.compute_gradients(batch)
    got = [
        model.out_weight.grad.clone(),
        model.out_bias.grad.clone(),
        model.hidden_bias.grad.clone(),
        model.embedding.weight.grad.to_dense().clone(),
    ]
    for p in model.parameters():
        p.grad = None
    logits = model.hidden(batch) @ model.out_weight.t() + model.out_bias
    target = torch.zeros_like(logits)
    target.index_put_((batch.label_cols, batch.label_ids), batch.label_weights, accumulate=True)
    ref_loss = -(target * torch.log_softmax(logits, 1)).sum() / int(batch.labeled.sum())
    ref_loss.backward()
    want = [model.out_weight.grad, model.out_bias.grad, model.hidden_bias.grad, model.embedding.weight.grad.to_dense()]
    assert abs(loss - ref_loss.item()) < 1e-5 * max(1.0, abs(loss)), (loss, ref_loss.item())
    for name, g, w in zip(("out_weight", "out_bias", "hidden_bias", "embedding"), got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), f"{name}: max diff {(g - w).abs().max().item()}"
    print(f"gradients match autograd (loss {loss:.5f})")


def _check_learning() -> None:
    try:
        from engine.synth import generate  # noqa: PLC0415 (written concurrently; used when present)

        train, test = generate("tiny")[:2]
        source = "engine.synth tiny"
    except (ImportError, TypeError, ValueError):
        full = planted_dataset(6000, 2000, 500, seed=0)
        train, test = full.row_slice(0, 5000), full.row_slice(5000, 6000)
        source = "planted numpy data"
    counts = train.label_counts()
    popular = np.argsort(-counts)[:5]
    pop_p1 = precision_at_k(np.tile(popular, (test.num_points, 1)), test.y_indptr, test.y_indices, 1)
    # lr 1e-2: at 1e-3 (the benchmark's setting, thousands of steps) 120 steps sit on the popularity plateau.
    res = train_torch_dense(
        train,
        test,
        epochs=3,
        batch_size=128,
        lr=1e-2,
        threads=2,
        eval_points=0,
        on_eval=lambda r: print(
            f"  epoch {r['epoch']:.2f} loss {r['loss']:.3f} "
            f"P@1 {r['p_at_1']:.3f} P@5 {r['p_at_5']:.3f} "
            f"{r['samples_per_s']:.0f} samples/s"
        ),
    )
    print(
        f"{source}: {train.num_points} train / {test.num_points} test points, {train.num_labels} labels; "
        f"P@1 {res['p_at_1']:.3f} vs popularity {pop_p1:.3f}"
    )
    assert res["p_at_1"] > max(3 * pop_p1, pop_p1 + 0.2), "the dense baseline did not learn"


def _amazon_shaped(num_train: int, num_test: int) -> tuple[Dataset, Dataset, str]:
    """Amazon-670K shape: 135,909 features, 670,091 labels, ~75 features and ~5.4 labels per point."""
    try:
        from engine.synth import generate  # noqa: PLC0415

        train, test = generate("amazon670k", num_train=num_train, num_test=num_test)
        return train, test, "engine.synth amazon670k"
    except ImportError:
        ds = planted_dataset(num_train + num_test, 135_909, 670_091, seed=0, feats_per_point=75, labels_per_point=5.4)
        return ds.row_slice(0, num_train), ds.row_slice(num_train, num_train + num_test), "planted numpy data"


def _measure_speed(num_points: int = 3000, threads: int = 2) -> None:
    train, test, source = _amazon_shaped(num_points, 256)
    res = train_torch_dense(
        train,
        test,
        epochs=1,
        threads=threads,
        eval_points=256,
        eval_every_samples=num_points // 3,
        on_eval=lambda r: print(
            f"  {r['samples']} samples in {r['elapsed_s']:.1f}s: "
            f"{r['samples_per_s']:.1f} samples/s (eval {r['eval_s']:.1f}s)"
        ),
    )
    print(
        f"{source}, {train.nnz / train.num_points:.0f} features/point, {threads} threads, batch 128: "
        f"{res['samples_per_s']:.1f} samples/s ({res['train_s'] / res['steps'] * 1000:.0f} ms/step, "
        f"torch {torch.__version__})"
    )


def _autograd_reference_speed(steps: int = 6, threads: int = 2, batch_size: int = 128) -> None:
    """The same network written the plain way (nn.Linear + cross_entropy + Adam through autograd), for scale."""
    train, _, _ = _amazon_shaped(batch_size * (steps + 1), 0)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DenseSlideNet(train.num_features, train.num_labels)
    opt_sparse = torch.optim.SparseAdam([model.embedding.weight], lr=1e-3)
    opt_dense = torch.optim.Adam([model.hidden_bias, model.out_weight, model.out_bias], lr=1e-3)
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        batch = _Batch(train, slice(i * batch_size, (i + 1) * batch_size))
        logits = torch.nn.functional.linear(model.hidden(batch), model.out_weight, model.out_bias)
        target = torch.zeros_like(logits)
        target.index_put_((batch.label_cols, batch.label_ids), batch.label_weights, accumulate=True)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt_sparse.zero_grad(set_to_none=True)
        opt_dense.zero_grad(set_to_none=True)
        loss.backward()
        opt_sparse.step()
        opt_dense.step()
        times.append(time.perf_counter() - t0)
    ms = float(np.median(times[1:])) * 1000
    print(f"plain autograd reference: {ms:.0f} ms/step = {batch_size / ms * 1000:.1f} samples/s")


if __name__ == "__main__":
    _check_gradients()
    if "--speed" in sys.argv:
        rest = [a for a in sys.argv[sys.argv.index("--speed") + 1 :] if a.isdigit()]
        _measure_speed(int(rest[0]) if rest else 3000)
        if "--autograd" in sys.argv:
            _autograd_reference_speed()
    else:
        _check_learning()
