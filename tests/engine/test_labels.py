"""Labels added and retired after training, and warm starts, against naive twins (tests/engine/naive.py)."""

from __future__ import annotations

import numpy as np
import pytest

from engine import (
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    SlideConfig,
    SnapshotStore,
    Trainer,
    generate,
    load_model,
)
from engine import labels as lab
from engine.snapshot import load_arrays, read_manifest
from engine.sparse import Dataset
from engine.text import LabelNames

from . import naive

CFG = SlideConfig(
    model=ModelConfig(hidden=(32,), sample_output=True, weight_dtype="float32", loss="softmax"),
    optimizer=OptimizerConfig(batch_size=64),
    schedule=ScheduleConfig(epochs=2, eval_points=100),
    threads=1,
)
"""A softmax-trained model: on this data its hidden layer leaves units that no example of a new label activates,
which the imprint's penalty needs (the sigmoid-trained one activates them all)."""


def _drop_last_labels(data: Dataset, keep: int) -> Dataset:
    """The same points with labels >= keep taken off."""
    drop = np.zeros(data.num_labels, dtype=bool)
    drop[keep:] = True
    out = lab.without_labels(data, drop)
    return Dataset(out.x_indptr, out.x_indices, out.x_values, out.y_indptr, out.y_indices, data.num_features, keep)


@pytest.fixture(scope="module")
def data():
    return generate("tiny", seed=3, num_train=1200, num_test=300)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A model trained without the last 20 labels, its snapshot store, and the data."""
    train, test = data
    keep = train.num_labels - 20
    store = SnapshotStore(tmp_path_factory.mktemp("labels") / "src")
    Trainer(CFG, _drop_last_labels(train, keep), _drop_last_labels(test, keep), store).run()
    return store, keep


def _points_with(data: Dataset, label: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [i for i in range(data.num_points) if label in data.y_indices[data.y_indptr[i] : data.y_indptr[i + 1]]][:n]
    starts, stops = data.x_indptr[rows], data.x_indptr[np.asarray(rows) + 1]
    take = np.concatenate([np.arange(s, e) for s, e in zip(starts, stops, strict=True)])
    return np.concatenate(([0], np.cumsum(stops - starts))), data.x_indices[take], data.x_values[take]


def test_add_labels_imprints_rows_into_the_right_buckets(data, trained):
    train, test = data
    store, keep = trained
    model = load_model(store.latest()[1])
    before = load_model(store.latest()[1])
    old_w = model.float_weights(model.depth - 1).copy()
    old_tables = model.tables[0]
    new_labels = [keep, keep + 1, keep + 2]
    examples = [_points_with(train, j, 5) for j in new_labels]
    ids = model.add_labels(examples, ["new-a", "new-b", "new-c"])

    assert ids.tolist() == [keep, keep + 1, keep + 2]
    assert model.num_labels == keep + 3
    assert model.label_names is not None and model.label_names.names(ids) == ["new-a", "new-b", "new-c"]
    assert model.label_names[0] == "0"  # an XMC model's old labels are named by their ids
    w = model.float_weights(model.depth - 1)
    np.testing.assert_array_equal(w[:keep], old_w)  # old rows untouched
    # naive twin of the imprint: each example's softmax (at the imprint's temperature) over its 10 best old scores
    # (as served), summed over the examples; the 3 heaviest labels' rows and biases mixed by their renormalised
    # weights, less a share of the mix's mean absolute weight on the hidden units no example activates
    rng = np.random.default_rng(0)
    for r, ex in enumerate(examples):
        x = naive.dense_rows(*ex, model.num_features)
        h = np.maximum(x @ model.weights[0].astype(np.float64) + model.b0, 0.0)
        scores = h @ old_w[:, :-1].T.astype(np.float64) + old_w[:, -1]
        best = before.predict(*ex, k=lab.IMPRINT_CANDIDATES, mode="auto")[0]
        weight = np.zeros(keep)
        for i, top in enumerate(best):
            p = np.exp((scores[i, top] - scores[i, top].max()) / lab.IMPRINT_TEMPERATURE)
            weight[top] += p / p.sum()
        mix = np.argsort(-weight, kind="stable")[: lab.IMPRINT_MIX]
        want = (weight[mix] / weight[mix].sum()) @ old_w[mix].astype(np.float64)
        unused = (h <= 0).all(axis=0)
        assert unused.any()  # the penalty is exercised
        want[:-1][unused] -= lab.IMPRINT_UNUSED * np.abs(want[:-1]).mean()
        np.testing.assert_allclose(w[keep + r], want, rtol=1e-4, atol=1e-5)
        # so it never scores above the best of the labels it mixes: on its examples, and on any input of the
        # output layer (a hidden activation is never negative)
        mine = h @ w[keep + r, :-1].astype(np.float64) + w[keep + r, -1]
        assert (mine <= scores[:, mix].max(axis=1) + 1e-4).all()
        anywhere = rng.exponential(size=(500, h.shape[1])) * (rng.random((500, h.shape[1])) < 0.5)
        mixed = anywhere @ old_w[mix, :-1].T.astype(np.float64) + old_w[mix, -1]
        assert (anywhere @ w[keep + r, :-1] + w[keep + r, -1] <= mixed.max(axis=1) + 1e-4).all()

    tb, hf = model.tables[0], model.hashes[0]
    cap = model.config.sampling.bucket_size
    for j in ids:
        buckets = naive.bucket_ids(w[j, :-1].astype(np.float64) - tb.center, hf.idx, hf.sign, hf.params)
        for t, b in enumerate(buckets):
            assert tb.codes[t, j] == b
            assert j in tb.ids[t, tb.offsets[t, b] : tb.offsets[t, b + 1]]
    for t in range(tb.offsets.shape[0]):
        sizes = np.diff(tb.offsets[t])
        assert sizes.max() <= cap
        members = tb.ids[t, : tb.offsets[t, -1]]
        assert set(members[members < keep].tolist()) <= set(old_tables.ids[t, : old_tables.offsets[t, -1]].tolist())

    # exact and lsh score a new label alike; on its own examples, lsh finds it where exact ranks it in the top 5
    for j, ex in zip(ids, examples, strict=True):
        el, es = model.predict(*ex, k=5, mode="exact")
        ll, ls = model.predict(*ex, k=5, mode="lsh")
        found = 0
        for i in range(el.shape[0]):
            if j in el[i]:
                found += int(j in ll[i])
                if j in ll[i]:
                    assert ls[i][ll[i] == j][0] == pytest.approx(es[i][el[i] == j][0], rel=1e-5)
        assert found >= 0.8 * int((el == j).any(axis=1).sum())


def test_mix_weights_against_a_naive_twin():
    rng = np.random.default_rng(5)
    for _ in range(50):
        n, k = int(rng.integers(1, 7)), int(rng.integers(1, 12))
        ids = rng.integers(0, 30, size=(n, k))
        scores = rng.normal(size=(n, k)) * rng.uniform(0.1, 10.0)
        ids[rng.random((n, k)) < 0.1] = -1  # fewer than k scored
        scores[rng.random((n, k)) < 0.05] = -np.inf
        mix, q = lab.mix_weights(ids, scores)
        weight = np.zeros(30)
        for i in range(n):
            ok = (ids[i] >= 0) & np.isfinite(scores[i])
            if ok.any():
                e = np.exp((scores[i, ok] - scores[i, ok].max()) / lab.IMPRINT_TEMPERATURE)
                np.add.at(weight, ids[i, ok], e / e.sum())
        want = np.argsort(-weight, kind="stable")[: lab.IMPRINT_MIX]
        want = want[weight[want] > 0]
        assert mix.tolist() == want.tolist()
        if mix.size:
            np.testing.assert_allclose(q, weight[want] / weight[want].sum(), rtol=1e-12)
    mix, q = lab.mix_weights(np.full((2, 3), -1), np.full((2, 3), -np.inf))
    assert mix.size == 0 and q.size == 0


def test_round_down_bfloat16_never_rounds_up():
    from engine.kernels.optimizer import from_bfloat16, to_bfloat16

    rng = np.random.default_rng(6)
    x = (rng.normal(size=5000) * 10.0 ** rng.uniform(-6, 6, size=5000)).astype(np.float32)
    x[:3] = [0.0, -0.0, 1.5]  # exact already
    down = lab.round_down_bfloat16(x)
    assert (down <= x).all()
    np.testing.assert_array_equal(from_bfloat16(to_bfloat16(down)), down)  # stored as it is
    np.testing.assert_array_equal(down[:3], x[:3])
    # the largest bfloat16 value not above x: the next one up is above it
    bits = down.view(np.uint32)
    up = np.where(down >= 0, bits + np.uint32(0x10000), bits - np.uint32(0x10000)).view(np.float32)
    nonzero = down != 0
    assert (up[nonzero & (down > 0)] > x[nonzero & (down > 0)]).all()
    assert (up[down < 0] > x[down < 0]).all()


def test_add_labels_refuses_duplicates_and_empty_examples(data, trained):
    train, _ = data
    store, keep = trained
    model = load_model(store.latest()[1])
    model.add_labels([_points_with(train, keep, 3)], ["x"])
    with pytest.raises(lab.LabelError) as err:
        model.add_labels([_points_with(train, keep, 3)], ["x"])
    assert err.value.conflict and "exists" in str(err.value)
    with pytest.raises(lab.LabelError, match="already|exists"):
        model.add_labels([_points_with(train, keep, 3)], ["3"])  # an unnamed old label's id is its name
    with pytest.raises(lab.LabelError, match="no example"):
        model.add_labels([(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))], ["y"])


def test_insert_rows_adds_new_rows_to_their_buckets_keeping_the_newest_of_a_full_bucket():
    """insert_rows against a naive twin: untouched buckets as they were, a bucket taking new rows keeps the new
    ones (the last `capacity` when more arrive) after its newest old members (highest `inserted`, ties to the
    first listed), in id order."""
    from engine.tables import Tables

    rng = np.random.default_rng(9)
    n_tables, buckets, n, cap = 3, 12, 200, 6
    codes = rng.integers(0, buckets, (n_tables, n)).astype(np.int32)
    codes[:, :40] = 0  # a crowded first bucket
    offsets = np.zeros((n_tables, buckets + 1), np.int64)
    ids = np.zeros((n_tables, n), np.int32)
    for t in range(n_tables):  # up to cap members a bucket, each keeping its lowest ids
        members = [np.flatnonzero(codes[t] == b)[:cap] for b in range(buckets)]
        offsets[t, 1:] = np.cumsum([len(x) for x in members])
        ids[t, : offsets[t, -1]] = np.concatenate(members)
    inserted = rng.integers(0, 4, n).astype(np.int32)
    tb = Tables(
        codes, inserted, offsets, ids, np.zeros(4, np.float32), np.zeros(4, np.float32), *(np.zeros(0, np.int32),) * 2
    )
    for m in (1, 5, 30):
        new_codes = rng.integers(0, buckets, (n_tables, m)).astype(np.int32)
        new_codes[:, : m // 2] = buckets - 1  # the last bucket takes several, past capacity for m = 30
        got = lab.insert_rows(tb, new_codes, n, cap)
        assert got.codes.tolist() == np.concatenate([codes, new_codes], axis=1).tolist()
        all_inserted = np.concatenate([inserted, np.full(m, inserted.max(), np.int32)])
        assert got.inserted.tolist() == all_inserted.tolist()
        for t in range(n_tables):
            want: list[int] = []
            for b in range(buckets):
                members = ids[t, offsets[t, b] : offsets[t, b + 1]]
                new = [n + a for a in range(m) if new_codes[t, a] == b][-cap:] if m else []
                keep = min(len(members), cap - len(new))
                if keep < len(members):
                    rank = np.argsort(-all_inserted[members], kind="stable")[: max(keep, 0)]
                    members = np.sort(members[rank])
                want += members.tolist() + new
                assert got.offsets[t, b + 1] == len(want), (m, t, b)
            assert got.offsets[t, 0] == 0 and got.ids[t, : len(want)].tolist() == want


def test_find_names_finds_the_first_label_of_each_name_in_the_blob():
    rng = np.random.default_rng(4)
    alphabet = ["a", "b", "é", "中", "-", "7"]
    names = ["".join(rng.choice(alphabet, size=rng.integers(0, 5))) for _ in range(3000)]
    names += ["", "ab", "ab", "中中"]  # empty names and a repeated one: ids start where an empty name ends
    blob = LabelNames.from_list(names)
    wanted = list(dict.fromkeys(["ab", "中中", "zz", "é", "aaaaaaa", "", *names[:50], *rng.choice(names, 50)]))
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        first.setdefault(name, i)
    assert lab.find_names(blob, wanted) == {w: first[w] for w in wanted if w in first}
    assert lab.find_names(blob, []) == {}
    assert lab.find_names(lab.id_names(1000), ["999", "1000", "0", "01"]) == {"999": 999, "0": 0}


def test_imprint_gives_a_label_without_scored_examples_the_median_live_bias(data, trained):
    train, _ = data
    store, keep = trained
    model = load_model(store.latest()[1])
    model.retire_labels([0, 1, 2])
    no_points = (np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
    rows = lab.imprint_rows(model, [_points_with(train, keep, 3), no_points])
    biases = model.float_weights(model.depth - 1)[:, -1]
    assert np.isneginf(biases[:3]).all()
    assert rows[1, :-1].tolist() == [0.0] * (rows.shape[1] - 1)
    assert rows[1, -1] == np.float32(np.median(biases[3:]))
    assert np.isfinite(rows[0]).all() and rows[0, :-1].any()  # mixed from the labels its points score highest
    model.retire_labels(np.arange(model.num_labels))  # no live label: nothing to mix, a zero bias
    assert not lab.imprint_rows(model, [_points_with(train, keep, 3)]).any()


def test_retired_labels_are_never_predicted_and_leave_the_buckets(data, trained):
    train, test = data
    store, keep = trained
    model = load_model(store.latest()[1])
    x = (test.x_indptr, test.x_indices, test.x_values)
    top = model.predict(*x, k=3, mode="exact")[0]
    gone = np.unique(top)[:5]  # labels the model likes most
    assert model.retire_labels(gone).tolist() == gone.tolist()
    assert model.retire_labels(gone).size == 0  # already retired
    assert [model.label_status()[j] for j in gone] == ["retired"] * len(gone)
    for mode in ("exact", "lsh", "auto"):
        got = model.predict(*x, k=min(1000, model.num_labels), mode=mode)[0]
        assert not np.isin(got, gone).any()
    tb = model.tables[0]
    for t in range(tb.offsets.shape[0]):
        assert not np.isin(tb.ids[t, : tb.offsets[t, -1]], gone).any()
    assert not np.isin(tb.hubs, gone).any() and not np.isin(tb.serve_hubs, gone).any()
    with pytest.raises(lab.LabelError, match="does not exist"):
        model.retire_labels([model.num_labels])


def test_trainer_adds_and_retires_while_training_and_resumes(data, trained, tmp_path):
    train, test = data
    src, keep = trained
    store = SnapshotStore(tmp_path / "run")
    trainer = Trainer(
        CFG.replace(schedule=CFG.schedule.replace(epochs=1)),
        _drop_last_labels(train, keep),
        _drop_last_labels(test, keep),
        store,
    )
    trainer.run()
    ids = trainer.add_labels([_points_with(train, keep, 5)], ["added"])
    common = int(np.bincount(train.y_indices[train.y_indices < keep]).argmax())
    trainer.retire_labels([common])
    rehashed = trainer.rehash()
    assert rehashed > 0
    tb = trainer.model.tables[0]
    assert not np.isin(tb.ids[:, : tb.offsets[0, -1]], [common]).any()
    trainer.config = trainer.config.replace(schedule=trainer.config.schedule.replace(epochs=2))
    result = trainer.run()
    assert np.isfinite(result["loss"])
    path = store.latest()[1]
    model = load_model(path)
    assert model.num_labels == keep + 1 and model.label_names.names(ids) == ["added"]
    assert model.label_status()[common] == "retired" and model.label_status()[int(ids[0])] == "live"
    # a resumed trainer (a killed one, too, starts from here) keeps both
    again = Trainer.resume(store, _drop_last_labels(train, keep), _drop_last_labels(test, keep))
    assert again.model.num_labels == keep + 1
    assert again.adam.m[-1].shape[0] == keep + 1 and again._retired is not None and again._retired[common]
    again.config = again.config.replace(schedule=again.config.schedule.replace(epochs=3))
    again.run()
    model = load_model(store.latest()[1])
    assert model.label_status()[common] == "retired"
    got = model.predict(test.x_indptr, test.x_indices, test.x_values, k=50, mode="exact")[0]
    assert not (got == common).any()


def test_warm_start_grows_labels_and_features_and_leaves_the_source(data, trained, tmp_path):
    train, test = data
    src, keep = trained
    path = src.latest()[1]
    before = {n: a.copy() for n, a in load_arrays(path).items()}
    wider = Dataset(
        train.x_indptr,
        train.x_indices,
        train.x_values,
        train.y_indptr,
        train.y_indices,
        train.num_features + 7,
        train.num_labels,
    )
    trainer = Trainer(
        CFG.replace(
            model=CFG.model.replace(hidden=(64,)),
            optimizer=CFG.optimizer.replace(lr=1e-3),
            schedule=CFG.schedule.replace(epochs=1),
        ),
        wider,
        test,
        SnapshotStore(tmp_path / "ft"),
        init_from=src,
    )
    model = trainer.model
    assert trainer.config.model.hidden == (32,)  # the structure is the source's
    assert model.num_labels == train.num_labels and model.num_features == train.num_features + 7
    tb = model.tables[0]
    for j in range(keep, train.num_labels):
        for t in range(tb.codes.shape[0]):
            b = tb.codes[t, j]
            members = tb.ids[t, tb.offsets[t, b] : tb.offsets[t, b + 1]]
            assert j in members or np.diff(tb.offsets[t])[b] == model.config.sampling.bucket_size
    src_model = load_model(path)
    np.testing.assert_array_equal(model.float_weights(1)[:keep], src_model.float_weights(1))
    assert trainer.adam.m[1].shape[0] == train.num_labels
    result = trainer.run()
    assert np.isfinite(result["loss"]) and result["p_at_1"] > 0
    after = load_arrays(path)
    assert before.keys() == after.keys() and all(np.array_equal(before[n], after[n]) for n in before)


def test_warm_start_matches_labels_by_name(data, trained, tmp_path):
    train, test = data
    src, keep = trained
    # the source learns names 'L0'..; the new set lists its labels in reverse and adds one unseen name
    named = SnapshotStore(tmp_path / "named")
    t = Trainer(CFG.replace(schedule=CFG.schedule.replace(epochs=1)), _drop_last_labels(train, keep), None, named)
    t.attach_text(label_names=LabelNames.from_list([f"L{i}" for i in range(keep)]))
    t.run()
    order = np.arange(keep + 1)[::-1]  # dataset id i is the source's label order[i]
    names = [f"L{i}" if i < keep else "brand-new" for i in order]
    y = (keep - train.y_indices[train.y_indices < keep]).astype(np.int32)  # id in the reversed list
    sub = _drop_last_labels(train, keep)
    mine = Dataset(sub.x_indptr, sub.x_indices, sub.x_values, sub.y_indptr, y, train.num_features, keep + 1)
    trainer = Trainer(
        CFG.replace(schedule=CFG.schedule.replace(epochs=1)),
        mine,
        None,
        SnapshotStore(tmp_path / "ft2"),
        init_from=named,
        label_names=names,
    )
    assert trainer.model.num_labels == keep + 1
    assert trainer.model.label_names[keep] == "brand-new" and trainer.model.label_names[3] == "L3"
    batch = trainer._train_rows.take(np.arange(20))
    np.testing.assert_array_equal(batch.y_indices, sub.y_indices[: batch.y_indptr[-1]])  # back in the source's ids


@pytest.mark.slow
def test_cli_init_from_text_matches_names_and_terms(tmp_path, capsys):
    import json

    from engine.cli import main

    rng = np.random.default_rng(0)
    words = {f"c{c}": [f"w{c}x{i}" for i in range(8)] for c in range(6)}

    def write(path, classes, n):
        with open(path, "w") as fh:
            for _ in range(n):
                c = classes[rng.integers(len(classes))]
                fh.write(json.dumps({"text": " ".join(rng.choice(words[c], 4)), "labels": [c]}) + "\n")

    write(tmp_path / "a.jsonl", ["c0", "c1", "c2", "c3"], 300)
    write(tmp_path / "b.jsonl", ["c5", "c3", "c1", "c4"], 300)  # other order, two new classes and their words
    base = ["--quiet", "--hidden", "16", "--epochs", "3", "--val-points", "none", "--lr", "0.05"]
    assert main(["train", "--train", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "a"), *base]) == 0
    args = ["train", "--train", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "b"), "--init-from"]
    assert main([*args, str(tmp_path / "a"), *base]) == 0
    capsys.readouterr()
    model = load_model(SnapshotStore(tmp_path / "b").latest()[1])
    source = load_model(SnapshotStore(tmp_path / "a").latest()[1]).label_names.to_list()
    names = model.label_names.to_list()
    assert names[:4] == source and sorted(names[4:]) == ["c4", "c5"]  # old ids kept, new names after them
    assert model.featurizer is not None and model.featurizer.num_features == model.num_features
    assert main(["predict", "--model", str(tmp_path / "b"), "--text", "w4x1 w4x2 w4x3", "--k", "1"]) == 0
    assert "c4" in capsys.readouterr().out
    # an old class and its words, which the new data never showed, are still the model's
    assert model.featurizer.transform_one("w0x1 w0x2 w0x3")[0].size == 3
    assert main(["predict", "--model", str(tmp_path / "b"), "--text", "w0x1 w0x2 w0x3", "--k", "6"]) == 0
    assert "c0" in capsys.readouterr().out


def _examples(train: Dataset, label: int, n: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    indptr, indices, values = _points_with(train, label, n)
    return [(indices[indptr[i] : indptr[i + 1]], values[indptr[i] : indptr[i + 1]]) for i in range(len(indptr) - 1)]


def _same_model(a, b) -> None:
    """Two models with equal weights, tables and names."""
    assert a.num_labels == b.num_labels and a.config == b.config
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa, wb)
    for ta, tb in zip(a.tables, b.tables, strict=True):
        for name, x, y in zip(ta._fields, ta, tb, strict=True):
            if name != "ids":
                np.testing.assert_array_equal(x, y, err_msg=name)
        for t, end in enumerate(ta.offsets[:, -1]):  # past a table's last bucket its ids are unused
            np.testing.assert_array_equal(ta.ids[t, :end], tb.ids[t, :end])
    assert (a.label_names is None) == (b.label_names is None)
    if a.label_names is not None:
        assert a.label_names.to_list() == b.label_names.to_list()


def test_edit_snapshot_publishes_a_delta_that_loads_as_the_edited_model(data, trained, tmp_path):
    import shutil

    train, test = data
    src, keep = trained
    store = SnapshotStore(tmp_path / "copy")
    shutil.copytree(src.root, store.root)
    base_version, base = store.latest()
    held = load_model(base)
    before = [np.array(w) for w in held.weights] + [np.array(a) for a in held.tables[0]]
    edit = lab.edit_snapshot(store, add=[("fresh", _examples(train, keep))], retire=[0], model=held)
    assert edit.added.tolist() == [keep] and edit.retired.tolist() == [0] and edit.version == base_version + 1
    new = store.path(edit.version)
    # the delta holds the new row, its buckets, its name and the retired id: nothing of the size of the model
    assert sorted(p.name for p in new.iterdir() if p.suffix == ".npy") == [
        "delta_codes.npy",
        "delta_names_data.npy",
        "delta_names_offsets.npy",
        "delta_retired.npy",
        "delta_rows.npy",
    ]
    assert sum(p.stat().st_size for p in new.iterdir()) < 20_000
    assert read_manifest(new)["delta"] == {"parent": base_version, "depth": 1}
    # read from disk, or applied to the model a server holds: the model the same edit makes in memory
    twin = load_model(base)
    twin.add_labels([_points_with(train, keep, 5)], ["fresh"])
    twin.retire_labels([0])
    cold = load_model(new, verify=True)
    _same_model(cold, twin)
    warm = load_model(new, base=held)
    _same_model(warm, twin)
    assert warm.version == cold.version == edit.version and warm.featurizer is held.featurizer
    # ... and the held model is as it was (requests still reading it see no change)
    after = list(held.weights) + list(held.tables[0])
    assert held.num_labels == keep and all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))
    indptr, indices, values = _points_with(train, keep, 5)
    for mode in ("lsh", "exact"):
        got = warm.predict(indptr, indices, values, k=5, mode=mode)[0]
        assert (got == keep).any() and not (got == 0).any()
    with pytest.raises(lab.LabelError, match="exists"):
        lab.edit_snapshot(store, add=[("fresh", _examples(train, keep))])
    assert lab.edit_snapshot(store, retire=[0]).version is None  # retired already: nothing to publish
    # training resumes from the delta version: Adam's state of the new row is zero, the label stays retired
    trainer = Trainer.resume(store, _drop_last_labels(train, keep), _drop_last_labels(test, keep))
    assert trainer.adam.m[1].shape[0] == keep + 1 and not trainer.adam.v[1][keep].any()
    assert trainer._retired is not None and trainer._retired[0]
    _same_model(trainer.model, twin)
    # a trainer's next snapshot is a full version
    trainer.config = trainer.config.replace(schedule=trainer.config.schedule.replace(epochs=trainer.epoch + 1))
    trainer.run()
    assert "delta" not in read_manifest(store.latest()[1]) and load_model(store.latest()[1]).num_labels == keep + 1


def test_deltas_are_compacted_and_their_chain_is_kept_until_then(data, trained, tmp_path, monkeypatch):
    import shutil

    from engine import delta

    monkeypatch.setattr(delta, "MAX_DEPTH", 3)
    train, test = data
    src, keep = trained
    store = SnapshotStore(tmp_path / "copy", keep=1)
    shutil.copytree(src.root, store.root)
    base_version, base = store.latest()
    inodes = {name: (base / f"{name}.npy").stat().st_ino for name in ("w0", "opt_v1")}
    twin = load_model(base)
    held = load_model(base)
    for i in range(4):
        label = keep + i
        edit = lab.edit_snapshot(store, add=[(f"n{i}", _examples(train, label))], retire=[i], model=held)
        twin.add_labels([_points_with(train, label, 5)], [f"n{i}"])
        twin.retire_labels([i])
        manifest = read_manifest(store.path(edit.version))
        if i < 3:  # deltas on deltas; pruning keeps the chain they apply to
            assert manifest["delta"]["depth"] == i + 1
            assert store.versions() == list(range(base_version, edit.version + 1))
        else:  # the chain is full: a full version, linking what no edit changed, and the chain goes
            assert "delta" not in manifest and store.versions() == [edit.version]
            for name, inode in inodes.items():
                assert (store.path(edit.version) / f"{name}.npy").stat().st_ino == inode
        held = load_model(store.path(edit.version), base=held)
        _same_model(held, twin)
        _same_model(load_model(store.path(edit.version), verify=True), twin)


def test_compact_makes_the_newest_delta_a_full_version_under_its_own_number(data, trained, tmp_path):
    import shutil

    from engine import delta

    train, _ = data
    src, keep = trained
    store = SnapshotStore(tmp_path / "copy", keep=1)
    shutil.copytree(src.root, store.root)
    assert delta.compact(store) is None  # the newest is full already
    held = load_model(store.latest()[1])
    for i in range(2):
        edit = lab.edit_snapshot(store, add=[(f"n{i}", _examples(train, keep + i))])
        held = load_model(store.path(edit.version), base=held)
    before = read_manifest(store.path(edit.version))
    version = delta.compact(store, model=held)
    assert version == edit.version == held.version  # the number clients were answered with
    manifest = read_manifest(store.path(version))
    assert "delta" not in manifest and manifest["compacted"]["delta"] == before["delta"]
    assert manifest["created_at"] == before["created_at"] and manifest["version"] == version
    assert store.versions() == [version]  # the chain went at the prune
    _same_model(load_model(store.path(version), verify=True), held)
    assert delta.compact(store) is None
    # the next edit is a delta on it
    after = lab.edit_snapshot(store, add=[("n2", _examples(train, keep + 2))])
    assert after.version == version + 1 and read_manifest(store.path(after.version))["delta"]["parent"] == version
    assert load_model(store.path(after.version), verify=True).label_names[keep + 2] == "n2"


def test_a_pinned_delta_version_keeps_its_chain(data, trained, tmp_path, monkeypatch):
    import shutil

    from engine import delta

    monkeypatch.setattr(delta, "MAX_DEPTH", 2)
    train, _ = data
    src, keep = trained
    store = SnapshotStore(tmp_path / "copy", keep=1)
    shutil.copytree(src.root, store.root)
    base = store.latest()[0]
    pinned = lab.edit_snapshot(store, add=[("a", _examples(train, keep))]).version
    store.pin("alias", pinned)
    for i in range(1, 4):  # a delta on the pinned one, a compaction, a delta on that
        lab.edit_snapshot(store, add=[(f"n{i}", _examples(train, keep + i))])
    # the newest and its full version; the pinned delta and the full version it applies to
    assert store.versions() == [base, pinned, pinned + 2, pinned + 3]
    assert load_model(store.path(pinned), verify=True).label_names[keep] == "a"
    store.unpin("alias")
    lab.edit_snapshot(store, retire=[0])
    assert store.versions() == [pinned + 2, pinned + 3, pinned + 4]


def test_a_damaged_delta_is_refused(data, trained, tmp_path):
    import shutil

    from engine.snapshot import SnapshotError

    train, _ = data
    src, keep = trained
    store = SnapshotStore(tmp_path / "copy")
    shutil.copytree(src.root, store.root)
    held = load_model(store.latest()[1])
    path = store.path(lab.edit_snapshot(store, add=[("a", _examples(train, keep))]).version)
    codes = path / "delta_codes.npy"
    raw = bytearray(codes.read_bytes())
    raw[-1] ^= 0xFF
    codes.write_bytes(bytes(raw))
    for base in (None, held):  # read whole or applied to a held model: checksums are always verified
        with pytest.raises(SnapshotError, match="checksum"):
            load_model(path, base=base)


def test_warm_start_estimate_counts_the_grown_shape_and_the_copies(data, trained):
    from engine.memory import estimate_for
    from engine.warmstart import estimate_warm_start, warm_start_shape

    train, test = data
    src, keep = trained
    shape = warm_start_shape(
        src, CFG.replace(model=CFG.model.replace(hidden=(64,))), train.num_features + 5, train.num_labels
    )
    assert shape.config.model.hidden == (32,) and shape.num_labels == train.num_labels
    assert shape.num_features == train.num_features + 5
    named = warm_start_shape(src, CFG, train.num_features, 10, named=True)
    assert named.num_labels == keep + 10  # by name every label may be new
    est = estimate_warm_start(src, CFG.replace(model=CFG.model.replace(hidden=(64,))), train, test)
    plain = estimate_for(CFG, train, test)  # the source's 32-wide structure, fresh
    assert est.parts["warm_start"] > 0 and est.trainer == plain.trainer + est.parts["warm_start"]


def test_owned_bytes_counts_what_a_version_holds_beyond_its_mapped_files(data, trained, tmp_path):
    import shutil

    from engine import owned_bytes
    from engine.snapshot import model_arrays

    train, _ = data
    src, keep = trained
    store = SnapshotStore(tmp_path / "copy")
    shutil.copytree(src.root, store.root)
    base = store.latest()[1]
    mapped = load_model(base)
    everything = sum(a.nbytes for a in model_arrays(mapped).values())
    assert owned_bytes(mapped) < 64  # all mapped but the one-byte-a-layer serve flags made on the fly
    assert owned_bytes(load_model(base, mmap=False)) == everything
    edit = lab.edit_snapshot(store, add=[("fresh", _examples(train, keep))], model=mapped)
    built = load_model(store.path(edit.version))  # the full version mapped, the delta applied in memory
    out = built.weights[-1]
    grown = out if out.base is None else out.base
    # its output layer (in a buffer with spare rows) and the buckets the new row went into are its own
    assert grown.nbytes + built.tables[0].ids.nbytes <= owned_bytes(built) < everything + grown.nbytes
