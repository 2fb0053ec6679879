"""Serving throughput: HTTP predictions against the in-process engine's single-query rate, in one run.

Trains a model on amazon670k-shaped synthetic data for a short while (so its hash tables and serving hubs are
those of a trained model), gives it a text featurizer whose vocabulary is the feature space (term i = feature
i), publishes it as a finished job of a fresh data dir, then measures on the same two cores:

  engine, in-process    single-query `lsh` top-5 latency and rate (`SlideModel.predict`, one query at a time),
                        for the same queries as feature ids and as text (`TextFeaturizer.transform_one` first)
  HTTP                  `POST /v1/models/{id}/predict` of one query per request against a real uvicorn server,
                        from a load generator in its own process: asyncio, raw HTTP/1.1 keep-alive sockets,
                        pre-encoded bodies (its CPU time is reported: it must not be the bottleneck)

Prints a table and writes benchmarks/results/serving.json.

    python benchmarks/serving.py                          # amazon670k shape, ~3 minutes
    python benchmarks/serving.py --preset small --train-s 5 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------ load generator


async def _user(host: str, port: int, path: str, bodies: list[bytes], deadline: float, lat: list, offset: int):
    reader, writer = await asyncio.open_connection(host, port)
    heads = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]
    i = offset
    errors = 0
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        writer.write(heads[i % len(heads)])
        i += 1
        status = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        lat.append(time.perf_counter() - t0)
        if not status.startswith(b"HTTP/1.1 200"):
            errors += 1
    writer.close()
    return errors


async def _load(host, port, path, bodies, users, duration):
    lat: list[float] = []
    deadline = time.perf_counter() + duration
    t0 = time.perf_counter()
    errors = await asyncio.gather(*(_user(host, port, path, bodies, deadline, lat, u * 997) for u in range(users)))
    return lat, sum(errors), time.perf_counter() - t0


def generator_main() -> None:
    """Run as a subprocess: argv = host port path users duration bodies.json; prints one JSON line."""
    host, port, path, users, duration, bodies_file = sys.argv[2:8]
    bodies = [b.encode() for b in json.loads(Path(bodies_file).read_text())]
    asyncio.run(_load(host, int(port), path, bodies, 1, 1.0))  # warm-up
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    lat, errors, wall = asyncio.run(_load(host, int(port), path, bodies, int(users), float(duration)))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    a = np.asarray(lat) * 1e3
    print(
        json.dumps(
            {
                "requests": len(lat),
                "errors": errors,
                "requests_per_s": len(lat) / wall,
                "p50_ms": float(np.percentile(a, 50)),
                "p99_ms": float(np.percentile(a, 99)),
                "generator_cpu_share": cpu / wall,
                "generator_cpu_us_per_request": cpu / max(1, len(lat)) * 1e6,
            }
        )
    )


# ------------------------------------------------------------------------------------------ set-up


def build(args, data_dir: Path) -> tuple[str, object, list, list[str]]:
    """Train briefly, attach a text featurizer, publish as a completed job; returns (job id, model, queries,
    texts)."""
    from app.db import Database, DatasetRow, JobRow, ModelVersionRow
    from app.settings import Settings
    from engine import PRESETS, SlideConfig, SnapshotStore, Trainer, generate, load_model
    from engine.text import TextFeaturizer

    params = PRESETS[args.preset].scaled(num_train=args.train_points, num_test=args.queries)
    train, test = generate(params, seed=args.seed)
    settings = Settings(_env_file=None, data_dir=data_dir)
    job_id = uuid.uuid4().hex
    store = SnapshotStore(settings.snapshots_dir(job_id), keep=2)
    config = SlideConfig(threads=2, seed=args.seed)
    trainer = Trainer(config, train, None, store)
    rng = np.random.default_rng(args.seed)
    idf = (1.0 + rng.gamma(2.0, 2.0, size=train.num_features)).astype(np.float32)
    featurizer = TextFeaturizer({}, [f"t{i}" for i in range(train.num_features)], idf)
    trainer.attach_text(featurizer)
    print(f"serving: training {args.train_s:g}s on {train.num_points} points, {train.num_labels} labels", flush=True)
    trainer.run(time_budget_s=args.train_s, snapshot_every_s=1e9)
    version, _ = trainer.publish()
    db = Database(settings.database_url)
    db.create_schema()
    ds_id = uuid.uuid4().hex
    with db.session() as s:
        s.add(
            DatasetRow(
                id=ds_id,
                name="serving-bench",
                num_points=train.num_points,
                num_features=train.num_features,
                num_labels=train.num_labels,
                nnz=train.nnz,
                avg_labels_per_point=0.0,
                avg_features_per_point=0.0,
                bytes=0,
            )
        )
        s.add(JobRow(id=job_id, train_dataset_id=ds_id, config=config.to_dict(), state="completed"))
        s.flush()
        s.add(ModelVersionRow(job_id=job_id, version=version, step=trainer.step))
    db.dispose()
    model = load_model(store.latest()[1])
    queries = []
    texts = []
    for r in range(test.num_points):
        a, b = int(test.x_indptr[r]), int(test.x_indptr[r + 1])
        ids = np.asarray(test.x_indices[a:b])
        if ids.size == 0:
            continue
        texts.append(" ".join(f"t{i}" for i in ids.tolist()))
        queries.append(model.featurizer.transform_one(texts[-1]))
    return job_id, model, queries, texts


def in_process(model, queries, texts, k: int, repeat: int) -> dict:
    out = {}
    one = np.array([0, 0], dtype=np.int64)
    for name in ("indices", "text"):
        lat = []
        t_all = time.perf_counter()
        for _ in range(repeat):
            for (ids, vals), text in zip(queries, texts, strict=True):
                t0 = time.perf_counter()
                if name == "text":
                    ids, vals = model.featurizer.transform_one(text)
                one[1] = len(ids)
                model.predict(one, ids, vals, k=k, mode="lsh")
                lat.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t_all
        a = np.asarray(lat) * 1e3
        out[name] = {
            "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)),
            "queries_per_s": len(lat) / wall,
        }
    return out


def start_server(data_dir: Path, log: Path) -> tuple[subprocess.Popen, int]:
    import httpx

    from tests.e2e.server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDE_")}
    env.update({"SLIDE_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
        ],
        cwd=ROOT,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"serving: the server did not start; see {log}")


def http_load(port: int, job_id: str, bodies: list[str], users: int, duration: float, tmp: Path) -> dict:
    f = tmp / f"bodies-{uuid.uuid4().hex[:6]}.json"
    f.write_text(json.dumps(bodies))
    out = subprocess.run(
        [sys.executable, __file__, "--generator", "127.0.0.1", str(port), f"/v1/models/{job_id}/predict"]
        + [str(users), str(duration), str(f)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--generator":
        generator_main()
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="amazon670k")
    p.add_argument("--train-points", type=int, default=20_000)
    p.add_argument("--train-s", type=float, default=20.0, help="training time before measuring")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--users", type=int, nargs="+", default=[1, 4])
    p.add_argument("--duration", type=float, default=15.0, help="seconds per HTTP phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serving.json"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="serving-") as tmp_s:
        tmp = Path(tmp_s)
        job_id, model, queries, texts = build(args, tmp / "data")
        engine_before = in_process(model, queries, texts, 5, 2)
        proc, port = start_server(tmp / "data", tmp / "server.log")
        phases = []
        try:
            idx_bodies = [
                json.dumps({"instances": [{"indices": ids.tolist(), "values": vals.tolist()}], "k": 5, "mode": "lsh"})
                for ids, vals in queries
            ]
            text_bodies = [json.dumps({"instances": [{"text": t}], "k": 5, "mode": "lsh"}) for t in texts]
            http_load(port, job_id, idx_bodies, 1, 2.0, tmp)  # warm the server (model load, compile)
            for users in args.users:
                for name, bodies in (("indices", idx_bodies), ("text", text_bodies)):
                    r = http_load(port, job_id, bodies, users, args.duration, tmp)
                    phases.append({"query": name, "users": users, **r})
                    print(f"serving: {name} x{users}: {r}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        engine_after = in_process(model, queries, texts, 5, 2)
    engine_rate = (engine_before["indices"]["queries_per_s"] + engine_after["indices"]["queries_per_s"]) / 2
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "preset": args.preset,
        "labels": int(model.num_labels),
        "features": int(model.num_features),
        "engine_before": engine_before,
        "engine_after": engine_after,
        "engine_single_query_per_s": engine_rate,
        "text_overhead_p50_ms": (
            (engine_before["text"]["p50_ms"] - engine_before["indices"]["p50_ms"])
            + (engine_after["text"]["p50_ms"] - engine_after["indices"]["p50_ms"])
        )
        / 2,
        "http": [{**ph, "share_of_engine_rate": ph["requests_per_s"] / engine_rate} for ph in phases],
    }
    print()
    print(f"engine in-process, single query, lsh top-5 ({report['labels']:,} labels):")
    for name in ("indices", "text"):
        b, a = engine_before[name], engine_after[name]
        print(
            f"  {name:8s} p50 {b['p50_ms']:.3f} / {a['p50_ms']:.3f} ms (before / after the HTTP phases), "
            f"{b['queries_per_s']:.0f} / {a['queries_per_s']:.0f} queries/s"
        )
    print(f"  text featurization adds {report['text_overhead_p50_ms']:.3f} ms at p50")
    head = ("HTTP query", "users", "req/s", "p50 ms", "p99 ms", "of engine", "gen CPU")
    print(f"{head[0]:10s} {head[1]:>5s} {head[2]:>8s} {head[3]:>7s} {head[4]:>7s} {head[5]:>9s} {head[6]:>8s}")
    for ph in report["http"]:
        print(
            f"{ph['query']:10s} {ph['users']:5d} {ph['requests_per_s']:8.0f} {ph['p50_ms']:7.2f} {ph['p99_ms']:7.2f} "
            f"{ph['share_of_engine_rate']:9.2f} {ph['generator_cpu_share']:8.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
