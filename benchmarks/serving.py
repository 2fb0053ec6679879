"""Serving throughput: HTTP predictions against the in-process engine's single-query rate, in one run.

Trains a model on amazon670k-shaped synthetic data for a short while (so its hash tables and serving hubs are
those of a trained model), gives it a text featurizer whose vocabulary is the feature space (term i = feature
i), publishes it as a finished job of a fresh data dir, then measures on the same two cores:

  engine, in-process    single-query `lsh` top-5 rate and latency (`SlideModel.predict`, one query at a time),
                        for the same queries as feature ids and as text (`TextFeaturizer.transform_one` first),
                        in a process of its own that loads the snapshot as the service does (memory-mapped)
  HTTP                  `POST /v1/models/{id}/predict` of one query per request against real uvicorn servers
                        (variants: `--servers`, and `--baseline REF` for an older commit's code), from a load
                        generator in its own process: asyncio, raw HTTP/1.1 keep-alive sockets, pre-encoded bodies
                        (its CPU time is reported: it must not be the bottleneck)

Every HTTP phase comes right after an in-process phase of the same length and query kind, and its rate is
reported as a share of that one's: the machine's load moves within minutes and weighs on both alike.
Prints a table and writes benchmarks/results/serving.json.

    python benchmarks/serving.py                          # amazon670k shape, ~6 minutes
    python benchmarks/serving.py --baseline 590a832 --rounds 2
    python benchmarks/serving.py --preset small --train-s 5 --duration 3 --servers inline=
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


def build(args, data_dir: Path) -> tuple[str, Path, object, list, list[str]]:
    """Train briefly, attach a text featurizer, publish as a completed job; returns (job id, snapshot path, model,
    queries, texts)."""
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
    snapshot = store.latest()[1]
    model = load_model(snapshot)
    queries = []
    texts = []
    for r in range(test.num_points):
        a, b = int(test.x_indptr[r]), int(test.x_indptr[r + 1])
        ids = np.asarray(test.x_indices[a:b])
        if ids.size == 0:
            continue
        texts.append(" ".join(f"t{i}" for i in ids.tolist()))
        queries.append(model.featurizer.transform_one(texts[-1]))
    return job_id, snapshot, model, queries, texts


def in_process(model, queries, texts, name: str, duration: float, k: int = 5) -> dict:
    """Single queries one at a time for `duration` seconds, as feature ids or as text (featurized first)."""
    one = np.array([0, 0], dtype=np.int64)
    lat = []
    cpu0 = time.thread_time()
    t_all = time.perf_counter()
    i = 0
    while time.perf_counter() - t_all < duration:
        ids, vals = queries[i % len(queries)]
        t0 = time.perf_counter()
        if name == "text":
            ids, vals = model.featurizer.transform_one(texts[i % len(texts)])
        one[1] = len(ids)
        model.predict(one, ids, vals, k=k, mode="lsh")
        lat.append(time.perf_counter() - t0)
        i += 1
    wall = time.perf_counter() - t_all
    cpu = time.thread_time() - cpu0
    a = np.asarray(lat) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "queries_per_s": len(lat) / wall,
        "cpu_ms_per_query": cpu / len(lat) * 1e3,
    }


def engine_main() -> None:
    """Run as a subprocess: argv = snapshot queries.json. Loads the model as the service does (memory-mapped), then
    answers each stdin line `<indices|text> <seconds>` with one JSON line of `in_process`. A process of its own,
    idle between phases like the server, so the machine's scheduler treats both alike."""
    from engine import load_model

    snapshot, queries_file = sys.argv[2:4]
    model = load_model(snapshot, mmap=True)
    q = json.loads(Path(queries_file).read_text())
    queries = [(np.asarray(i, dtype=np.int32), np.asarray(v, dtype=np.float32)) for i, v in q["queries"]]
    in_process(model, queries, q["texts"], "text", 1.0)  # warm
    print("{}", flush=True)
    for line in sys.stdin:
        name, duration = line.split()
        print(json.dumps(in_process(model, queries, q["texts"], name, float(duration))), flush=True)


class Engine:
    """The in-process side: an `engine_main` subprocess."""

    def __init__(self, snapshot: Path, queries: list, texts: list[str], tmp: Path):
        f = tmp / "engine-queries.json"
        f.write_text(json.dumps({"queries": [[i.tolist(), v.tolist()] for i, v in queries], "texts": texts}))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--engine", str(snapshot), str(f)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()

    def phase(self, name: str, duration: float) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{name} {duration}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children (uvicorn's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def start_server(
    data_dir: Path, log: Path, root: Path = ROOT, env_extra: dict | None = None, uvicorn_args: list[str] | None = None
) -> tuple[subprocess.Popen, int]:
    """uvicorn serving the app of the source tree `root` (this one, or an older commit's)."""
    import httpx

    from tests.e2e.server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDE_")}
    env.update({"SLIDE_DATA_DIR": str(data_dir), "PYTHONPATH": str(root), **(env_extra or {})})
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
            *(uvicorn_args or []),
        ],
        cwd=root,
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


def parse_server(spec: str) -> dict:
    """NAME=[ENV=VALUE,...][;uvicorn args] -> {name, env, uvicorn_args}."""
    name, _, rest = spec.partition("=")
    env_part, _, args_part = rest.partition(";")
    env = dict(kv.split("=", 1) for kv in env_part.split(",") if kv)
    return {"name": name, "env": env, "uvicorn_args": args_part.split(), "root": ROOT}


def checkout(ref: str, tmp: Path) -> Path:
    """The source tree of git `ref`, extracted into tmp."""
    dest = tmp / f"src-{ref}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


DEFAULT_SERVERS = [
    "pool=SLIDE_PREDICT_INLINE_MAX_INSTANCES=0",
    "inline=",
    "inline-2-workers=;--workers 2",
]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--generator":
        generator_main()
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--engine":
        engine_main()
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="amazon670k")
    p.add_argument("--train-points", type=int, default=20_000)
    p.add_argument("--train-s", type=float, default=20.0, help="training time before measuring")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--users", type=int, nargs="+", default=[1, 4])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per phase (in-process and HTTP alike)")
    p.add_argument("--rounds", type=int, default=1, help="passes over every server, users and query kind")
    p.add_argument(
        "--servers",
        nargs="+",
        default=DEFAULT_SERVERS,
        help="server variants, NAME=[ENV=VALUE,...][;uvicorn args] (default: %(default)s)",
    )
    p.add_argument("--baseline", help="also serve from this git ref's code (e.g. a commit before a change)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serving.json"))
    args = p.parse_args()

    servers = [parse_server(x) for x in args.servers]
    with tempfile.TemporaryDirectory(prefix="serving-") as tmp_s:
        tmp = Path(tmp_s)
        if args.baseline:
            servers.insert(
                0, {"name": args.baseline, "env": {}, "uvicorn_args": [], "root": checkout(args.baseline, tmp)}
            )
        job_id, snapshot, model, queries, texts = build(args, tmp / "data")
        bodies = {
            "indices": [
                json.dumps({"instances": [{"indices": ids.tolist(), "values": vals.tolist()}], "k": 5, "mode": "lsh"})
                for ids, vals in queries
            ],
            "text": [json.dumps({"instances": [{"text": t}], "k": 5, "mode": "lsh"}) for t in texts],
        }
        engine = Engine(snapshot, queries, texts, tmp)
        running = []
        phases = []
        try:
            for srv in servers:
                proc, port = start_server(
                    tmp / "data", tmp / f"server-{srv['name']}.log", srv["root"], srv["env"], srv["uvicorn_args"]
                )
                running.append((srv, proc, port))
                http_load(port, job_id, bodies["indices"], 2, 2.0, tmp)  # warm (model load, compile)
            # Every HTTP phase right after an in-process phase of the same length and query kind: the machine's
            # load, which moves within minutes, weighs on both alike, and the ratio is taken per pair.
            for _ in range(args.rounds):
                for srv, proc, port in running:
                    for users in args.users:
                        for name in ("indices", "text"):
                            eng = engine.phase(name, args.duration)
                            cpu0 = tree_cpu_s(proc.pid)
                            r = http_load(port, job_id, bodies[name], users, args.duration, tmp)
                            r["server_cpu_ms_per_request"] = (tree_cpu_s(proc.pid) - cpu0) / r["requests"] * 1e3
                            ph = {"server": srv["name"], "query": name, "users": users, **r, "engine": eng}
                            ph["share_of_engine_rate"] = r["requests_per_s"] / eng["queries_per_s"]
                            ph["cpu_share"] = eng["cpu_ms_per_query"] / r["server_cpu_ms_per_request"]
                            phases.append(ph)
                            print(
                                f"serving: {srv['name']} {name} x{users}: {r['requests_per_s']:.0f} req/s against "
                                f"{eng['queries_per_s']:.0f} in-process ({ph['share_of_engine_rate']:.2f}); CPU ms "
                                f"{r['server_cpu_ms_per_request']:.3f} against {eng['cpu_ms_per_query']:.3f}",
                                flush=True,
                            )
        finally:
            engine.close()
            for _, proc, _ in running:
                proc.terminate()
            for _, proc, _ in running:
                proc.wait(timeout=60)
    table = summarise(phases)
    text_over = [
        t["p50_ms"] - i["p50_ms"]
        for i, t in zip(
            [ph["engine"] for ph in phases if ph["query"] == "indices"],
            [ph["engine"] for ph in phases if ph["query"] == "text"],
            strict=True,
        )
    ]
    report = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "preset": args.preset,
        "labels": int(model.num_labels),
        "features": int(model.num_features),
        "servers": [{k: v for k, v in srv.items() if k != "root"} for srv in servers],
        "text_overhead_p50_ms": float(np.median(text_over)),
        "phases": phases,
        "summary": table,
    }
    print()
    print(f"lsh top-5, one query per request, {report['labels']:,} labels; in-process = the engine's single-query loop")
    print(f"measured just before each HTTP phase; text featurization adds {report['text_overhead_p50_ms']:.3f} ms")
    head = "server             query    users in-proc q/s HTTP req/s  share  p50 ms  p99 ms  eng CPU  srv CPU cpu share"
    print(head + "  gen CPU")
    for row in table:
        print(
            f"{row['server']:18s} {row['query']:8s} {row['users']:5d} {row['engine_per_s']:11.0f} "
            f"{row['http_per_s']:10.0f} {row['share']:6.2f} {row['p50_ms']:7.2f} {row['p99_ms']:7.2f} "
            f"{row['engine_cpu_ms']:8.3f} {row['server_cpu_ms']:8.3f} {row['cpu_share']:9.2f} "
            f"{row['generator_cpu_share']:8.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


def summarise(phases: list[dict]) -> list[dict]:
    """Per server, query kind and users: medians over the rounds."""
    keys = []
    for ph in phases:
        key = (ph["server"], ph["query"], ph["users"])
        if key not in keys:
            keys.append(key)
    rows = []
    for key in keys:
        sel = [ph for ph in phases if (ph["server"], ph["query"], ph["users"]) == key]
        rows.append(
            {
                "server": key[0],
                "query": key[1],
                "users": key[2],
                "engine_per_s": float(np.median([ph["engine"]["queries_per_s"] for ph in sel])),
                "engine_p50_ms": float(np.median([ph["engine"]["p50_ms"] for ph in sel])),
                "http_per_s": float(np.median([ph["requests_per_s"] for ph in sel])),
                "share": float(np.median([ph["share_of_engine_rate"] for ph in sel])),
                "p50_ms": float(np.median([ph["p50_ms"] for ph in sel])),
                "p99_ms": float(np.median([ph["p99_ms"] for ph in sel])),
                "engine_cpu_ms": float(np.median([ph["engine"]["cpu_ms_per_query"] for ph in sel])),
                "server_cpu_ms": float(np.median([ph["server_cpu_ms_per_request"] for ph in sel])),
                "cpu_share": float(np.median([ph["cpu_share"] for ph in sel])),
                "errors": int(sum(ph["errors"] for ph in sel)),
                "generator_cpu_share": float(np.median([ph["generator_cpu_share"] for ph in sel])),
            }
        )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
