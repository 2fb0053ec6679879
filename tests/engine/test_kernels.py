"""Forward/backward, lazy Adam and prediction kernels against the naive numpy twins."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from engine import lsh, schedule, tables
from engine._numba import set_threads
from engine.config import ModelConfig, SamplingConfig, SlideConfig, with_settings
from engine.kernels.forward import hidden_dropout, sparse_input_layer
from engine.kernels.lowlevel import float_bits, float_from_bits, store_weight
from engine.kernels.optimizer import adam_row, adam_row_bf16, from_bfloat16, group_by_row, row_salt, to_bfloat16
from engine.network import SlideModel
from engine.resolve import output_loss
from engine.trainer import Trainer

from . import naive

F, L = 24, 40


@pytest.fixture(autouse=True)
def one_thread():
    set_threads(1)
    yield
    set_threads(None)


@pytest.fixture(scope="module")
def data():
    return naive.planted_dataset(40, F, L, seed=1, vocab=5, noise=2, max_labels=3)


def exact_config(settings: dict) -> SlideConfig:
    """A config with float32 weights and these settings (by path): these tests hold the engine to float64
    textbook Adam, which bfloat16 storage would only meet within its resolution (tested on its own below)."""
    return with_settings(SlideConfig(model=ModelConfig(weight_dtype="float32", sample_output=True)), settings)


def small_simhash_config(settings: dict) -> SlideConfig:
    """exact_config of a 16-wide hidden layer and a sampled output layer with 6 SimHash tables of 4 bits, and these
    settings on top."""
    base = {"model.hidden": (16,), "sampling.hash_family": "simhash", "sampling.hash_k": 4, "sampling.hash_l": 6}
    return exact_config({**base, **settings})


def snapshot_params(model):
    """float64 copies of (w0, b0, [w1, ...])."""
    return (
        model.float_weights(0).astype(np.float64),
        model.b0.astype(np.float64),
        [model.float_weights(layer).astype(np.float64) for layer in range(1, model.depth)],
    )


def batch(data, points):
    x = naive.dense_rows(data.x_indptr, data.x_indices, data.x_values, data.num_features, points)
    return x, naive.label_lists(data.y_indptr, data.y_indices, points)


def rows(data, n):
    """CSR arrays of the first n points."""
    sub = data.row_slice(0, n)
    return sub.x_indptr, sub.x_indices, sub.x_values


def engine_hidden(model, data, p):
    """The input layer's output for point p, computed by the engine's own kernel: a query's SimHash bits
    depend on the last bit of h, and the kernels may fuse or reorder float operations."""
    h = np.empty(model.b0.shape[0], dtype=np.float32)
    sparse_input_layer(
        model.weights[0], model.b0, data.x_indices, data.x_values, data.x_indptr[p], data.x_indptr[p + 1], h
    )
    s, e = data.x_indptr[p], data.x_indptr[p + 1]
    want = naive.hidden_float32(model.weights[0], model.b0, data.x_indices[s:e], data.x_values[s:e])
    np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-6)
    return h


def active_masks(trainer, n_points):
    """{layer: bool (b, out)} of the neurons each point of the last batch computed (sampled layers)."""
    act_ids, nact = trainer._bufs.act.act_ids, trainer._bufs.act.nact
    masks = {}
    for layer in trainer.model.sampled_layers():
        mask = np.zeros((n_points, trainer.model.weights[layer].shape[0]), dtype=bool)
        for i in range(n_points):
            mask[i, act_ids[layer - 1][i, : nact[i, layer]]] = True
        masks[layer] = mask
    return masks


class NaiveAdam:
    """Lazy Adam over (w0, b0, [w1, ...]) in float64, with the engine's choice of touched rows; the first
    moment of a sampled layer is stored rounded to bfloat16 when the config says so."""

    def __init__(self, params, cfg, resolved):
        """resolved: the trainer's resolved settings (the warm-up and epoch length of the step-size schedule)."""
        self.w0, self.b0, self.ws = params
        self.cfg = cfg
        self.sigmoid = output_loss(cfg, self.ws[-1].shape[0]) == "sigmoid"
        self.warmup = resolved.lr_warmup_steps
        self.steps_per_epoch = resolved.steps_per_epoch
        shapes = [self.w0.shape] + [w.shape for w in self.ws]
        self.m = [np.zeros(s) for s in shapes]
        self.v = [np.zeros(s) for s in shapes]
        self.steps = [np.zeros(s[0], dtype=np.int64) for s in shapes]
        self.mb0, self.vb0 = np.zeros_like(self.b0), np.zeros_like(self.b0)
        self.t = 0

    def step(self, x, labels, active=None, keep=None, shift=None, dropout=None):
        """keep: the output deltas kept (hard negatives); the output rows none of them touch take no step.
        shift: the output logits' log-Q correction (random negatives). dropout: naive.forward's."""
        cfg = self.cfg
        epochs = self.t / self.steps_per_epoch
        sched = cfg.schedule
        # no validation split: no plateau cuts
        lr = cfg.optimizer.lr * schedule.lr_factor(self.t, self.warmup, 0, sched.lr_decay, epochs, sched.lr_epoch_decay)
        hp = (lr, cfg.optimizer.beta1, cfg.optimizer.beta2, cfg.optimizer.eps)
        g_w0, g_b0, gs = naive.gradients(
            self.w0, self.b0, self.ws, x, labels, active, keep, shift, dropout, sigmoid=self.sigmoid
        )
        rows0 = np.flatnonzero(np.any(x != 0, axis=0))
        naive.adam_rows(self.w0, self.m[0], self.v[0], self.steps[0], g_w0, rows0, *hp)
        for layer, (w, g) in enumerate(zip(self.ws, gs, strict=True), start=1):
            if keep is not None and layer == len(self.ws):
                labelled = np.array([len(y) > 0 for y in labels])
                rows = np.flatnonzero((keep & labelled[:, None]).any(axis=0))
            elif active and layer in active:
                rows = np.flatnonzero(active[layer].any(axis=0))
            else:
                rows = np.arange(w.shape[0])
            naive.adam_rows(w, self.m[layer], self.v[layer], self.steps[layer], g, rows, *hp)
            if active and layer in active and cfg.optimizer.moment_dtype == "bfloat16":
                self.m[layer][rows] = from_bfloat16(to_bfloat16(self.m[layer][rows]))
        self.t += 1
        naive.adam_vector(self.b0, self.mb0, self.vb0, self.t, g_b0, *hp)
        return g_w0, g_b0, gs

    def assert_matches(self, trainer, rtol=1e-4, atol_w=None):
        model = trainer.model
        atol_w = atol_w if atol_w is not None else 1e-3 * self.cfg.optimizer.lr
        ours = [self.w0, *self.ws]
        for layer, w in enumerate(model.weights):
            np.testing.assert_array_equal(
                trainer.adam.steps[layer], self.steps[layer], err_msg=f"step counts of layer {layer}"
            )
            m = trainer.adam.m[layer]
            if m.dtype == np.uint16:
                # one bfloat16 step (2^-8) where float32 and float64 round a value to different sides
                np.testing.assert_allclose(
                    from_bfloat16(m), self.m[layer], rtol=2**-7, atol=1e-9, err_msg=f"m of layer {layer}"
                )
            else:
                # a gradient summed with cancellation keeps float32's error of its largest terms, so a
                # tiny m (or v) may differ by more than rtol of itself: allow a little of the largest too
                atol_m = max(1e-9, 1e-5 * float(np.abs(self.m[layer]).max(initial=0.0)))
                np.testing.assert_allclose(m, self.m[layer], rtol=rtol, atol=atol_m, err_msg=f"m of layer {layer}")
            atol_v = max(1e-12, 1e-6 * float(np.abs(self.v[layer]).max(initial=0.0)))
            np.testing.assert_allclose(
                trainer.adam.v[layer], self.v[layer], rtol=rtol, atol=atol_v, err_msg=f"v of layer {layer}"
            )
            np.testing.assert_allclose(w, ours[layer], rtol=rtol, atol=atol_w, err_msg=f"weights of layer {layer}")
        np.testing.assert_allclose(model.b0, self.b0, rtol=rtol, atol=atol_w)
        np.testing.assert_allclose(trainer.adam.mb0, self.mb0, rtol=rtol, atol=1e-9)


# ---- dense training step == naive gradient + naive lazy Adam -----------------------------------------
DENSE_STEP = {
    "model.sample_output": False,
    "optimizer.batch_size": 6,
    "optimizer.lr": 1e-2,
    "model.init_std": 0.3,
    "seed": 4,
}
"""A dense network small enough for the naive twin, stepped on batches of 6 (tests of one training step)."""


@pytest.mark.parametrize("hidden", [(8,), (8, 6)])
@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
def test_dense_train_step_is_naive_adam_on_the_naive_gradient(data, hidden, loss_name):
    cfg = exact_config({**DENSE_STEP, "model.hidden": hidden, "model.loss": loss_name})
    trainer = Trainer(cfg, data)
    ref = NaiveAdam(snapshot_params(trainer.model), cfg, trainer.resolved())
    assert ref.sigmoid == (loss_name == "sigmoid")
    # Two full batches and a partial one (4 < batch_size); features and rows overlap between batches.
    for points in ([0, 1, 2, 3, 4, 5], [3, 7, 9, 11, 13, 2], [20, 21, 22, 0]):
        points = np.array(points)
        x, labels = batch(data, points)
        expected_loss = naive.loss(ref.w0, ref.b0, ref.ws, x, labels, sigmoid=ref.sigmoid)
        loss, labelled, active = trainer.train_step(points)
        assert loss / len(points) == pytest.approx(expected_loss, rel=1e-5)
        assert labelled == sum(len(y) > 0 for y in labels)
        assert active == L  # every output neuron computed
        ref.step(x, labels)
        ref.assert_matches(trainer)
    assert trainer.step == 3


def dropout_factors(width, rate, seed, streams, layer):
    """float64 (len(streams), width): the engine's dropout factors of hidden layer `layer` for those
    points (0 = dropped, 1 / (1 - rate) = kept), from its own kernel applied to ones."""
    out = np.ones((len(streams), width), np.float32)
    for r, stream in enumerate(streams):
        hidden_dropout(out[r], rate, seed, stream, layer)
    return out.astype(np.float64)


@pytest.mark.parametrize("hidden", [(8,), (8, 6)])
def test_dropout_train_step_is_naive_adam_on_the_masked_network(data, hidden):
    """With hidden dropout, loss, gradients and Adam steps are the naive network's with the same units
    zeroed and the kept ones scaled, step after step (each point's mask keyed by its stream number)."""
    rate = 0.4
    cfg = exact_config({**DENSE_STEP, "model.hidden": hidden, "optimizer.hidden_dropout": rate})
    trainer = Trainer(cfg, data)
    ref = NaiveAdam(snapshot_params(trainer.model), cfg, trainer.resolved())
    seen = 0
    for points in ([0, 1, 2, 3, 4, 5], [3, 7, 9, 11, 13, 2], [20, 21, 22, 0]):
        points = np.array(points)
        x, labels = batch(data, points)
        streams = seen + np.arange(len(points))
        masks = [dropout_factors(width, rate, cfg.seed, streams, layer) for layer, width in enumerate(hidden)]
        assert all((m == 0).any() and (m > 0).any() for m in masks)
        expected_loss = naive.loss(ref.w0, ref.b0, ref.ws, x, labels, dropout=masks, sigmoid=ref.sigmoid)
        undropped = naive.loss(ref.w0, ref.b0, ref.ws, x, labels, sigmoid=ref.sigmoid)
        assert expected_loss != pytest.approx(undropped, rel=1e-3)
        loss, _, _ = trainer.train_step(points)
        assert loss / len(points) == pytest.approx(expected_loss, rel=1e-5)
        ref.step(x, labels, dropout=masks)
        ref.assert_matches(trainer)
        seen += len(points)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_drops_each_unit_with_its_rate_independently(rate):
    width, n = 256, 400
    f = dropout_factors(width, rate, 3, np.arange(n), 0)
    np.testing.assert_allclose(np.unique(f), [0.0, 1.0 / (1.0 - rate)], rtol=1e-6)
    dropped = f == 0
    sd = np.sqrt(rate * (1 - rate) / dropped.size)
    assert abs(dropped.mean() - rate) < 5 * sd
    per_unit, per_point = dropped.mean(axis=0), dropped.mean(axis=1)
    assert np.abs(per_unit - rate).max() < 5 * np.sqrt(rate * (1 - rate) / n)
    assert np.abs(per_point - rate).max() < 5 * np.sqrt(rate * (1 - rate) / width)
    # another layer, another seed: independent masks, agreeing where two coins would
    for other in (dropout_factors(width, rate, 3, np.arange(n), 1), dropout_factors(width, rate, 4, np.arange(n), 0)):
        agree = ((other == 0) == dropped).mean()
        assert abs(agree - (rate**2 + (1 - rate) ** 2)) < 5 * np.sqrt(0.25 / dropped.size)
    np.testing.assert_array_equal(dropout_factors(width, rate, 3, np.arange(n), 0), f)


@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
def test_first_moment_is_the_batch_gradient(data, loss_name):
    """After one step from zero state m = (1 - beta1) g exactly: the gradient itself, not just its sign."""
    cfg = exact_config(
        {
            "model.loss": loss_name,
            "model.hidden": (8, 6),
            "model.sample_output": False,
            "optimizer.batch_size": 8,
            "optimizer.lr": 1e-3,
            "model.init_std": 0.3,
            "seed": 2,
        }
    )
    trainer = Trainer(cfg, data)
    w0, b0, ws = snapshot_params(trainer.model)
    points = np.arange(8)
    x, labels = batch(data, points)
    trainer.train_step(points)
    g_w0, _, gs = naive.gradients(w0, b0, ws, x, labels, sigmoid=loss_name == "sigmoid")
    for layer, g in enumerate([g_w0, *gs]):
        assert np.abs(g).max() > 1e-4
        np.testing.assert_allclose(trainer.adam.m[layer] / (1 - cfg.optimizer.beta1), g, rtol=2e-4, atol=1e-8)


def test_unlabelled_points_contribute_no_gradient(data):
    """A point without labels has zero loss, so no layer may move because of it. With two hidden
    layers the backward pass returned early for such a point and left its forward activations in
    the buffer that the optimizer reads as deltas of the inner hidden layers."""
    unlabelled = naive.planted_dataset(8, F, L, seed=3, unlabelled=1.0)
    assert unlabelled.num_label_entries == 0
    for hidden in [(8,), (8, 6)]:
        cfg = exact_config(
            {
                "model.hidden": hidden,
                "model.sample_output": False,
                "optimizer.batch_size": 8,
                "optimizer.lr": 1e-2,
                "model.init_std": 0.3,
                "seed": 1,
            }
        )
        trainer = Trainer(cfg, unlabelled)
        before = [w.copy() for w in trainer.model.weights]
        loss, labelled, _ = trainer.train_step(np.arange(8))
        assert loss == 0.0 and labelled == 0
        for layer, (w0, w1) in enumerate(zip(before, trainer.model.weights, strict=True)):
            np.testing.assert_array_equal(w1, w0, err_msg=f"hidden={hidden}: layer {layer} moved")


@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
def test_mixed_batch_with_unlabelled_points_matches_naive(loss_name):
    mixed = naive.planted_dataset(12, F, L, seed=8, unlabelled=0.4)
    lens = np.diff(mixed.y_indptr)
    assert (lens == 0).any() and (lens > 0).any()
    cfg = exact_config(
        {
            "model.hidden": (8, 6),
            "model.sample_output": False,
            "optimizer.batch_size": 12,
            "optimizer.lr": 1e-2,
            "model.init_std": 0.3,
            "seed": 3,
            "model.loss": loss_name,
        }
    )
    trainer = Trainer(cfg, mixed)
    w0, b0, ws = snapshot_params(trainer.model)
    x, labels = batch(mixed, np.arange(12))
    trainer.train_step(np.arange(12))
    g_w0, _, gs = naive.gradients(w0, b0, ws, x, labels, sigmoid=loss_name == "sigmoid")
    for layer, g in enumerate([g_w0, *gs]):
        np.testing.assert_allclose(
            trainer.adam.m[layer] / (1 - cfg.optimizer.beta1),
            g,
            rtol=2e-4,
            atol=1e-8,
            err_msg=f"gradient of layer {layer}",
        )


# ---- sampled step == dense gradient restricted to the active set ---------------------------------------
@pytest.mark.parametrize("sample_hidden, dropout", [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_sampled_gradient_is_the_dense_gradient_restricted_to_the_active_set(data, sample_hidden, dropout):
    hidden = (16, 12) if sample_hidden else (16,)
    cfg = exact_config(
        {
            "model.hidden": hidden,
            "model.sample_hidden": sample_hidden,
            "sampling.hash_family": "simhash",
            "sampling.hash_k": 3,
            "sampling.hash_l": 2,
            "sampling.bucket_size": 4,
            "sampling.min_active": 6,
            "optimizer.batch_size": 8,
            "optimizer.lr": 1e-2,
            "model.init_std": 0.3,
            "seed": 7,
            "sampling.rehash_n0": 1000,
            "optimizer.hidden_dropout": dropout,
        }
    )
    trainer = Trainer(cfg, data)
    ref = NaiveAdam(snapshot_params(trainer.model), cfg, trainer.resolved())
    out = trainer.model.depth - 1
    for points in (np.arange(8), np.arange(5, 13), np.array([30, 31, 1, 2])):
        x, labels = batch(data, points)
        streams = trainer.samples_seen + np.arange(len(points))
        factors = [dropout_factors(width, dropout, cfg.seed, streams, layer) for layer, width in enumerate(hidden)]
        trainer.train_step(points)
        masks = active_masks(trainer, len(points))
        assert sorted(masks) == ([1, out] if sample_hidden else [out])
        for i, y in enumerate(labels):
            assert masks[out][i, y].all(), "true labels are always active"
        sizes = masks[out].sum(axis=1)
        assert sizes.min() >= 6 and sizes.max() < L, "the output layer really is sampled"
        if sample_hidden:
            assert masks[1].sum(axis=1).max() < 12
        g_w0, _, gs = ref.step(x, labels, active=masks, dropout=factors if dropout else None)
        # Rows outside every active set: zero gradient, never touched.
        never = ~masks[out].any(axis=0)
        assert never.any()
        assert np.all(gs[-1][never] == 0)
        ref.assert_matches(trainer)


def test_hard_negatives_keep_the_most_probable_non_labels(data):
    """With hard_negatives = h, a point's softmax still spans its whole active set, but only its labels
    and its h most probable other active neurons get a delta; rows no kept delta touches take no
    Adam step. Checked against the naive gradient with the same mask and naive lazy Adam."""
    cfg = exact_config(
        {
            "model.hidden": (16,),
            "sampling.hash_family": "simhash",
            "sampling.hash_k": 3,
            "sampling.hash_l": 2,
            "sampling.bucket_size": 4,
            "sampling.min_active": 10,
            "sampling.hard_negatives": 3,
            "optimizer.batch_size": 8,
            "optimizer.lr": 1e-2,
            "model.init_std": 0.3,
            "seed": 7,
            "sampling.rehash_n0": 1000,
        }
    )
    trainer = Trainer(cfg, data)
    ref = NaiveAdam(snapshot_params(trainer.model), cfg, trainer.resolved())
    out = trainer.model.depth - 1
    for points in (np.arange(8), np.arange(5, 13), np.array([30, 31, 1, 2])):
        x, labels = batch(data, points)
        before = trainer.adam.steps[out].copy()
        trainer.train_step(points)
        masks = active_masks(trainer, len(points))
        keep = naive.hard_negative_mask(ref.w0, ref.b0, ref.ws, x, labels, masks, 3)
        bufs = trainer._bufs
        act_ids, act_val, nact = bufs.act.act_ids, bufs.act.act_val, bufs.act.nact
        for i, y in enumerate(labels):
            n = nact[i, out]
            kept = act_ids[out - 1][i, :n][act_val[out - 1][i, :n] != 0]
            assert sorted(kept) == sorted(np.flatnonzero(keep[i])), f"point {i}"
            assert n - len(y) > 3 + 2, "enough negatives for the cut to bite"
        ref.step(x, labels, active=masks, keep=keep)
        ref.assert_matches(trainer)
        stepped = np.flatnonzero(trainer.adam.steps[out] != before)
        assert 0 < len(stepped) < len(np.flatnonzero(masks[out].any(axis=0)))


def drawn_negatives(trainer, n_points):
    """(drawn, shift): bool (b, labels) of the random negatives of each point of the last batch, and
    the log-Q shift the engine should have added to their logits: log(not yet active / drawn)."""
    act_ids, nact = trainer._bufs.act.act_ids, trainer._bufs.act.nact
    n_labels = trainer.model.num_labels
    nkept = trainer._bufs.act.nkept
    out = trainer.model.depth - 1
    drawn = np.zeros((n_points, n_labels), dtype=bool)
    shift = np.zeros((n_points, n_labels))
    for i in range(n_points):
        kept, n = int(nkept[i]), int(nact[i, out])
        ids = act_ids[out - 1][i, :n]
        assert len(set(ids.tolist())) == n, "an active set holds each neuron once"
        drawn[i, ids[kept:]] = True
        if n > kept:
            shift[i, ids[kept:]] = np.log((n_labels - kept) / (n - kept))
    return drawn, shift


@pytest.mark.parametrize("hard_negatives, r", [("all", 6), (3, 24)])
@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
def test_random_negatives_get_the_log_q_shift_and_always_a_gradient(data, hard_negatives, r, loss_name):
    """random_negatives = r adds, per point, r neurons drawn outside its retrieved set + labels, with
    their logits raised by log((L - kept) / r). The step equals naive Adam on the gradient of that
    shifted softmax (with the sigmoid loss: of the logistic losses, each drawn negative's at its unshifted
    logit), and the hard-negative cut ranks only the retrieved neurons (the
    drawn ones keep their delta; with many of them the shift is small and some rank below the cut)."""
    cfg = exact_config(
        {
            "model.hidden": (16,),
            "sampling.hash_family": "simhash",
            "sampling.hash_k": 3,
            "sampling.hash_l": 2,
            "sampling.bucket_size": 4,
            "sampling.min_active": 8,
            "sampling.random_negatives": r,
            "sampling.random_negative_group": 1,
            "sampling.hard_negatives": hard_negatives,
            "model.loss": loss_name,
            "optimizer.batch_size": 8,
            "optimizer.lr": 1e-2,
            "model.init_std": 0.3,
            "seed": 7,
            "sampling.rehash_n0": 1000,
        }
    )
    trainer = Trainer(cfg, data)
    ref = NaiveAdam(snapshot_params(trainer.model), cfg, trainer.resolved())
    out = trainer.model.depth - 1
    draws = set()
    for points in (np.arange(8), np.arange(5, 13), np.array([30, 31, 1, 2])):
        x, labels = batch(data, points)
        trainer.train_step(points)
        masks = active_masks(trainer, len(points))
        drawn, shift = drawn_negatives(trainer, len(points))
        bufs = trainer._bufs
        act_ids, act_val, nact = bufs.act.act_ids, bufs.act.act_val, bufs.act.nact
        nkept = bufs.act.nkept[: len(points)]
        assert (drawn.sum(axis=1) == np.minimum(r, L - nkept)).all()
        for i, y in enumerate(labels):
            assert not drawn[i, y].any(), "labels are never drawn: they are already active"
            draws.add(tuple(np.flatnonzero(drawn[i])))
        keep = None
        if hard_negatives != "all":
            keep = naive.hard_negative_mask(ref.w0, ref.b0, ref.ws, x, labels, masks, hard_negatives, drawn, shift)
            for i in range(len(points)):
                n = nact[i, out]
                kept = act_ids[out - 1][i, :n][act_val[out - 1][i, :n] != 0]
                assert sorted(kept) == sorted(np.flatnonzero(keep[i])), f"point {i}"
                assert drawn[i][kept].sum() == drawn[i].sum()
        ref.step(x, labels, active=masks, keep=keep, shift=shift)
        ref.assert_matches(trainer)
    assert len(draws) > 12, "each point draws its own"


def test_random_negatives_are_uniform_over_the_unretrieved(data):
    """Each neuron outside a point's retrieved set + labels is drawn with probability r / (L - kept):
    per-label counts over many points against their expectation (chi-square, fixed seed)."""
    r = 5
    cfg = exact_config(
        {
            "model.hidden": (16,),
            "sampling.hash_family": "simhash",
            "sampling.hash_k": 3,
            "sampling.hash_l": 2,
            "sampling.bucket_size": 4,
            "sampling.random_negatives": r,
            "sampling.random_negative_group": 1,
            "optimizer.batch_size": 40,
            "optimizer.lr": 1e-6,
            "seed": 3,
            "sampling.rehash_n0": 1000,
        }
    )
    trainer = Trainer(cfg, data)
    counts, expected = np.zeros(L), np.zeros(L)
    for _ in range(25):
        trainer.train_step(np.arange(40))
        drawn, _ = drawn_negatives(trainer, 40)
        act_ids = trainer._bufs.act.act_ids
        nkept = trainer._bufs.act.nkept
        for i in range(40):
            retrieved = np.zeros(L, dtype=bool)
            retrieved[act_ids[0][i, : nkept[i]]] = True
            expected[~retrieved] += r / (L - nkept[i])
        counts += drawn.sum(axis=0)
    assert counts.sum() == pytest.approx(expected.sum())
    ok = expected >= 5
    assert ok.sum() >= 30
    chi2 = float((((counts - expected) ** 2 / np.maximum(expected, 1e-9))[ok]).sum())
    dof = int(ok.sum()) - 1
    assert chi2 < dof + 4 * np.sqrt(2 * dof), (chi2, dof)


def test_random_negatives_are_shared_within_a_group():
    """random_negative_group = G: the G consecutive points of a group (by position in the training
    stream) read one random sequence, each keeping the first r neurons it does not already have, so
    the group shares its draws but for the few a point had retrieved; different groups draw apart."""
    wide = naive.planted_dataset(32, F, 3000, seed=2, vocab=5, noise=2, max_labels=3)
    r, g = 20, 4
    cfg = exact_config(
        {
            "model.hidden": (16,),
            "sampling.hash_family": "simhash",
            "sampling.hash_k": 3,
            "sampling.hash_l": 2,
            "sampling.bucket_size": 4,
            "sampling.random_negatives": r,
            "sampling.random_negative_group": g,
            "optimizer.batch_size": 16,
            "seed": 5,
            "sampling.rehash_n0": 1000,
        }
    )
    trainer = Trainer(cfg, wide)
    for _ in range(2):
        trainer.train_step(np.arange(16))
        drawn, _ = drawn_negatives(trainer, 16)
        assert (drawn.sum(axis=1) == r).all()
        shared = drawn.astype(np.int64) @ drawn.T.astype(np.int64)
        group = np.arange(16) // g
        same = group[:, None] == group[None, :]
        assert shared[same].min() >= r - 2
        assert shared[~same].max() <= 2
        assert len({tuple(np.flatnonzero(d)) for d in drawn}) >= 16 // g


@pytest.mark.parametrize("skip_zero", [False, True])
def test_group_by_row_lists_each_pair_once_under_its_row_in_point_order(skip_zero):
    """The optimizer's grouping of a batch's (point, slot) pairs by neuron: every pair (but those with
    a zero delta, when told to skip them) exactly once, each row's pairs in point order, the scratch
    back to all -1, and the same arrays on 1 and 2 threads."""
    rng = np.random.default_rng(4)
    b, cap, rows = 37, 60, 500
    nact = rng.integers(0, cap + 1, size=b).astype(np.int32)
    ids = np.zeros((b, cap), np.int32)
    vals = np.zeros((b, cap), np.float32)
    for i in range(b):
        ids[i, : nact[i]] = rng.choice(rows, size=nact[i], replace=False)
        vals[i, : nact[i]] = rng.choice(np.array([0.0, 0.5, -1.0], np.float32), size=nact[i])
    scratch = np.full(rows, -1, np.int32)
    results = []
    for threads in (1, 2):
        set_threads(threads)
        results.append(group_by_row(ids, nact, scratch, vals, skip_zero))
        assert (scratch == -1).all()
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)
    start, pair_point, pair_slot, touched = results[0]
    expected = {}
    for i in range(b):
        for a in range(nact[i]):
            if not (skip_zero and vals[i, a] == 0.0):
                expected.setdefault(int(ids[i, a]), []).append((i, a))
    assert len(touched) == len(expected)
    got = {
        int(j): list(
            zip(pair_point[start[r] : start[r + 1]].tolist(), pair_slot[start[r] : start[r + 1]].tolist(), strict=True)
        )
        for r, j in enumerate(touched)
    }
    assert got == expected


def test_random_negatives_auto_only_for_wide_output_layers():
    assert lsh.resolve_random_negatives(SlideConfig(), 670_091) == 250
    assert lsh.resolve_random_negatives(SlideConfig(), 205_443) == 250
    assert lsh.resolve_random_negatives(SlideConfig(), 2_000) == 0
    assert lsh.resolve_random_negatives(SlideConfig(sampling=SamplingConfig(random_negatives="none")), 670_091) == 0
    assert lsh.resolve_random_negatives(SlideConfig(sampling=SamplingConfig(random_negatives=7)), 2_000) == 7
    assert lsh.resolve_random_negatives(SlideConfig(sampling=SamplingConfig(random_negatives=70)), 40) == 40


def test_hard_negatives_auto_only_for_wide_output_layers():
    assert lsh.resolve_hard_negatives(SlideConfig(), 670_091) == lsh.target_active(670_091) // 4 == 250
    assert lsh.resolve_hard_negatives(SlideConfig(), 2_000) == 0
    assert lsh.resolve_hard_negatives(SlideConfig(sampling=SamplingConfig(hard_negatives="all")), 670_091) == 0
    assert lsh.resolve_hard_negatives(SlideConfig(sampling=SamplingConfig(hard_negatives=7)), 2_000) == 7


def test_capped_candidates_keep_the_frequent_and_a_uniform_share_of_the_ties():
    """Over many inputs (seeds), the cap keeps every candidate above the cut-off count and exactly the
    remaining number of ties, each tie equally often whatever its position (chi-square, fixed seed)."""
    from engine.kernels.sampling import filter_candidates

    rng = np.random.default_rng(4)
    n, cap, trials = 60, 20, 3000
    counts0 = np.ones(n, np.int32)
    counts0[[3, 17, 40]] = 2
    counts0[25] = 3
    ids0 = rng.permutation(1000)[:n].astype(np.int32)
    chosen = np.zeros(n)
    for seed in rng.integers(0, 2**63, size=trials, dtype=np.uint64):
        ids, counts = ids0.copy(), counts0.copy()
        kept = filter_candidates(ids, n, counts, 1, cap, 3, seed)
        assert kept == cap
        np.testing.assert_array_equal(ids[:kept], naive.retrieve(np.repeat(ids0, counts0), 1, cap, int(seed)))
        chosen[np.isin(ids0, ids[:kept])] += 1
    above = counts0 > 1
    assert (chosen[above] == trials).all()
    expected = trials * (cap - above.sum()) / (~above).sum()
    ties = chosen[~above]
    chi2 = float(((ties - expected) ** 2 / expected).sum())
    dof = ties.size - 1
    assert chi2 < dof + 4 * np.sqrt(2 * dof), (chi2, dof)


def test_kth_largest_is_the_sorted_value():
    from engine.kernels.sampling import kth_largest

    rng = np.random.default_rng(9)
    for _ in range(300):
        n = int(rng.integers(1, 300))
        high = int(rng.choice([3, 50, 2**31 - 1]))  # many ties, some, almost none
        keys = rng.integers(0, high, size=n + 5).astype(np.int32)
        k = int(rng.integers(1, n + 1))
        expected = np.sort(keys[:n])[::-1][k - 1]
        tail = keys[n:].copy()
        before = np.sort(keys[:n])
        assert kth_largest(keys, n, k) == expected
        np.testing.assert_array_equal(np.sort(keys[:n]), before)  # a permutation of keys[:n]
        np.testing.assert_array_equal(keys[n:], tail)  # nothing beyond n touched


@pytest.mark.parametrize("max_active", ["none", 6])
def test_active_set_follows_the_buckets(data, max_active):
    """The output active set of a point = union of its L buckets (capped to the most frequently
    retrieved when max_active > 0) + its labels."""
    cfg = exact_config(
        {
            "model.hidden": (16,),
            "sampling.hash_family": "simhash",
            "sampling.hash_k": 2,
            "sampling.hash_l": 3,
            "sampling.bucket_size": 1000,
            "optimizer.batch_size": 8,
            "sampling.max_active": max_active,
            "model.init_std": 0.3,
            "seed": 5,
            "sampling.rehash_n0": 1000,
        }
    )
    trainer = Trainer(cfg, data)
    model = trainer.model
    w0, b0 = model.weights[0].copy(), model.b0.copy()
    hf, tb = model.hashes[0], model.tables[0]
    points = np.arange(8)
    trainer.train_step(points)
    masks = active_masks(trainer, 8)[1]
    for i, p in enumerate(points):
        h = trainer._bufs.act.hid[0][i]  # the hidden vector the step hashed (bits matter for SimHash)
        s, e = data.x_indptr[p], data.x_indptr[p + 1]
        np.testing.assert_allclose(
            h, naive.hidden_float32(w0, b0, data.x_indices[s:e], data.x_values[s:e]), rtol=1e-5, atol=1e-6
        )
        buckets = lsh.hash_dense(h, hf)
        found = tables.query(tb, buckets)
        cap = 0 if max_active == "none" else max_active
        expected = set(naive.retrieve(found, 1, cap, naive.tie_seed(hf.params, buckets)).tolist())
        if cap:
            assert len(np.unique(found)) > max_active, "the cap binds"
        expected |= set(tb.hubs.tolist())
        expected |= set(data.y_indices[data.y_indptr[p] : data.y_indptr[p + 1]].tolist())
        assert set(np.flatnonzero(masks[i]).tolist()) == expected


# ---- finite differences --------------------------------------------------------------------------------
@pytest.mark.parametrize("sigmoid", [False, True])
def test_naive_gradient_matches_finite_differences(data, sigmoid):
    rng = np.random.default_rng(0)
    cfg = exact_config({"model.hidden": (7, 5), "model.sample_output": False, "model.init_std": 0.4, "seed": 11})
    model = SlideModel.initialize(cfg, F, L)
    w0, b0, ws = snapshot_params(model)
    b0 += rng.normal(0, 0.1, size=b0.shape)
    x, labels = batch(data, np.arange(10))
    g_w0, g_b0, gs = naive.gradients(w0, b0, ws, x, labels, sigmoid=sigmoid)
    params = [w0, b0, *ws]
    grads = [g_w0, g_b0, *gs]
    h = 1e-6
    for arr, g in zip(params, grads, strict=True):
        flat, gflat = arr.reshape(-1), g.reshape(-1)
        for idx in rng.choice(flat.size, size=min(12, flat.size), replace=False):
            old = flat[idx]
            flat[idx] = old + h
            up = naive.loss(w0, b0, ws, x, labels, sigmoid=sigmoid)
            flat[idx] = old - h
            down = naive.loss(w0, b0, ws, x, labels, sigmoid=sigmoid)
            flat[idx] = old
            assert (up - down) / (2 * h) == pytest.approx(gflat[idx], rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
def test_engine_gradient_matches_finite_differences_of_the_engine_loss(data, loss_name):
    """The engine's own float32 loss, differentiated numerically, against the gradient its optimizer saw."""
    cfg = exact_config(
        {
            "model.loss": loss_name,
            "model.hidden": (7, 5),
            "model.sample_output": False,
            "optimizer.batch_size": 10,
            "model.init_std": 0.5,
            "optimizer.lr": 1e-3,
            "seed": 13,
        }
    )
    base = SlideModel.initialize(cfg, F, L)
    points = np.arange(10)

    def run(weights, b0):
        model = SlideModel(cfg, F, L, tuple(w.copy() for w in weights), b0.copy(), [], [])
        trainer = Trainer(cfg, data, model=model)
        loss, _, _ = trainer.train_step(points)
        return loss / len(points), trainer

    _, trainer = run(base.weights, base.b0)
    grads = [m / (1 - cfg.optimizer.beta1) for m in trainer.adam.m]
    rng = np.random.default_rng(1)
    h = 1e-2  # the engine keeps per-point losses in float32: the step must dwarf their rounding
    checked = 0
    for layer, g in enumerate(grads):
        candidates = np.argwhere(np.abs(g) > 5e-3)
        for r, c in candidates[rng.choice(len(candidates), size=min(4, len(candidates)), replace=False)]:
            ws = [x.copy() for x in base.weights]
            ws[layer][r, c] += h
            up, _ = run(ws, base.b0)
            ws[layer][r, c] -= 2 * h
            down, _ = run(ws, base.b0)
            assert (up - down) / (2 * h) == pytest.approx(g[r, c], rel=1e-2, abs=2e-5), (layer, r, c)
            checked += 1
    assert checked >= 10


# ---- prediction -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_model():
    """A small sampled model with weights moved by a few steps of training."""
    set_threads(1)
    train = naive.planted_dataset(300, 60, 120, seed=2, vocab=6, noise=2)
    cfg = small_simhash_config(
        {
            "sampling.bucket_size": 64,
            "optimizer.batch_size": 32,
            "sampling.hub_neurons": 8,
            "optimizer.lr": 5e-3,
            "model.init_std": 0.1,
            "seed": 21,
            "sampling.rehash_n0": 5,
            "schedule.epochs": 2,
        }
    )
    trainer = Trainer(cfg, train)
    trainer.run()
    return trainer.model, train


def test_predict_exact_equals_naive_dense_topk(trained_model):
    model, data = trained_model
    pts = np.arange(50)
    x, _ = batch(data, pts)
    w0, b0, ws = snapshot_params(model)
    _, z, _ = naive.forward(w0, b0, ws, x)
    want_labels, want_scores = naive.topk(z, 5)
    labels, scores = model.predict(*rows(data, 50), k=5, mode="exact")
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    _, _, n_scored, _ = model.predict_with_stats(*rows(data, 50), 5, "exact")
    assert np.all(n_scored == model.num_labels)


def test_lsh_scores_are_exact_scores_of_the_same_labels(trained_model):
    model, data = trained_model
    args = rows(data, 60)
    all_labels, all_scores = model.predict(*args, k=model.num_labels, mode="exact")
    labels, scores = model.predict(*args, k=5, mode="lsh")
    for i in range(60):
        exact = dict(zip(all_labels[i].tolist(), all_scores[i].tolist(), strict=True))
        for lab, s in zip(labels[i], scores[i], strict=True):
            if lab >= 0:
                assert s == exact[int(lab)]  # same kernel, same number, bit for bit
            else:
                assert s == -np.inf


@pytest.mark.parametrize(
    "threshold, train_cap, predict_cap, predict_hubs, cap",
    [
        (1, None, "none", None, 0),  # no serving cap: every bucket member is scored
        (2, None, "none", None, 0),  # only neurons found in >= 2 of the L buckets
        (1, None, 7, None, 7),  # a serving cap: the 7 most frequently retrieved
        (1, 9, None, None, 0),  # predict_max_active None (auto) on a layer without serving hubs: no cap
        (1, 9, None, 4, 9),  # ... and on one configured with serving hubs: the training cap
    ],
)
def test_lsh_candidates_are_the_union_of_buckets(trained_model, threshold, train_cap, predict_cap, predict_hubs, cap):
    base, data = trained_model
    cfg = base.config.replace(
        sampling=base.config.sampling.replace(active_threshold=threshold, max_active=train_cap),
        predict=base.config.predict.replace(max_active=predict_cap, hubs=predict_hubs),
    )
    model = SlideModel(cfg, base.num_features, base.num_labels, base.weights, base.b0, base.hashes, base.tables)
    hf, tb = model.hashes[0], model.tables[0]
    n = 60
    args = rows(data, n)
    labels, scores, n_scored, _ = model.predict_with_stats(*args, k=5, mode="lsh")
    w0, b0, ws = snapshot_params(model)
    x, _ = batch(data, np.arange(n))
    _, z, _ = naive.forward(w0, b0, ws, x)
    sizes, capped = [], 0
    for i in range(n):
        h = engine_hidden(model, data, i)
        buckets = lsh.hash_dense(h, hf)
        found = tables.query(tb, buckets)
        retrieved = naive.retrieve(found, threshold, cap, naive.tie_seed(hf.params, buckets))
        capped += len(retrieved) < len(naive.retrieve(found, threshold))
        eligible = np.concatenate([retrieved, np.setdiff1d(tb.hubs, retrieved)])
        got = labels[i][labels[i] >= 0]
        assert n_scored[i] == len(eligible)
        # Exactly the top-k of the candidates by exact score, in order.
        order = eligible[np.argsort(-z[i, eligible], kind="stable")][:5]
        np.testing.assert_array_equal(got, order)
        assert len(got) == min(5, n_scored[i])
        sizes.append(n_scored[i])
    assert 0 < np.mean(sizes) < model.num_labels  # sub-linear: not everything was scored
    assert (capped > n // 2) if cap else capped == 0


@pytest.mark.parametrize("mode", ["lsh", "exact"])
def test_few_queries_and_batches_give_the_same_answers(trained_model, mode):
    """One query at a time (the serial kernel) and a batch of 40 (the parallel one) agree bit for bit."""
    model, data = trained_model
    set_threads(2)
    batch_labels, batch_scores, batch_n, _ = model.predict_with_stats(*rows(data, 40), k=5, mode=mode)
    for i in range(40):
        sub = data.row_slice(i, i + 1)
        labels, scores, n_scored, _ = model.predict_with_stats(sub.x_indptr, sub.x_indices, sub.x_values, 5, mode)
        np.testing.assert_array_equal(labels[0], batch_labels[i])
        np.testing.assert_array_equal(scores[0], batch_scores[i])
        assert n_scored[0] == batch_n[i]


@pytest.mark.parametrize(
    "hidden, weight_dtype, probes",
    [((16,), "float32", 0), ((16,), "bfloat16", 1), ((16, 12), "float32", 0)],
)
def test_hubs_scored_as_a_block_give_the_answers_of_predict_batch(hidden, weight_dtype, probes, monkeypatch):
    """When the output layer is the only one scored from its tables and has hubs, lsh scores the hubs for a block of
    points at a time (predict_batch_hubs, without threads for a few points), from rows packed once when the layer is
    read-only: labels, scores and counts are predict_batch's bit for bit, over several blocks, one point at a time,
    packed or not (with multi-probe, bfloat16 rows and a dense hidden layer before the sampled output layer too)."""
    from engine import network

    set_threads(2)
    train = naive.planted_dataset(300, 60, 120, seed=2, vocab=6, noise=2)
    cfg = small_simhash_config(
        {
            "model.hidden": hidden,
            "model.weight_dtype": weight_dtype,
            "sampling.hub_neurons": 8,
            "predict.hubs": 20,
            "predict.probes": probes,
            "optimizer.batch_size": 32,
            "seed": 21,
            "schedule.epochs": 1,
        }
    )
    trainer = Trainer(cfg, train)
    trainer.run()
    model = trainer.model
    assert model.layer_slot[-1] >= 0 and (model.layer_slot[:-1] < 0).all()
    assert model.tables[model.layer_slot[-1]].serve_hubs.shape[0] == 20
    calls = []
    for name in ("predict_batch_hubs", "predict_batch_hubs_serial"):
        real = getattr(network, name)
        record = lambda *a, _r=real, _n=name: calls.append((_n, a[0].shape[0], a[3].rows.shape[0])) or _r(*a)  # noqa: E731
        monkeypatch.setattr(network, name, record)
    monkeypatch.setattr(network, "_HUB_BLOCK", 40)
    args = rows(train, 100)
    block = model.predict_with_stats(*args, k=7, mode="lsh")
    assert calls == [("predict_batch_hubs", 40, 0), ("predict_batch_hubs", 40, 0), ("predict_batch_hubs", 20, 0)]
    singles = [model.predict_with_stats(*rows(train.row_slice(i, i + 1), 1), k=7, mode="lsh") for i in range(100)]
    assert calls[3:] == [("predict_batch_hubs_serial", 1, 0)] * 100
    for layer in model.weights:
        layer.flags.writeable = False  # as a model mapped from a snapshot: the hub rows are packed
    packed = model.predict_with_stats(*args, k=7, mode="lsh")
    packed_single = model.predict_with_stats(*rows(train.row_slice(7, 8), 1), k=7, mode="lsh")
    assert calls[103:106] == [("predict_batch_hubs", 40, 20)] * 2 + [("predict_batch_hubs", 20, 20)]
    assert calls[106:] == [("predict_batch_hubs_serial", 1, 20)]
    pack = model._hub_pack
    model.predict(*args, k=7, mode="lsh")
    assert model._hub_pack is pack  # made once for this layer and hub set
    monkeypatch.setattr(network.SlideModel, "_block_hubs", lambda self, use: None)  # every point through predict_batch
    n_calls = len(calls)
    want = model.predict_with_stats(*args, k=7, mode="lsh")
    assert len(calls) == n_calls
    for got in (block, packed):
        for a, b in zip(got[:3], want[:3], strict=True):
            np.testing.assert_array_equal(a, b)
        assert got[3] == want[3] == "lsh"
    for i, one in enumerate(singles):
        for a, b in zip(one[:3], want[:3], strict=True):
            np.testing.assert_array_equal(a[0], b[i])
    for a, b in zip(packed_single[:3], want[:3], strict=True):
        np.testing.assert_array_equal(a[0], b[7])
    assert np.all(block[2] >= 20) and np.all(block[2] < model.num_labels)


def test_packed_hub_rows_follow_label_edits():
    """A served (read-only) model packs its hubs' rows once; adding a label (a new hub) or retiring a hub makes a
    new pack, so the edited model's lsh answers are those of the same model read from the layer itself."""
    set_threads(2)
    train = naive.planted_dataset(300, 60, 120, seed=3, vocab=6, noise=2)
    cfg = small_simhash_config({"predict.hubs": 20, "seed": 5, "schedule.epochs": 1})
    trainer = Trainer(cfg, train)
    trainer.run()
    model = trainer.model
    for layer in model.weights:
        layer.flags.writeable = False
    args = rows(train, 60)
    model.predict(*args, k=5, mode="lsh")
    first = model._hub_pack
    slot = int(model.layer_slot[-1])
    hubs = model.tables[slot].serve_hubs
    assert first[0] is model.weights[-1]
    np.testing.assert_array_equal(first[3], model.weights[-1][hubs])
    np.testing.assert_array_equal(np.flatnonzero(first[2] >= 0), hubs)
    np.testing.assert_array_equal(first[2][hubs], np.arange(hubs.shape[0]))
    model.add_labels([rows(train.row_slice(0, 3), 3)], ["new"])
    model.retire_labels([int(hubs[0])])
    got = model.predict_with_stats(*args, k=5, mode="lsh")
    pack = model._hub_pack
    hubs = model.tables[slot].serve_hubs
    assert pack is not first and pack[0] is model.weights[-1]
    np.testing.assert_array_equal(pack[1], hubs)
    assert model.num_labels - 1 in hubs and int(first[1][0]) not in hubs
    np.testing.assert_array_equal(pack[3], model.weights[-1][hubs])
    np.testing.assert_array_equal(pack[2][hubs], np.arange(hubs.shape[0]))
    assert (got[0] == model.num_labels - 1).any() and not (got[0] == int(first[1][0])).any()
    assert not model.weights[-1].flags.writeable
    writable = model.weights[-1].copy()
    model.weights = (*model.weights[:-1], writable)  # the layer itself, no pack
    want = model.predict_with_stats(*args, k=5, mode="lsh")
    for a, b in zip(got[:3], want[:3], strict=True):
        np.testing.assert_array_equal(a, b)


def test_predict_validates_its_input(trained_model):
    model, data = trained_model
    with pytest.raises(ValueError, match="out of range"):
        model.predict(np.array([0, 1]), np.array([10_000]), np.array([1.0]), k=2)
    with pytest.raises(ValueError, match="k must be"):
        model.predict(*rows(data, 1), k=0)
    with pytest.raises(ValueError, match="mode"):
        model.predict(*rows(data, 1), k=1, mode="fast")
    labels, scores = model.predict(np.array([0]), np.array([], np.int32), np.array([], np.float32), k=3)
    assert labels.shape == (0, 3) and scores.shape == (0, 3)


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
def test_exact_predict_ignores_hidden_sampling(weight_dtype):
    """With sampled hidden layers, `exact` computes every neuron of every layer: the dense network (of
    the decoded weights, when they are stored as bfloat16)."""
    data = naive.planted_dataset(30, F, L, seed=9)
    cfg = SlideConfig(
        model=ModelConfig(
            hidden=(12, 10), sample_hidden=True, sample_output=True, init_std=0.3, weight_dtype=weight_dtype
        ),
        sampling=SamplingConfig(hash_family="simhash", hash_k=2, hash_l=2, bucket_size=2),
        seed=2,
    )
    model = SlideModel.initialize(cfg, F, L)
    x, _ = batch(data, np.arange(30))
    w0, b0, ws = snapshot_params(model)
    _, z, _ = naive.forward(w0, b0, ws, x)
    labels, scores = model.predict(*rows(data, 30), k=4, mode="exact")
    np.testing.assert_array_equal(labels, naive.topk(z, 4)[0])
    np.testing.assert_allclose(scores, naive.topk(z, 4)[1], rtol=1e-5, atol=1e-6)
    # lsh mode samples the hidden layer too, so its scores are those of a thinned network: still finite
    # and taken from the output layer's candidates only.
    lab, sc, n_scored, _ = model.predict_with_stats(*rows(data, 30), k=4, mode="lsh")
    assert np.all(n_scored <= L) and np.all(np.isfinite(sc[lab >= 0]))


@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("normalize_input", [False, True])
@pytest.mark.parametrize("hidden, sample_hidden", [((12,), False), ((12, 10), True)])
def test_last_hidden_is_the_naive_dense_hidden_layers(hidden, sample_hidden, normalize_input, weight_dtype):
    """SlideModel.last_hidden: the last hidden layer of the dense network of the decoded weights, every neuron of
    a sampled hidden layer computed, after the input normalisation the config asks for; the exact scores are its
    output-layer scores. Points with no features and over several threads' chunks included."""
    set_threads(2)
    data = naive.planted_dataset(30, F, L, seed=9)
    cfg = SlideConfig(
        model=ModelConfig(
            hidden=hidden,
            sample_hidden=sample_hidden,
            sample_output=True,
            init_std=0.3,
            weight_dtype=weight_dtype,
            normalize_input=normalize_input,
        ),
        sampling=SamplingConfig(hash_family="simhash", hash_k=2, hash_l=2, bucket_size=2),
        seed=2,
    )
    model = SlideModel.initialize(cfg, F, L)
    assert (model.layer_slot[1:-1] >= 0).any() == sample_hidden
    model.b0[:] = np.linspace(-0.2, 0.2, model.b0.shape[0])  # a point with no features gets relu(b0), not 0
    sub = data.row_slice(0, 30)
    empty = 7  # point 7 loses its features
    keep = np.ones(sub.x_indices.shape[0], np.bool_)
    keep[sub.x_indptr[empty] : sub.x_indptr[empty + 1]] = False
    counts = np.diff(sub.x_indptr)
    counts[empty] = 0
    indptr = np.concatenate(([0], np.cumsum(counts)))
    scale = np.repeat(np.linspace(0.5, 3.0, 30), counts)  # planted rows have unit norm: other norms too
    args = (indptr, sub.x_indices[keep], (sub.x_values[keep] * scale).astype(np.float32))
    x = naive.dense_rows(*args, F)
    if normalize_input:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    w0, b0, ws = snapshot_params(model)
    hs, z, _ = naive.forward(w0, b0, ws, x)
    got = model.last_hidden(*args)
    assert got.dtype == np.float32 and got.shape == (30, hidden[-1])
    np.testing.assert_allclose(got, hs[-1], rtol=1e-5, atol=1e-6)
    assert (got > 0).any(axis=1).all() and (got == 0).any()  # ReLU: some units off, every point with some on
    labels, scores = model.predict(*args, k=4, mode="exact")
    w = ws[-1]
    want = np.take_along_axis(got.astype(np.float64) @ w[:, :-1].T + w[:, -1], labels, axis=1)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    assert model.last_hidden(np.array([0]), np.array([], np.int32), np.array([], np.float32)).shape == (0, hidden[-1])


def test_hubs_are_the_top_scores_on_the_mean_input(trained_model):
    """Hubs = the neurons with the highest <w, mean input> + bias at the last rehash; every lsh
    candidate set contains them."""
    base, data = trained_model
    assert np.any(base.tables[0].query_center != 0), "the running mean input reached the tables"
    tb = base.tables[0]._replace(hubs=base.tables[0].hubs.copy())
    model = SlideModel(base.config, base.num_features, base.num_labels, base.weights, base.b0, base.hashes, [tb])
    model.update_hubs(1)  # against the current weights (training moved them since the last rehash)
    w = model.weights[1]
    assert tb.hubs.shape[0] == lsh.resolve_hubs(model.config, w.shape[0]) > 0
    static = w[:, :-1].astype(np.float64) @ tb.query_center + w[:, -1]
    threshold = np.sort(static)[::-1][tb.hubs.shape[0] - 1]
    assert np.all(static[tb.hubs] >= threshold - 1e-6)
    labels, _, n_scored, _ = model.predict_with_stats(*rows(data, 20), k=5, mode="lsh")
    assert np.all(n_scored >= tb.hubs.shape[0])


def test_model_versions_of_one_shape_share_prediction_buffers(trained_model):
    """A service swaps in a new version of a model every snapshot: it must reuse the buffers of the old
    one (a fresh ~45 MB set per version at 670k labels makes the allocator's footprint creep), and
    concurrent requests must never share a set."""
    from concurrent.futures import ThreadPoolExecutor

    from engine import network

    base, data = trained_model
    args = rows(data, 20)
    want = base.predict(*args, k=5, mode="lsh")
    pooled = sum(len(free) for free in network._SCRATCH_POOL.values())
    version2 = SlideModel(
        base.config, base.num_features, base.num_labels, base.weights, base.b0, base.hashes, base.tables
    )
    got = version2.predict(*args, k=5, mode="lsh")
    assert sum(len(free) for free in network._SCRATCH_POOL.values()) == pooled
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: m.predict(*args, k=5, mode="lsh"), [base, version2] * 16))
    for labels, scores in answers:
        np.testing.assert_array_equal(labels, want[0])
        np.testing.assert_array_equal(scores, want[1])


# ---- bfloat16 first moments ------------------------------------------------------------------------------
def test_bfloat16_rounds_to_nearest_even():
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [
            rng.standard_normal(20000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 20000),
            np.array([0.0, -0.0, 1.0, -2.5, 3.3e38, 1e-40], np.float32),
        ]
    ).astype(np.float32)
    got = from_bfloat16(to_bfloat16(x)).astype(np.float64)
    # the two bfloat16 neighbours of each value: its float32 bits truncated, and one step up
    bits = x.view(np.uint32)
    low = (bits & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    high = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32).astype(np.float64)
    xd = x.astype(np.float64)
    nearest = np.where(np.abs(xd - low) < np.abs(high - xd), low, high)
    tie = np.abs(xd - low) == np.abs(high - xd)
    even = np.where(((bits >> np.uint32(16)) & np.uint32(1)) == 0, low, high)
    np.testing.assert_array_equal(got, np.where(tie, even, nearest))
    representable = from_bfloat16(np.arange(0, 0x7F80, 7, dtype=np.uint16))
    np.testing.assert_array_equal(from_bfloat16(to_bfloat16(representable)), representable)
    assert from_bfloat16(to_bfloat16(np.float32([3.4e38])))[0] == np.inf  # past the largest bfloat16


def test_bfloat16_first_moments_follow_float32_adam(data):
    """The first step is the same update (the moment is rounded only when stored), the stored moment
    is the float32 one rounded; later steps stay within bfloat16's resolution of the float32 run."""
    cfg = exact_config(
        {
            "model.hidden": (16,),
            "sampling.hash_family": "simhash",
            "sampling.hash_k": 3,
            "sampling.hash_l": 4,
            "sampling.bucket_size": 8,
            "sampling.min_active": 8,
            "optimizer.batch_size": 8,
            "optimizer.lr": 1e-2,
            "model.init_std": 0.3,
            "seed": 7,
            "sampling.rehash_n0": 1000,
            "optimizer.moment_dtype": "float32",
        }
    )
    exact, compact = (
        Trainer(cfg, data),
        Trainer(cfg.replace(optimizer=cfg.optimizer.replace(moment_dtype="bfloat16")), data),
    )
    assert compact.adam.m[1].dtype == np.uint16 and exact.adam.m[1].dtype == np.float32
    assert compact.adam.m[0].dtype == np.float32, "dense layers keep float32 moments"
    start = compact.model.weights[1].copy()
    exact.train_step(np.arange(8))
    compact.train_step(np.arange(8))
    for a, b in zip(exact.model.weights, compact.model.weights, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(compact.adam.m[1], to_bfloat16(exact.adam.m[1]))
    assert np.count_nonzero(compact.adam.m[1]) > 0
    for s in range(1, 6):
        points = np.arange(8 * s, 8 * s + 8) % data.num_points
        exact.train_step(points)
        compact.train_step(points)
    moved = np.abs(exact.model.weights[1] - start).max()
    assert moved > 3 * cfg.optimizer.lr
    np.testing.assert_allclose(compact.model.weights[1], exact.model.weights[1], rtol=0, atol=0.01 * moved)
    assert not np.array_equal(compact.model.weights[1], exact.model.weights[1])


def test_bfloat16_adam_row_is_the_float32_step_on_the_widened_moment():
    """adam_row_bf16 widens, steps and rounds each element in one loop: at every step its w, v and
    update norm equal adam_row's on the widened moment, and its stored moment is that one rounded. The
    norm is a fast-math reduction that the two loops may vectorise in different orders (it differed in
    the last bit on an AMD EPYC), so it is equal to float32 rounding only."""
    rng = np.random.default_rng(11)
    rows, width = 64, 129
    w = rng.standard_normal((rows, width)).astype(np.float32)
    m_bits = to_bfloat16(rng.standard_normal((rows, width)).astype(np.float32) * 1e-2)
    v = rng.random((rows, width)).astype(np.float32) * 1e-4
    w_ref, v_ref = w.copy(), v.copy()
    for t in range(1, 8):
        g = (rng.standard_normal((rows, width)) * 10.0 ** rng.integers(-6, 1, (rows, 1))).astype(np.float32)
        m_ref = from_bfloat16(m_bits)
        for r in range(rows):
            norm = adam_row_bf16(w[r], m_bits[r], v[r], g[r], t, 3e-3, 0.9, 0.999, 1e-8, np.uint64(0))
            norm_ref = adam_row(w_ref[r], m_ref[r], v_ref[r], g[r], t, 3e-3, 0.9, 0.999, 1e-8, np.uint64(0))
            assert norm == pytest.approx(norm_ref, rel=1e-6, abs=1e-30)
        np.testing.assert_array_equal(w, w_ref)
        np.testing.assert_array_equal(v, v_ref)
        np.testing.assert_array_equal(m_bits, to_bfloat16(m_ref))


@njit
def store_all(row, value, salt):
    for k in range(row.shape[0]):
        store_weight(row, k, value, salt)


def test_bfloat16_weights_round_stochastically_without_bias():
    """A value a quarter of the way between two bfloat16 neighbours is stored as the upper one in a
    quarter of a row's updates, for every element (rounding to nearest never would); the same salt
    gives the same bits; values a bfloat16 holds exactly are stored exactly."""
    spacing = 2.0**-7  # between bfloat16 numbers in [1, 2)
    updates = 4000
    for value in (1.0 + spacing / 4, -(1.0 + spacing / 4)):
        row = np.zeros(64, np.uint16)
        up = np.zeros(row.size)
        for t in range(1, updates + 1):
            store_all(row, np.float32(value), np.uint64(row_salt(7, t)))
            stored = np.abs(from_bfloat16(row))
            assert set(stored.tolist()) <= {1.0, 1.0 + spacing}
            up += stored > 1.0
        sigma = np.sqrt(0.25 * 0.75 / updates)
        assert np.all(np.abs(up / updates - 0.25) < 4 * sigma), up / updates
        assert abs(up.mean() / updates - 0.25) < 4 * sigma / np.sqrt(row.size)
        again = np.zeros_like(row)
        store_all(again, np.float32(value), np.uint64(row_salt(7, updates)))
        np.testing.assert_array_equal(again, row)
    for exact in (0.0, 1.0, -3.5, 1.0 + spacing):
        store_all(row, np.float32(exact), np.uint64(row_salt(8, 1)))
        assert np.all(from_bfloat16(row) == np.float32(exact))


def test_bfloat16_weights_take_the_float32_step_rounded_to_a_neighbour(data):
    """From the same weights (bfloat16 values) a step computes the same activations, deltas and
    moments with either storage; each bfloat16 weight a step updates lands on one of the two bfloat16
    neighbours of the float32 result, rows the step did not touch keep their bits, and the roundings
    go both ways."""
    cfg = exact_config(
        {
            "model.hidden": (16,),
            "sampling.hash_family": "simhash",
            "sampling.hash_k": 3,
            "sampling.hash_l": 4,
            "sampling.bucket_size": 8,
            "sampling.min_active": 8,
            "optimizer.batch_size": 8,
            "optimizer.lr": 1e-2,
            "model.init_std": 0.3,
            "seed": 7,
            "sampling.rehash_n0": 1000,
        }
    )
    exact, compact = Trainer(cfg, data), Trainer(cfg.replace(model=cfg.model.replace(weight_dtype="bfloat16")), data)
    assert all(w.dtype == np.uint16 for w in compact.model.weights)
    assert compact.adam.v[1].dtype == np.float32 and compact.model.b0.dtype == np.float32
    for layer in range(exact.model.depth):
        exact.model.weights[layer][:] = compact.model.float_weights(layer)
    exact.model.rehash_layer(1, round_id=0)
    np.testing.assert_array_equal(exact.model.tables[0].ids, compact.model.tables[0].ids)
    start = [w.copy() for w in compact.model.weights]
    points = np.arange(8)
    loss_exact, _, _ = exact.train_step(points)
    loss_compact, _, _ = compact.train_step(points)
    assert loss_compact == pytest.approx(loss_exact, rel=1e-5)
    for layer in range(exact.model.depth):
        np.testing.assert_array_equal(compact.adam.steps[layer], exact.adam.steps[layer])
        np.testing.assert_allclose(compact.adam.v[layer], exact.adam.v[layer], rtol=1e-5, atol=1e-12)
        want = exact.model.weights[layer]
        bits = want.view(np.uint32)
        down = from_bfloat16((bits >> 16).astype(np.uint16))  # toward zero
        up = from_bfloat16(((bits >> 16) + 1).astype(np.uint16))  # away from zero
        got = compact.model.float_weights(layer)
        on_grid = (bits & 0xFFFF) == 0
        np.testing.assert_array_equal(got[on_grid], want[on_grid])
        off = ~on_grid
        assert np.all((got[off] == down[off]) | (got[off] == up[off])), f"layer {layer}"
        assert np.any(got[off] == down[off]) and np.any(got[off] == up[off])
        idle = exact.adam.steps[layer] == 0
        np.testing.assert_array_equal(compact.model.weights[layer][idle], start[layer][idle])


def test_float_bit_casts_round_trip():
    @njit
    def round_trip(x):
        out = np.empty_like(x)
        bits = np.empty(x.shape[0], np.uint32)
        for k in range(x.shape[0]):
            bits[k] = float_bits(x[k])
            out[k] = float_from_bits(bits[k])
        return out, bits

    x = np.array([0.0, -0.0, 1.5, -3.25e-39, np.inf, 3.4e38], np.float32)
    out, bits = round_trip(x)
    np.testing.assert_array_equal(bits, x.view(np.uint32))
    np.testing.assert_array_equal(out.view(np.uint32), x.view(np.uint32))
