"""Text datasets: the featurizer against scikit-learn, JSONL parsing, label vocabularies, text in snapshots,
pinned snapshot versions, and the CLI's text path."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer

from engine import cli
from engine.config import ModelConfig, OptimizerConfig, SamplingConfig, ScheduleConfig, SlideConfig
from engine.metrics import evaluate_model, softmax_rows, topk_recall
from engine.snapshot import SnapshotError, SnapshotStore, load_model
from engine.text import (
    JSONLParseError,
    JSONLStreamParser,
    LabelNames,
    TextFeaturizer,
    TextRecords,
    decode_strings,
    encode_strings,
    featurize_like,
    fit_text_dataset,
    load_text_info,
    read_jsonl,
    read_label_names,
    save_text_info,
)
from engine.trainer import Trainer

WORDS = [f"w{i}" for i in range(60)]


def text_records(n: int, seed: int, num_labels: int = 12, extra_label: str | None = None) -> TextRecords:
    """Label j owns words 5j..5j+4; a point's text mixes 3 words of each of its labels with 2 random words."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        own = sorted(rng.choice(num_labels, size=int(rng.integers(1, 3)), replace=False).tolist())
        words = [WORDS[5 * j + int(rng.integers(0, 5))] for j in own for _ in range(3)]
        words += [WORDS[int(rng.integers(0, len(WORDS)))] for _ in range(2)]
        rng.shuffle(words)
        names = [f"label é{j}" for j in own]
        if extra_label and i % 4 == 0:
            names.append(extra_label)
        texts.append(" ".join(words))
        labels.append(names)
    return TextRecords(texts, labels)


def jsonl_bytes(records: TextRecords) -> bytes:
    return b"".join(
        json.dumps({"text": t, "labels": y}).encode() + b"\n"
        for t, y in zip(records.texts, records.labels, strict=True)
    )


# ---- strings and names -----------------------------------------------------------------------------


def test_strings_round_trip_through_blob_and_offsets():
    names = ["a", "", "ünïcødé", "emoji 🚀", "x" * 300]
    data, offsets = encode_strings(names)
    assert data.dtype == np.uint8 and offsets.dtype == np.int64 and offsets[-1] == len(data)
    assert decode_strings(data, offsets) == names
    ln = LabelNames(data, offsets)
    assert [ln[i] for i in range(len(names))] == names
    assert ln.names([2, 7, -1, 0]) == ["ünïcødé", None, None, "a"]


def test_label_names_file_errors_name_the_line():
    assert read_label_names(["\ufeffa\n", "b\r\n"], 2).to_list() == ["a", "b"]
    with pytest.raises(JSONLParseError) as exc:
        read_label_names(["a", "b", "a"])
    assert exc.value.line == 3 and "repeats line 1" in exc.value.reason
    with pytest.raises(JSONLParseError) as exc:
        read_label_names(["a", "  ", "c"])
    assert exc.value.line == 2
    with pytest.raises(JSONLParseError, match="2 names for 3 labels"):
        read_label_names(["a", "b"], 3)


# ---- featurizer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [{}, {"sublinear_tf": False, "ngram_range": [1, 2]}, {"min_df": 2}])
def test_fast_transform_equals_sklearn_transform(params):
    train = text_records(80, 1)
    featurizer, matrix = TextFeaturizer.fit(train.texts, params)
    queries = text_records(30, 2).texts + ["W3 w3 w3 unknownword", "nothing known here", "Ünïcode w7 w7"]
    p = {**featurizer.params, "ngram_range": tuple(featurizer.params["ngram_range"])}
    reference = TfidfVectorizer(dtype=np.float32, vocabulary=featurizer.vocabulary, **p)
    reference.idf_ = featurizer.idf
    want = reference.transform(queries).tocsr()
    want.sort_indices()
    indptr, indices, values = featurizer.transform(queries)
    np.testing.assert_array_equal(indptr, want.indptr)
    np.testing.assert_array_equal(indices, want.indices)
    np.testing.assert_allclose(values, want.data, rtol=1e-6, atol=1e-7)
    # the fitted matrix of the training texts is what transform gives for them
    again = featurizer.transform(train.texts)
    fitted = matrix.copy()
    fitted.sort_indices()
    np.testing.assert_array_equal(again[1], fitted.indices)
    np.testing.assert_allclose(again[2], fitted.data, rtol=1e-6, atol=1e-7)
    empty_ids, empty_vals = featurizer.transform_one("nothing known here")
    assert empty_ids.size == 0 and empty_vals.size == 0


def test_featurizer_round_trips_as_arrays_without_pickle(tmp_path):
    featurizer, _ = TextFeaturizer.fit(text_records(40, 3).texts)
    arrays = featurizer.to_arrays()
    for name, arr in arrays.items():
        np.save(tmp_path / f"{name}.npy", arr)
    loaded = {n: np.load(tmp_path / f"{n}.npy", allow_pickle=False) for n in arrays}
    again = TextFeaturizer.from_arrays(json.loads(json.dumps(featurizer.meta())), loaded)
    q = "w1 w2 w2 w40 zzz"
    for a, b in zip(featurizer.transform_one(q), again.transform_one(q), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unsupported text featurizer"):
        TextFeaturizer.from_arrays({**featurizer.meta(), "format_version": 99}, loaded)


def test_fit_refuses_text_without_words():
    with pytest.raises(ValueError, match="no words"):
        TextFeaturizer.fit(["a", "b ."])


# ---- JSONL ------------------------------------------------------------------------------------------


def parse(raw: bytes, chunk: int = 7) -> TextRecords:
    p = JSONLStreamParser(max_bytes=1 << 20)
    for i in range(0, len(raw), chunk):
        p.feed(raw[i : i + chunk])
    return p.finish()


def test_jsonl_stream_parses_split_chunks_gzip_crlf_bom_and_blank_lines():
    raw = '\ufeff{"text": "red shoes", "labels": ["shoes"]}\r\n\n{"text": "blue hat", "labels": []}\n{"text": "x y"}'
    for body in (raw.encode(), gzip.compress(raw.encode())):
        r = parse(body, chunk=3)
        assert r.texts == ["red shoes", "blue hat", "x y"]
        assert r.labels == [["shoes"], [], []]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"labels": ["a"]}', "`text` must be a string, got null"),
        ('{"text": 5, "labels": []}', "`text` must be a string, got a number"),
        ('{"text": "   ", "labels": []}', "`text` is empty"),
        ('{"text": "a b", "labels": "a"}', "`labels` must be a list"),
        ('{"text": "a b", "labels": ["a", 3]}', "`labels[1]` must be a non-empty string"),
        ('{"text": "a b", "labels": ["a", "a"]}', "repeats the name"),
        ('{"text": "a b", "label": []}', "unknown field"),
    ],
)
def test_jsonl_errors_name_the_line(line, reason):
    raw = ('{"text": "ok words", "labels": ["a"]}\n\n' + line + "\n").encode()
    with pytest.raises(JSONLParseError) as exc:
        parse(raw)
    assert exc.value.line == 3
    assert reason in exc.value.reason


def test_jsonl_size_limit_and_empty_input():
    from engine.data import XMCTooLargeError

    p = JSONLStreamParser(max_bytes=10)
    with pytest.raises(XMCTooLargeError):
        p.feed(b'{"text": "long enough to pass the limit"}\n')
    with pytest.raises(JSONLParseError, match="empty input"):
        parse(b"\n\n")


# ---- datasets -------------------------------------------------------------------------------------


def test_fit_and_like_share_features_and_labels_and_count_unknown_names(tmp_path):
    train = text_records(60, 4)
    test = text_records(20, 5, num_labels=12, extra_label="never seen")
    ds, featurizer, names = fit_text_dataset(train)
    assert ds.num_features == featurizer.num_features and ds.num_labels == len(names)
    # label ids follow the names
    for i in (0, 7, 59):
        row = ds.y_indices[ds.y_indptr[i] : ds.y_indptr[i + 1]].tolist()
        assert sorted(names[j] for j in row) == sorted(train.labels[i])
    like, unknown = featurize_like(test, featurizer, names)
    known = names.index()
    want_unknown = sum(1 for ys in test.labels for y in ys if y not in known)
    assert unknown == want_unknown == 5
    assert like.num_features == ds.num_features and like.num_labels == ds.num_labels
    for i in range(like.num_points):
        row = like.y_indices[like.y_indptr[i] : like.y_indptr[i + 1]].tolist()
        assert sorted(names[j] for j in row) == sorted(y for y in test.labels[i] if y in known)
    save_text_info(tmp_path, featurizer, names, {"format": "jsonl"})
    f2, n2, meta = load_text_info(tmp_path)
    assert f2.terms == featurizer.terms and n2.to_list() == names.to_list() and meta["format"] == "jsonl"
    save_text_info(tmp_path, None, LabelNames.from_list(["x"] * 0 + names.to_list()[::-1]))
    f3, n3, meta3 = load_text_info(tmp_path)
    assert f3 is not None and n3.to_list() == names.to_list()[::-1] and meta3["format"] == "jsonl"
    assert load_text_info(tmp_path / "nothing") == (None, None, {})


def test_a_training_set_without_labels_is_refused():
    with pytest.raises(JSONLParseError, match="no line has labels"):
        fit_text_dataset(TextRecords(["a b", "c d"], [[], []]))


# ---- snapshots, pins, metrics ---------------------------------------------------------------------------

# Dense layers: these tests are about text and names, and a dense model of 12 labels learns them in 10 epochs.
CFG = SlideConfig(
    model=ModelConfig(hidden=(16,), sample_output=False, sample_hidden=False),
    sampling=SamplingConfig(hash_k=3, hash_l=4),
    optimizer=OptimizerConfig(batch_size=16, lr=0.01),
    schedule=ScheduleConfig(epochs=10),
    seed=1,
    threads=1,
)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-model")
    train, featurizer, names = fit_text_dataset(text_records(200, 6))
    test, _ = featurize_like(text_records(40, 7), featurizer, names)
    trainer = Trainer(CFG, train, test, SnapshotStore(root / "snapshots", keep=2))
    trainer.attach_text(featurizer, names)
    trainer.run(snapshot_every_s=1e9)
    return root / "snapshots", featurizer, names, test


@pytest.mark.slow
def test_a_snapshot_alone_serves_text_and_names(text_model):
    store_dir, featurizer, names, test = text_model
    model = load_model(SnapshotStore(store_dir).latest()[1])
    assert model.featurizer.terms == featurizer.terms and model.label_names.to_list() == names.to_list()
    indptr, indices, values = model.featurizer.transform(["w0 w1 w2 w3", "w30 w31 w32"])
    labels, _ = model.predict(indptr, indices, values, k=1, mode="exact")
    # words 5j..5j+4 belong to label j: the planted label comes first
    assert model.label_names.names(labels[:, 0].tolist()) == ["label é0", "label é6"]
    metrics = evaluate_model(model, test, k=5, mode="exact")
    assert metrics["points"] == 40 and metrics["p_at_1"] > 0.9 and "recall_vs_exact" not in metrics
    lsh = evaluate_model(model, test, k=5, mode="lsh")
    assert lsh["recall_vs_exact"] == 1.0  # a dense output layer: lsh scores every label


@pytest.mark.slow
def test_resume_keeps_the_featurizer(text_model, tmp_path):
    store_dir, featurizer, names, _ = text_model
    import shutil

    shutil.copytree(store_dir, tmp_path / "s")
    store = SnapshotStore(tmp_path / "s", keep=5)
    model = load_model(store.latest()[1])
    train, _ = featurize_like(text_records(200, 6), model.featurizer, model.label_names)
    trainer = Trainer.resume(store, train)
    trainer.publish()
    again = load_model(store.latest()[1])
    assert again.featurizer.terms == featurizer.terms and again.label_names.to_list() == names.to_list()


def test_snapshots_without_text_load_with_none(tmp_path):
    from tests.engine import naive

    data = naive.planted_dataset(50, 20, 10, seed=1, vocab=4, noise=2)
    trainer = Trainer(CFG.replace(schedule=CFG.schedule.replace(epochs=1)), data, None, SnapshotStore(tmp_path))
    trainer.publish()
    model = load_model(SnapshotStore(tmp_path).latest()[1])
    assert model.featurizer is None and model.label_names is None


def test_pinned_versions_outlive_keep_until_unpinned(tmp_path):
    store = SnapshotStore(tmp_path, keep=2)
    arrays = {"a": np.arange(3)}
    for _ in range(2):
        store.publish(arrays, {})
    store.pin("prod", 1)
    for _ in range(3):
        store.publish(arrays, {})
    assert store.versions() == [1, 4, 5] and store.pins() == {"prod": 1}
    store.pin("prod", 5)  # the alias moved: version 1 goes at the next prune
    store.publish(arrays, {})
    assert store.versions() == [5, 6]
    with pytest.raises(SnapshotError, match="not retained"):
        store.pin("old", 2)
    store.unpin("prod")
    store.publish(arrays, {})
    assert store.versions() == [6, 7] and store.pins() == {}
    with pytest.raises(ValueError):
        store.pin("../x", 6)


def test_softmax_rows_and_recall_against_naive():
    rows = softmax_rows([[2.0, 1.0, -1.0], [], [5.0]])
    e = np.exp(np.array([2.0, 1.0, -1.0]))
    np.testing.assert_allclose(rows[0], e / e.sum())
    assert rows[1] == [] and rows[2] == [1.0]
    assert topk_recall(np.array([[1, 2, -1], [4, 5, 6]]), np.array([[2, 3, 1], [6, -1, -1]])) == pytest.approx(
        (2 / 3 + 1) / 2
    )


# ---- CLI ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_trains_on_jsonl_and_predicts_names(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_bytes(jsonl_bytes(text_records(200, 8)))
    (tmp_path / "test.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(text_records(30, 9))))
    out = tmp_path / "model"
    argv = ["train", "--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.jsonl.gz")]
    argv += ["--out", str(out), "--quiet", "--hidden", "16", "--epochs", "10", "--batch-size", "16"]
    argv += ["--threads", "1", "--lr", "0.01", "--dense"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(out), "--text", "w10 w11 w12", "--k", "2", "--mode", "exact"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["names"][0] == "label é2" and len(line["labels"]) == 2
    assert cli.main(["eval", "--model", str(out), "--test", str(tmp_path / "test.jsonl.gz"), "--mode", "exact"]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert record["points"] == 30 and record["p_at_1"] > 0.5
    assert cli.main(["predict", "--model", str(out), "--text", " "]) == 2


def test_read_jsonl_file(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a b", "labels": ["x"]}\n')
    assert read_jsonl(tmp_path / "a.jsonl").labels == [["x"]]
