"""Bad input, refused cleanly: malformed, oversized and hostile uploads; invalid predict requests; ids and names
that try to leave the data dir.

Every refusal is a 4xx (or the documented 503) `application/problem+json` naming the line or field at fault, and
leaves the data dir (every file, byte for byte) and the database (every row of every table) as they were. One
service serves the whole module: a real dataset, a trained job and a job that never trained, all settled (no
trainer running), so nothing changes the state between the snapshots but the request under test.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.app.helpers import (
    all_routes,
    asgi_request,
    assert_problem,
    assert_unchanged,
    data_state,
    gzip_bytes,
    wait_for,
)
from tests.conftest import make_settings

LIMIT = 64 * 1024  # SLIDE_MAX_UPLOAD_BYTES of the module's service
MAX_K, MAX_INSTANCES = 50, 8
FEED_BATCH_BYTES = 1 << 20  # app.services.datasets: the body is handed to the parser a MiB at a time


@dataclass
class Svc:
    client: Any
    settings: Any
    dataset_id: str
    trained: str  # a completed job: its model answers
    untrained: str  # a job stopped before it trained: its model has no snapshot
    num_features: int
    root: Path  # holds the data dir and, beside it, `outside/`
    outside: Path  # a directory outside the data dir that nothing may touch


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, warm_engine: None) -> Iterator[Svc]:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from engine import generate, write_xmc

    root = tmp_path_factory.mktemp("bad-input")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("sentinel: nothing may read, change or delete this\n")
    train, _ = generate("tiny", seed=3, num_train=120, num_test=10)
    text = write_xmc(train, root / "train.txt").read_bytes()
    assert len(text) < LIMIT
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("SLIDE_"):
                mp.delenv(name)
        settings = make_settings(
            root / "svc" / "data",
            max_upload_bytes=LIMIT,
            predict_max_k=MAX_K,
            predict_max_instances=MAX_INSTANCES,
            max_concurrent_jobs=1,
        )
        with TestClient(create_app(settings)) as client:
            r = client.post(
                "/v1/datasets", params={"name": "train"}, content=text, headers={"Content-Type": "text/plain"}
            )
            assert r.status_code == 201, r.text
            dataset_id = r.json()["id"]
            config = {"model": {"hidden": [16]}, "optimizer": {"batch_size": 64}, "schedule": {"epochs": 1}, "seed": 1}
            trained = client.post("/v1/jobs", json={"train_dataset_id": dataset_id, "config": config}).json()["id"]
            # One job at a time: this one waits behind the first and is stopped before it ever trains.
            untrained = client.post("/v1/jobs", json={"train_dataset_id": dataset_id, "config": config}).json()["id"]
            assert client.post(f"/v1/jobs/{untrained}/stop").json()["state"] == "stopped"
            wait_for(
                lambda: client.get(f"/v1/jobs/{trained}").json()["state"] in ("completed", "failed"),
                timeout=120,
                what="the trained job to finish",
            )
            assert client.get(f"/v1/jobs/{trained}").json()["state"] == "completed"
            yield Svc(client, settings, dataset_id, trained, untrained, train.num_features, root, outside)


# ------------------------------------------------------------------------------------------------ uploads

# (id, text, line named in the problem (None: the file as a whole), words of the detail)
MALFORMED = [
    ("non-numeric feature id", b"2 10 4\n0 1:1.0\n1 x:1.0\n", 3, "expected a number in 'x:1.0'"),
    ("non-numeric value", b"1 10 4\n0 1:abc\n", 2, "expected a number"),
    ("non-numeric label", b"1 10 4\nfoo 1:1\n", 2, "expected a number in 'foo'"),
    ("feature id >= num_features", b"2 10 4\n0 1:1\n1 3:1 10:0.5\n", 3, "feature index 10 >= num_features 10"),
    ("label >= num_labels", b"1 10 4\n1,4 1:1\n", 2, "label 4 >= num_labels 4"),
    ("negative feature id", b"1 10 4\n0 -3:1\n", 2, "negative feature index"),
    ("negative label", b"1 10 4\n-1 1:1\n", 2, "negative label"),
    ("NaN value", b"1 10 4\n0 1:nan\n", 2, "not finite"),
    ("infinite value", b"1 10 4\n0 1:-Infinity\n", 2, "not finite"),
    ("value past float32", b"1 10 4\n0 1:1e39\n", 2, "outside the float32 range"),
    ("duplicate feature id", b"1 10 4\n0 1:1 2:1 1:2\n", 2, "feature index 1 appears more than once"),
    ("duplicate label", b"1 10 4\n2,2 1:1\n", 2, "label 2 appears more than once"),
    ("feature without value", b"1 10 4\n0 1:1 5\n", 2, "has no ':'"),
    ("NUL byte", b"1 10 4\n0 1:\x001\n", 2, "expected a number"),
    ("header declares more points", b"3 10 4\n0 1:1\n1 2:1\n", 4, "declares 3 points but the file ends after 2"),
    ("header declares fewer points", b"1 10 4\n0 1:1\n1 2:1\n", 3, "more points than the 1 declared"),
    ("header not numbers", b"three ten four\n0 1:1\n", 1, "the header must be"),
    ("header with two counts", b"1 10\n0 1:1\n", 1, "the header must be"),
    ("header missing", b"0 1:1\n1 2:1\n", 1, "is the header missing?"),
    ("header past int32", b"1 99999999999 4\n0 1:1\n", 1, "num_features 99999999999 is larger than"),
    ("header of no points", b"0 10 4\n", None, "the dataset has no points"),
    ("empty body", b"", 1, "empty input"),
    ("blank lines only", b"\n\n\n", 1, "the header must be"),
    ("binary garbage after the header", b"2 10 4\n0 1:1\n" + random.Random(1).randbytes(512), 3, ""),
]


def _send(client: Any, text: bytes, transport: str, **kwargs: Any):
    if transport == "text/plain":
        return client.post("/v1/datasets", content=text, headers={"Content-Type": "text/plain"}, **kwargs)
    if transport == "gzip":
        return client.post(
            "/v1/datasets", content=gzip_bytes(text), headers={"Content-Type": "application/gzip"}, **kwargs
        )
    return client.post("/v1/datasets", files={"file": ("bad.txt", text, "text/plain")}, **kwargs)


@pytest.mark.parametrize("transport", ["text/plain", "gzip", "multipart"])
@pytest.mark.parametrize(("text", "line", "words"), [pytest.param(*c[1:], id=c[0]) for c in MALFORMED])
def test_malformed_upload_is_422_naming_the_line_and_leaves_nothing(
    svc: Svc, text: bytes, line: int | None, words: str, transport: str
) -> None:
    before = data_state(svc.client)
    p = assert_problem(_send(svc.client, text, transport), 422)
    assert p["type"] == "urn:slide:problem:invalid-content" and p["field"] == "body", p
    assert words in p["detail"], p
    if line is not None:
        assert p["line"] == line and p["detail"].startswith(f"line {line}"), p
    assert_unchanged(before, data_state(svc.client))


GARBAGE = random.Random(7).randbytes(8192)  # deterministic; not gzip (does not start with 1f 8b)
VALID = b"2 10 4\n0,1 1:0.5 3:1\n2 4:1\n"
_rng = random.Random(3)
VARIED = b"400 1000 50\n" + b"".join(  # valid, and compresses too little for a cut gzip to hold all of it
    (
        f"{_rng.randrange(50)} {_rng.randrange(500)}:{_rng.random():.4f} "
        f"{500 + _rng.randrange(500)}:{_rng.random():.4f}\n"
    ).encode()
    for _ in range(400)
)
TOO_BIG = b"12000 10 4\n" + b"0 1:1\n" * 12000  # 72 KB of valid lines > LIMIT


def _multipart(body: bytes, boundary: str = "b0undary") -> tuple[bytes, dict[str, str]]:
    data = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n'.encode()
        + body
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return data, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


# (id, body, headers, status, field, words)
OTHER_UPLOADS = [
    ("binary garbage", GARBAGE, {"Content-Type": "application/octet-stream"}, 422, "body", "line 1: the header"),
    (
        "gzip without its trailer",
        gzip_bytes(VARIED)[:-8],
        {"Content-Type": "application/gzip"},
        422,
        "body",
        "truncated",
    ),
    (
        "gzip cut in half",
        gzip_bytes(VARIED)[: len(gzip_bytes(VARIED)) // 2],
        {"Content-Encoding": "gzip"},
        422,
        "body",
        "truncated",
    ),
    (
        "corrupt gzip",
        gzip_bytes(VALID)[:10] + GARBAGE,
        {"Content-Type": "application/gzip"},
        422,
        "body",
        "corrupt gzip",
    ),
    ("declared gzip, sent plain", VALID, {"Content-Type": "text/plain", "Content-Encoding": "gzip"}, 422, "body", ""),
    ("unknown Content-Encoding", VALID, {"Content-Encoding": "br"}, 415, None, "Content-Encoding 'br'"),
    ("JSON instead of a file", b'{"a": 1}', {"Content-Type": "application/json"}, 415, None, "application/json"),
    (
        "multipart without boundary",
        VALID,
        {"Content-Type": "multipart/form-data"},
        422,
        "header.content-type",
        "boundary",
    ),
    (
        "multipart without a file part",
        _multipart(VALID)[0].replace(b'name="file"', b'name="other"'),
        _multipart(b"")[1],
        422,
        "body.file",
        "no `file` part",
    ),
    ("multipart cut short", _multipart(VALID)[0][:-20], _multipart(b"")[1], 422, "body.file", "ended inside"),
    ("over the limit (Content-Length)", TOO_BIG, {"Content-Type": "text/plain"}, 413, None, "larger than the limit"),
    ("over the limit in multipart", *_multipart(TOO_BIG), 413, None, "larger than the limit"),
]


@pytest.mark.parametrize(
    ("body", "headers", "status", "field", "words"), [pytest.param(*c[1:], id=c[0]) for c in OTHER_UPLOADS]
)
def test_other_bad_uploads_are_refused_and_leave_nothing(
    svc: Svc, body: bytes, headers: dict[str, str], status: int, field: str | None, words: str
) -> None:
    before = data_state(svc.client)
    p = assert_problem(svc.client.post("/v1/datasets", content=body, headers=headers), status)
    assert words in p["detail"], p
    if field is not None:
        assert p["field"] == field, p
    if status == 413:
        assert p["limit_bytes"] == LIMIT, p
    assert_unchanged(before, data_state(svc.client))


@pytest.mark.parametrize("name", ["a\x00b", "tab\there", "line\nbreak", "x" * 201, ""])
def test_bad_dataset_name_is_422_naming_the_parameter(svc: Svc, name: str) -> None:
    before = data_state(svc.client)
    p = assert_problem(
        svc.client.post("/v1/datasets", params={"name": name}, content=VALID, headers={"Content-Type": "text/plain"}),
        422,
    )
    assert p["field"] == "query.name", p
    assert_unchanged(before, data_state(svc.client))


def _bomb(members: int) -> bytes:
    """gzip members of 6 MiB of valid lines each (6 KiB compressed): `cat`-ed gzip files are one gzip stream."""
    one = gzip.compress(b"0 1:1\n" * (1 << 20), compresslevel=9, mtime=0)
    return gzip.compress(b"999999999 10 4\n", mtime=0) + one * members


@pytest.mark.parametrize("how", ["application/gzip", "Content-Encoding: gzip", "multipart"])
def test_gzip_bomb_is_stopped_while_streaming(svc: Svc, how: str) -> None:
    bomb = _bomb(members=700)  # ~4 MiB that inflate to ~4.4 GB
    headers = {"Content-Type": "application/gzip"}
    if how == "Content-Encoding: gzip":
        headers = {"Content-Type": "text/plain", "Content-Encoding": "gzip"}
    elif how == "multipart":
        bomb, headers = _multipart(bomb)
    assert len(bomb) > 4 * FEED_BATCH_BYTES
    before = data_state(svc.client)
    r = asgi_request(
        svc.client, "POST", "/v1/datasets", (bomb[i : i + 65536] for i in range(0, len(bomb), 65536)), headers
    )
    assert r.status == 413 and r.headers["content-type"] == "application/problem+json", r.body
    assert r.json()["limit_bytes"] == LIMIT
    # Refused within the first batch of the body, long before the rest was read or inflated (inflating it all
    # takes many seconds and would hold gigabytes of arrays).
    assert r.bytes_read <= FEED_BATCH_BYTES + 65536, r.bytes_read
    assert r.seconds < 5, r.seconds
    assert_unchanged(before, data_state(svc.client))


def test_over_the_limit_is_refused_without_reading_it_or_as_soon_as_it_passes(svc: Svc) -> None:
    big = b"999999 10 4\n" + b"0 1:1\n" * 700_000  # 4.2 MB
    chunks = [big[i : i + 65536] for i in range(0, len(big), 65536)]
    before = data_state(svc.client)
    # Content-Length says too much: refused before a byte is read.
    r = asgi_request(
        svc.client, "POST", "/v1/datasets", chunks, {"Content-Type": "text/plain", "Content-Length": str(len(big))}
    )
    assert r.status == 413 and r.bytes_read == 0, (r.status, r.bytes_read)
    # Chunked, no length: refused at the batch that passes the limit.
    r = asgi_request(svc.client, "POST", "/v1/datasets", chunks, {"Content-Type": "text/plain"})
    assert r.status == 413 and r.bytes_read <= FEED_BATCH_BYTES + 65536, (r.status, r.bytes_read)
    assert r.json()["limit_bytes"] == LIMIT
    assert_unchanged(before, data_state(svc.client))


# ------------------------------------------------------------------------------------------------ predict

ONE = {"indices": [1, 2], "values": [1.0, 0.5]}

# (id, body, field, words); every one is a 422
BAD_PREDICTS = [
    ("no instances", {"instances": []}, "body.instances", "at least 1"),
    ("instances missing", {"k": 3}, "body.instances", "required"),
    ("instances not a list", {"instances": {"indices": [1], "values": [1.0]}}, "body.instances", "valid list"),
    ("too many instances", {"instances": [ONE] * (MAX_INSTANCES + 1)}, "body.instances", f"at most {MAX_INSTANCES}"),
    (
        "index out of range",
        {"instances": [ONE, {"indices": [7, 2000], "values": [1.0, 1.0]}]},
        "body.instances[1].indices[1]",
        "feature id 2000 is out of range",
    ),
    (
        "index past int32",
        {"instances": [{"indices": [2**31], "values": [1.0]}]},
        "body.instances[0].indices[0]",
        "less than 2147483648",
    ),
    (
        "negative index",
        {"instances": [{"indices": [-1], "values": [1.0]}]},
        "body.instances[0].indices[0]",
        "greater than or equal to 0",
    ),
    ("repeated index", {"instances": [{"indices": [3, 3], "values": [1.0, 1.0]}]}, "body.instances[0]", "repeat"),
    (
        "more indices than values",
        {"instances": [{"indices": [1, 2], "values": [1.0]}]},
        "body.instances[0]",
        "indices has 2 entries but values has 1",
    ),
    (
        "more values than indices",
        {"instances": [{"indices": [1], "values": [1.0, 2.0]}]},
        "body.instances[0]",
        "pair up",
    ),
    (
        "value past float32",
        {"instances": [{"indices": [1], "values": [1e39]}]},
        "body.instances[0].values[0]",
        "less than or equal to",
    ),
    (
        "index as a string",
        {"instances": [{"indices": ["1"], "values": [1.0]}]},
        "body.instances[0].indices[0]",
        "valid integer",
    ),
    (
        "value as a boolean",
        {"instances": [{"indices": [1], "values": [True]}]},
        "body.instances[0].values[0]",
        "valid number",
    ),
    ("k zero", {"instances": [ONE], "k": 0}, "body.k", "greater than or equal to 1"),
    ("k negative", {"instances": [ONE], "k": -5}, "body.k", "greater than or equal to 1"),
    ("k over the limit", {"instances": [ONE], "k": MAX_K + 1}, "body.k", f"at most {MAX_K}"),
    ("k huge", {"instances": [ONE], "k": 10**30}, "body.k", f"at most {MAX_K}"),
    ("k a string", {"instances": [ONE], "k": "5"}, "body.k", "valid integer"),
    ("k fractional", {"instances": [ONE], "k": 2.5}, "body.k", "valid integer"),
    ("unknown mode", {"instances": [ONE], "mode": "fast"}, "body.mode", "'lsh' or 'exact'"),
    ("unknown field", {"instances": [ONE], "top_k": 3}, "body.top_k", "Extra inputs"),
]


@pytest.mark.parametrize(("body", "field", "words"), [pytest.param(*c[1:], id=c[0]) for c in BAD_PREDICTS])
def test_bad_predict_is_422_naming_the_field(svc: Svc, body: dict[str, Any], field: str, words: str) -> None:
    p = assert_problem(svc.client.post(f"/v1/models/{svc.trained}/predict", json=body), 422)
    assert p["field"] == field and words in p["detail"], p


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "words"),
    [
        pytest.param(
            b'{"instances": [{"indices": [1], "values": [NaN]}]}', "application/json", 422, "finite", id="NaN literal"
        ),
        pytest.param(
            b'{"instances": [{"indices": [1], "values": [-Infinity]}]}',
            "application/json",
            422,
            "finite",
            id="Infinity literal",
        ),
        pytest.param(b'{"instances": [', "application/json", 400, "not valid JSON", id="truncated JSON"),
        pytest.param(b"\xff\xfe\x00", "application/json", 400, "error parsing the body", id="binary body"),
        pytest.param(b"[1, 2]", "application/json", 422, "valid dictionary", id="JSON array"),
        pytest.param(b"", "application/json", 422, "required", id="empty body"),
        pytest.param(
            b'{"instances": [{"indices": [1], "values": [1.0]}]}',
            "text/plain",
            422,
            "valid dictionary",
            id="not declared as JSON",
        ),
    ],
)
def test_malformed_predict_body_is_a_clear_4xx(
    svc: Svc, raw: bytes, content_type: str, status: int, words: str
) -> None:
    r = svc.client.post(f"/v1/models/{svc.trained}/predict", content=raw, headers={"Content-Type": content_type})
    assert words in assert_problem(r, status)["detail"]


def test_predict_edges_that_are_valid(svc: Svc) -> None:
    url = f"/v1/models/{svc.trained}/predict"
    r = svc.client.post(url, json={"instances": [{"indices": [1, 2], "values": [1, 1]}], "k": 3, "mode": "exact"})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["labels"]) == 3, r.text  # integers are numbers
    # A point with no features is a point (the labels come from the biases); k past num_labels returns them all.
    r = svc.client.post(url, json={"instances": [{"indices": [], "values": []}], "k": 3, "mode": "exact"})
    assert r.status_code == 200 and len(r.json()["predictions"][0]["labels"]) == 3, r.text
    # Extreme but representable values: finite scores, never a 500.
    big = {"indices": list(range(100)), "values": [3.4e38, -3.4e38] * 50}
    for mode in ("lsh", "exact"):
        r = svc.client.post(url, json={"instances": [big], "k": MAX_K, "mode": mode})
        assert r.status_code == 200, r.text
    r = svc.client.post(url, json={"instances": [ONE] * MAX_INSTANCES, "k": MAX_K})
    assert r.status_code == 200 and len(r.json()["predictions"]) == MAX_INSTANCES


def test_predict_on_a_model_that_never_trained_is_409_saying_to_resume(svc: Svc) -> None:
    """Its job was stopped before its first snapshot: retrying would never help (a queued or training job's model
    answers 503 with Retry-After instead: test_jobs)."""
    r = svc.client.post(f"/v1/models/{svc.untrained}/predict", json={"instances": [ONE]})
    p = assert_problem(r, 409)
    assert p["type"] == "urn:slide:problem:conflict" and "no snapshot" in p["detail"], p
    assert f"/v1/jobs/{svc.untrained}/resume" in p["detail"] and "retry-after" not in r.headers
    untrained = svc.client.get(f"/v1/models/{svc.untrained}").json()
    assert untrained["ready"] is False and untrained["resolved"] is None


def test_a_model_shows_what_its_settings_resolved_to(svc: Svc) -> None:
    """GET /v1/models/{id} answers with the newest snapshot's resolved settings (engine.resolve): a tiny label set
    trains its output layer densely, and 120 points are too few for an automatic validation split."""
    model = svc.client.get(f"/v1/models/{svc.trained}").json()
    resolved = model["resolved"]
    assert resolved["sample_output"] is False and resolved["train_points"] == 120 and resolved["val_points"] == 0
    assert resolved["layers"]["1"]["neurons"] == model["num_labels"] and resolved["layers"]["1"]["inputs"] == 16
    assert resolved["layers"]["1"]["sampled"] is False and resolved["layers"]["1"]["hash_l"] == 0
    assert all(m["resolved"] is None for m in svc.client.get("/v1/models").json()["data"])


@pytest.mark.parametrize("model_id", ["0" * 32, "nope"])
def test_predict_on_an_unknown_model_is_404(svc: Svc, model_id: str) -> None:
    p = assert_problem(svc.client.post(f"/v1/models/{model_id}/predict", json={"instances": [ONE]}), 404)
    assert p["resource"] == "model" and p["id"] == model_id, p
    assert_problem(svc.client.get(f"/v1/models/{model_id}"), 404)


# ------------------------------------------------------------------------------------------- ids and names


def _outside_state(svc: Svc) -> dict[str, tuple[str, int]]:
    """Every file under the module's temp root except the data dir: content hash and mtime."""
    data_dir = str(svc.settings.data_dir)
    state = {}
    for directory, dirnames, filenames in os.walk(svc.root):
        dirnames[:] = [d for d in dirnames if os.path.join(directory, d) != data_dir]
        for name in filenames:
            path = Path(directory, name)
            state[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return state


def _hostile_ids(svc: Svc) -> list[str]:
    to_outside = os.path.relpath(svc.outside, svc.settings.datasets_dir)  # ../../../outside from datasets/ and jobs/
    return [
        "..",
        "../..",
        to_outside,
        to_outside + "/secret.txt",
        str(svc.outside),
        str(svc.outside / "secret.txt"),
        "/etc/passwd",
        "..\\..\\outside",
        "./" + svc.dataset_id,
        svc.dataset_id + "/../../../outside",
        svc.dataset_id + "\x00",
        "a\x00b",
        "~",
        "x" * 5000,
    ]


def test_hostile_ids_never_touch_files_outside_the_data_dir(svc: Svc) -> None:
    """Every route with an id in its path, each id as a server hands it over (`..` segments, `/` from `%2F`, NUL):
    a clear 4xx, no file outside the data dir read-modified-deleted or created, nothing inside changed."""
    outside, before = _outside_state(svc), data_state(svc.client)
    routes = [(m, p) for m, p in all_routes(svc.client.app) if "{" in p]
    assert ("DELETE", "/v1/datasets/{dataset_id}") in routes and ("POST", "/v1/models/{model_id}/predict") in routes
    predict_body = json.dumps({"instances": [ONE]}).encode()
    for hostile in _hostile_ids(svc):
        for method, template in routes:
            path = template.replace(template[template.index("{") : template.index("}") + 1], hostile)
            body, headers = (
                ([predict_body], {"Content-Type": "application/json"}) if path.endswith("/predict") else ([], {})
            )
            r = asgi_request(svc.client, method, path, body, headers)
            assert 400 <= r.status < 500, (method, path[:120], r.status, r.body[:300])
            assert r.headers["content-type"] == "application/problem+json", (method, path[:120], r.headers)
    assert _outside_state(svc) == outside
    assert_unchanged(before, data_state(svc.client))


@pytest.mark.parametrize("field", ["train_dataset_id", "eval_dataset_id"])
def test_hostile_dataset_ids_in_a_job_are_422(svc: Svc, field: str) -> None:
    outside, before = _outside_state(svc), data_state(svc.client)
    for hostile in _hostile_ids(svc):
        body = {"train_dataset_id": svc.dataset_id, "config": {"schedule": {"epochs": 1}}} | {field: hostile}
        p = assert_problem(svc.client.post("/v1/jobs", json=body), 422)
        assert p["field"] == f"body.{field}", p
    assert _outside_state(svc) == outside
    assert_unchanged(before, data_state(svc.client))


def test_a_dataset_name_is_a_label_never_a_path(svc: Svc) -> None:
    outside = _outside_state(svc)
    name = os.path.relpath(svc.outside / "evil", svc.settings.datasets_dir)  # ../../../outside/evil
    r = svc.client.post("/v1/datasets", params={"name": name}, content=VALID, headers={"Content-Type": "text/plain"})
    assert r.status_code == 201, r.text
    ds = r.json()
    try:
        assert ds["name"] == name
        assert sorted(p.name for p in svc.settings.datasets_dir.iterdir()) == sorted([svc.dataset_id, ds["id"]])
        assert _outside_state(svc) == outside
    finally:
        assert svc.client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
