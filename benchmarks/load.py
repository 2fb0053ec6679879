"""`make load`: predict load against the service while a job trains, and after it stops (locust, headless).

Starts the service itself (a uvicorn subprocess on 127.0.0.1, on a temporary or given data dir) or uses
`--url` of one already running on 127.0.0.1 (nothing else is accepted), uploads the training set (or reuses
an uploaded one), starts a job and waits for its first snapshot, then runs bounded phases:

  training / no load     the trainer's samples/s with nothing else running (the baseline)
  training / lsh         single-query top-5 `lsh` predictions of real test points, as fast as --users allow
  training / exact       the same in `exact` mode (scores every label: kept modest, --exact-users/--exact-rate)
  (the job is stopped: it checkpoints and exits)
  stopped / lsh, stopped / exact

For each phase: requests/s, p50/p95/p99/max latency measured by the client, errors by kind, the snapshot
versions that answered (the trainer publishes new ones during the training phases, so the predictor swaps
models under load), the RSS of the service and trainer processes sampled every --sample-s (psutil; total and
anonymous, i.e. not counting file pages of the memory-mapped snapshot, and how many snapshot versions the
service still has mapped), CPU use of each process and of the whole machine, and the trainer's samples/s
(from the job's metrics endpoint, training-step time only, and from its progress counter, wall clock).
Prints a table and writes benchmarks/results/load.json (load-<data>.json for other data).

    python benchmarks/load.py --preset small --duration 30                  # a quick look (~4 minutes)
    python benchmarks/load.py --preset amazon670k --duration 60             # medium
    python benchmarks/load.py --preset amazon670k --duration 600 --idle-duration 120 --exact-duration 120
    python benchmarks/load.py --url http://127.0.0.1:8000 --data bench-data/amazon670k-s0 --mode lsh
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gevent
import httpx

# locust patches the standard library for gevent when it is imported: that has to come before anything
# else opens sockets or starts threads.
import locust  # noqa: I001
import numpy as np
import psutil
from locust import FastHttpUser, constant, constant_throughput, task
from locust.env import Environment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_name  # noqa: E402

from engine.config import merge_settings  # noqa: E402

LOCAL_HOSTS = {"127.0.0.1", "localhost"}
SNAPSHOT_MAP = re.compile(r"/snapshots/(v\d+)/\S+\.npy( \(deleted\))?$")
MB = 1024 * 1024


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- data


def prepare_data(args) -> Path:
    """The CSR dataset dir (train/ and test/): --data, or bench-data/<preset>-s<seed>, generated if missing."""
    from engine import save_dataset
    from engine.synth import generate

    if args.data:
        d = Path(args.data)
        if not (d / "train" / "meta.json").exists() or not (d / "test" / "meta.json").exists():
            sys.exit(f"load: {d} needs train/ and test/ dataset dirs (engine.save_dataset format)")
        return d
    d = ROOT / "bench-data" / f"{args.preset}-s{args.seed}"
    if not (d / "test" / "meta.json").exists():
        if args.preset == "amazon670k":
            sys.exit(
                f"load: {d} is missing; generate it first with `python benchmarks/run.py --preset amazon670k "
                "--systems none` or `slide gen --preset amazon670k` + engine.save_dataset"
            )
        t0 = time.perf_counter()
        train, test = generate(args.preset, seed=args.seed)
        save_dataset(train, d / "train")
        save_dataset(test, d / "test")
        log(f"generated {args.preset} in {time.perf_counter() - t0:.1f}s -> {d}")
    return d


def xmc_text(data_dir: Path) -> Path:
    """The training set as XMC text (what the upload endpoint takes), written once beside the arrays."""
    from engine import load_dataset, write_xmc

    path = data_dir / "xmc" / "train.txt"
    if not path.exists():
        t0 = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".train.txt.{os.getpid()}")
        write_xmc(load_dataset(data_dir / "train"), tmp)
        tmp.rename(path)
        log(f"wrote {path} ({path.stat().st_size / MB:.0f} MB) in {time.perf_counter() - t0:.1f}s")
    return path


def query_bodies(data_dir: Path, n: int, k: int, seed: int) -> dict[str, list[bytes]]:
    """Predict request bodies of n real test points (one instance each), pre-encoded so the client spends its
    CPU on sending, not on JSON."""
    from engine import load_dataset

    test = load_dataset(data_dir / "test")
    rng = np.random.default_rng([seed, 4])
    rows = rng.choice(test.num_points, size=min(n, test.num_points), replace=False)
    out: dict[str, list[bytes]] = {"lsh": [], "exact": []}
    for r in rows:
        s, e = int(test.x_indptr[r]), int(test.x_indptr[r + 1])
        if e == s:
            continue
        inst = {"indices": test.x_indices[s:e].tolist(), "values": [float(v) for v in test.x_values[s:e]]}
        for mode in out:
            out[mode].append(json.dumps({"instances": [inst], "k": k, "mode": mode}).encode())
    return out


# ----------------------------------------------------------------------------------------------- service


class Service:
    """The service under test: started here (uvicorn subprocess) or already running at --url."""

    def __init__(self, args):
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.tmp_dir: str | None = None
        self.data_dir: Path | None = None
        self.pid: int | None = None
        if args.url:
            parts = urlsplit(args.url)
            if parts.scheme != "http" or parts.hostname not in LOCAL_HOSTS or not parts.port:
                sys.exit(f"load: refusing {args.url!r}: only http://127.0.0.1:<port> (or localhost) is allowed")
            self.url = f"http://127.0.0.1:{parts.port}"
        else:
            self.url = ""
        headers = {"X-API-Key": os.environ["SLIDE_API_KEY"]} if os.environ.get("SLIDE_API_KEY") else {}
        self.headers = headers
        self.client: httpx.Client | None = None

    def start(self) -> None:
        a = self.args
        if not self.url:
            if a.service_data_dir:
                self.data_dir = Path(a.service_data_dir).resolve()
                self.data_dir.mkdir(parents=True, exist_ok=True)
            else:
                self.tmp_dir = tempfile.mkdtemp(prefix="slide-load-", dir=a.tmp_dir)
                self.data_dir = Path(self.tmp_dir)
            port = a.port or _free_port()
            self.url = f"http://127.0.0.1:{port}"
            env = dict(
                os.environ,
                SLIDE_DATA_DIR=str(self.data_dir),
                SLIDE_SNAPSHOT_INTERVAL_S=str(a.snapshot_interval),
                SLIDE_MAX_UPLOAD_BYTES="64GiB",
            )
            if a.trainer_threads:
                env["SLIDE_TRAINER_THREADS"] = str(a.trainer_threads)
            if a.trainer_nice is not None:
                env["SLIDE_TRAINER_NICE"] = str(a.trainer_nice)
            cmd = [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ]
            if not a.access_log:
                cmd.append("--no-access-log")
            log_path = self.data_dir / "service.log"
            log(f"starting the service: {' '.join(cmd[1:])} (data dir {self.data_dir}, log {log_path})")
            # cwd = the data dir: a .env in the checkout must not change the service under test
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.data_dir,
                env=env,
                stdout=open(log_path, "ab"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.pid = self.proc.pid
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=httpx.Timeout(60.0))
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc is not None and self.proc.poll() is not None:
                sys.exit(f"load: the service exited with code {self.proc.returncode}; see {self.data_dir}/service.log")
            if time.monotonic() > deadline:
                sys.exit(f"load: no service answering at {self.url}")
            time.sleep(0.5)
        if self.pid is None:
            self.pid = self.args.service_pid or _listening_pid(urlsplit(self.url).port)
            if self.pid is None:
                log("could not find the service process (pass --service-pid): RSS of the service not sampled")
        log(f"service ready at {self.url} (pid {self.pid})")

    def call(self, method: str, path: str, what: str, ok=(200, 201, 202, 204), **kw) -> Any:
        r = self.client.request(method, path, **kw)
        if r.status_code not in ok:
            raise RuntimeError(f"{what}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json() if r.content else None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.tmp_dir and not self.args.keep:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_pid(port: int | None) -> int | None:
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return c.pid
    except (psutil.AccessDenied, PermissionError):
        pass
    return None


# ----------------------------------------------------------------------------------------------- sampling


class Sampler:
    """Every `interval` s: RSS (total and anonymous) and CPU of the service, its trainer and this process, the
    machine's CPU, and which snapshot versions the service has mapped. Each sample is tagged with the phase."""

    def __init__(self, service_pid: int | None, interval: float):
        self.interval = interval
        self.service = psutil.Process(service_pid) if service_pid else None
        self.me = psutil.Process()
        self.trainer: psutil.Process | None = None
        self.phase = "setup"
        self.samples: list[dict] = []
        self._greenlet = None
        psutil.cpu_percent(None)

    def _find_trainer(self) -> psutil.Process | None:
        if self.trainer is not None and self.trainer.is_running():
            return self.trainer
        self.trainer = None
        if self.service is None:
            return None
        try:
            for child in self.service.children(recursive=True):
                cmd = " ".join(child.cmdline())
                if "spawn_main" in cmd:
                    self.trainer = child
                    child.cpu_percent(None)
                    break
        except psutil.Error:
            pass
        return self.trainer

    @staticmethod
    def _mem(p: psutil.Process | None) -> dict | None:
        if p is None:
            return None
        try:
            with p.oneshot():
                m = p.memory_info()
                return {
                    "rss": m.rss,
                    "anon": m.rss - m.shared,
                    "cpu": p.cpu_percent(None),
                    "threads": p.num_threads(),
                    "nice": p.nice(),
                }
        except psutil.Error:
            return None

    def _mapped_versions(self) -> tuple[int, int] | None:
        """(snapshot versions the service maps, how many of those were already deleted from disk)."""
        if self.service is None:
            return None
        try:
            text = Path(f"/proc/{self.service.pid}/maps").read_text()
        except OSError:
            return None
        versions, deleted = set(), set()
        for line in text.splitlines():
            m = SNAPSHOT_MAP.search(line)
            if m:
                versions.add(m.group(1))
                if m.group(2):
                    deleted.add(m.group(1))
        return len(versions), len(deleted)

    def sample(self) -> None:
        s = {
            "t": time.time(),
            "phase": self.phase,
            "service": self._mem(self.service),
            "trainer": self._mem(self._find_trainer()),
            "loadgen": self._mem(self.me),
            "machine_cpu": psutil.cpu_percent(None),
            "mapped": self._mapped_versions(),
        }
        self.samples.append(s)

    def _loop(self) -> None:
        if self.service is not None:
            self.service.cpu_percent(None)
        self.me.cpu_percent(None)
        while True:
            gevent.sleep(self.interval)
            self.sample()

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._loop)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()


def memory_summary(samples: list[dict], who: str) -> dict | None:
    """RSS at the start, end and peak of a phase, and its growth: after a warm-up (the first 25% of the phase,
    at most 60 s: new threads, scratch buffers, the first answers of a new model), the median of the last fifth
    of the samples minus the median of the first fifth, and the least-squares slope. Total RSS counts the file
    pages of the memory-mapped snapshot (they come and go with swaps); anonymous RSS (rss - shared) is the
    process's own memory, where a leak would show."""
    pts = [(s["t"], s[who]["rss"], s[who]["anon"]) for s in samples if s.get(who)]
    if len(pts) < 2:
        return None
    t = np.array([p[0] for p in pts])
    rss = np.array([p[1] for p in pts], dtype=float) / MB
    anon = np.array([p[2] for p in pts], dtype=float) / MB
    steady = t >= t[0] + min(60.0, 0.25 * (t[-1] - t[0]))
    if steady.sum() < 5:
        steady[:] = True
    ts = t[steady]
    fifth = max(1, int(steady.sum()) // 5)

    def growth(x):
        x = x[steady]
        slope = float(np.polyfit((ts - ts[0]) / 60.0, x, 1)[0]) if ts[-1] > ts[0] else 0.0
        return float(np.median(x[-fifth:]) - np.median(x[:fifth])), slope

    rss_growth, rss_slope = growth(rss)
    anon_growth, anon_slope = growth(anon)
    cpu = [s[who]["cpu"] for s in samples if s.get(who)][1:]
    return {
        "rss_start_mb": float(rss[0]),
        "rss_end_mb": float(rss[-1]),
        "rss_max_mb": float(rss.max()),
        "rss_growth_mb": rss_growth,
        "rss_slope_mb_per_min": rss_slope,
        "anon_start_mb": float(anon[0]),
        "anon_end_mb": float(anon[-1]),
        "anon_max_mb": float(anon.max()),
        "anon_growth_mb": anon_growth,
        "anon_slope_mb_per_min": anon_slope,
        "warm_up_s": float(ts[0] - t[0]),
        "cpu_percent_mean": float(np.mean(cpu)) if cpu else None,
        "samples": len(pts),
    }


# ----------------------------------------------------------------------------------------------- load


def run_load(
    url: str, path: str, bodies: list[bytes], users: int, rate: float, duration: float, headers: dict[str, str]
) -> dict:
    """`users` locust users posting `bodies` (random order) for `duration` s; `rate` = total requests/s
    (0 = each user sends its next request as soon as the last is answered)."""
    rec: list[tuple[float, float, int]] = []  # (sent at, seconds, model version or -1), requests sent in the window
    statuses: Counter = Counter()
    errors: Counter = Counter()
    short = [0]
    window = [float("inf"), float("-inf")]
    hdrs = {"Content-Type": "application/json", **headers}

    class PredictUser(FastHttpUser):
        host = url
        wait_time = constant_throughput(rate / users) if rate else constant(0)
        network_timeout = 60.0
        connection_timeout = 10.0

        @task
        def predict(self) -> None:
            body = bodies[random.randrange(len(bodies))]
            t0 = time.perf_counter()
            with self.client.post(path, data=body, headers=hdrs, name="predict", catch_response=True) as r:
                dt = time.perf_counter() - t0
                problem, version = None, -1
                if r.status_code != 200:
                    problem = f"HTTP {r.status_code}" if r.status_code else f"connection: {r.error!r}"[:200]
                else:
                    try:
                        doc = json.loads(r.content)
                        version = int(doc["model_version"])
                        if len(doc["predictions"][0]["labels"]) < 5:
                            short[0] += 1
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        problem = f"bad body: {type(exc).__name__}"
                if problem:
                    r.failure(problem)
                if window[0] <= t0 < window[1]:
                    rec.append((t0, dt, version))
                    statuses[r.status_code] += 1
                    if problem:
                        errors[problem] += 1

    env = Environment(user_classes=[PredictUser], host=url)
    runner = env.create_local_runner()
    runner.start(users, spawn_rate=max(users, 1) * 10)
    gevent.sleep(1.0)  # users spawned and connected
    window[0] = time.perf_counter()
    window[1] = window[0] + duration
    gevent.sleep(duration)
    gevent.sleep(min(10.0, 1.0 + 0.1 * duration))  # let requests sent inside the window come back
    runner.quit()
    return load_summary(rec, window[0], duration, users, rate, statuses, errors, short[0])


def _pct(a: np.ndarray, q: float) -> float | None:
    return float(np.percentile(a, q)) if a.size else None


def load_summary(rec, t_begin, duration, users, rate, statuses, errors, short) -> dict:
    """Throughput and latency percentiles of the requests sent in the window, a per-second timeline, and the
    latency right after each snapshot swap (the first answer from a newer model version) against the rest."""
    t = np.array([r[0] - t_begin for r in rec])
    a = np.array([r[1] for r in rec]) * 1e3
    v = np.array([r[2] for r in rec], dtype=np.int64)
    order = np.argsort(t)
    t, a, v = t[order], a[order], v[order]
    n = int(a.size)
    versions = Counter(int(x) for x in v if x >= 0)
    # a swap: the first request answered by a version newer than every earlier answer
    swaps, newest = [], None
    for ti, vi in zip(t, v, strict=True):
        if vi >= 0 and (newest is None or vi > newest):
            if newest is not None:
                swaps.append((float(ti), int(vi)))
            newest = vi
    near = np.zeros(n, dtype=bool)
    for ts, _ in swaps:
        near |= (t >= ts - 1.0) & (t < ts + 2.0)
    timeline = []
    for sec in range(int(np.ceil(duration))):
        m = (t >= sec) & (t < sec + 1)
        if m.any():
            timeline.append(
                {
                    "s": sec,
                    "n": int(m.sum()),
                    "p50_ms": _pct(a[m], 50),
                    "p99_ms": _pct(a[m], 99),
                    "max_ms": float(a[m].max()),
                }
            )
    return {
        "users": users,
        "rate_target": rate or None,
        "seconds": duration,
        "requests": n,
        "requests_per_s": n / duration,
        "p50_ms": _pct(a, 50),
        "p95_ms": _pct(a, 95),
        "p99_ms": _pct(a, 99),
        "max_ms": float(a.max()) if n else None,
        "mean_ms": float(a.mean()) if n else None,
        "errors": int(sum(errors.values())),
        "error_kinds": dict(errors),
        "status_codes": {str(k): c for k, c in statuses.items()},
        "model_versions": {str(k): c for k, c in sorted(versions.items())},
        "fewer_than_k_labels": short,
        "swaps": [{"at_s": ts, "version": vs} for ts, vs in swaps],
        "near_swaps": {
            "requests": int(near.sum()),
            "p50_ms": _pct(a[near], 50),
            "p99_ms": _pct(a[near], 99),
            "max_ms": float(a[near].max()) if near.any() else None,
        },
        "away_from_swaps": {
            "requests": int((~near).sum()),
            "p50_ms": _pct(a[~near], 50),
            "p99_ms": _pct(a[~near], 99),
            "max_ms": float(a[~near].max()) if (~near).any() else None,
        },
        "timeline": timeline,
    }


# ----------------------------------------------------------------------------------------------- the run


class Run:
    def __init__(self, args):
        self.args = args
        self.service = Service(args)
        self.job_id: str | None = None
        self.sampler: Sampler | None = None
        self.phases: list[dict] = []

    def job(self) -> dict:
        return self.service.call("GET", f"/v1/jobs/{self.job_id}", "get job")

    def upload(self, data_dir: Path) -> str:
        a, svc = self.args, self.service
        if a.train_dataset_id:
            svc.call("GET", f"/v1/datasets/{a.train_dataset_id}", "get dataset")
            return a.train_dataset_id
        meta = json.loads((data_dir / "train" / "meta.json").read_text())
        name = f"load-{data_dir.name}-train"
        for ds in svc.call("GET", "/v1/datasets", "list datasets")["data"]:
            if ds["name"] == name and ds["num_points"] == meta.get("num_points", ds["num_points"]):
                log(f"reusing dataset {ds['id']} ({name})")
                return ds["id"]
        text = xmc_text(data_dir)
        size = text.stat().st_size

        def chunks():
            with open(text, "rb") as fh:
                while block := fh.read(1 << 20):
                    yield block

        t0 = time.perf_counter()
        log(f"uploading {text} ({size / MB:.0f} MB)")
        ds = svc.call(
            "POST",
            "/v1/datasets",
            "upload",
            params={"name": name},
            content=chunks(),
            headers={"Content-Type": "text/plain", "Content-Length": str(size)},
            timeout=httpx.Timeout(3600.0),
        )
        dt = time.perf_counter() - t0
        log(
            f"uploaded dataset {ds['id']}: {ds['num_points']} points, {ds['num_labels']} labels "
            f"in {dt:.1f}s ({size / MB / dt:.0f} MB/s)"
        )
        self.upload_s = dt
        return ds["id"]

    def start_job(self, dataset_id: str) -> None:
        a = self.args
        # Early stopping (on by default) would end the job within the phases: it trains until stopped.
        config: dict[str, Any] = {
            "schedule": {"epochs": 1_000_000, "early_stop_patience": "never", "eval_every": a.eval_every},
            "seed": a.seed,
        }
        if a.trainer_threads:
            config["threads"] = a.trainer_threads
        config = merge_settings(config, json.loads(a.job_config) if a.job_config else {})
        self.job_config = config
        job = self.service.call(
            "POST", "/v1/jobs", "start job", json={"train_dataset_id": dataset_id, "config": config}
        )
        self.job_id = job["id"]
        log(f"job {self.job_id} started: {config}")
        t0 = time.monotonic()
        while True:
            r = self.service.client.get(f"/v1/models/{self.job_id}")
            info = r.json() if r.status_code == 200 else {}
            if info.get("ready"):
                break
            state = self.job()["state"]
            if state in ("failed", "completed", "stopped", "interrupted"):
                raise RuntimeError(f"job {self.job_id} is {state} before its first snapshot: {self.job().get('error')}")
            if time.monotonic() - t0 > a.snapshot_timeout:
                raise RuntimeError(f"no snapshot within {a.snapshot_timeout:.0f}s")
            time.sleep(1.0)
        self.first_snapshot_s = time.monotonic() - t0
        log(f"first snapshot after {self.first_snapshot_s:.0f}s")

    def warm_up(self, bodies: dict[str, list[bytes]], modes: list[str]) -> dict:
        """A few sequential requests per mode: the service compiles its predict kernels and faults in the model."""
        out = {}
        for mode in modes:
            times = []
            for body in bodies[mode][: self.args.warmup]:
                t0 = time.perf_counter()
                r = self.service.client.post(
                    f"/v1/models/{self.job_id}/predict", content=body, headers={"Content-Type": "application/json"}
                )
                times.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"warm-up {mode} prediction: HTTP {r.status_code}: {r.text[:300]}")
            out[mode] = {"first_ms": times[0] * 1e3, "last_ms": times[-1] * 1e3}
            log(f"warm-up {mode}: first {times[0] * 1e3:.0f} ms, last {times[-1] * 1e3:.1f} ms")
        return out

    def trainer_rate(self, before: dict, after: dict, t_before: float, t_after: float) -> dict:
        """Samples/s over the phase: from the metrics endpoint (points recorded in the phase, training-step time
        only) and from the job's progress counter (wall clock, so evaluation and snapshots count too)."""
        out: dict[str, Any] = {"state_after": after["state"]}
        s0, s1 = before["progress"]["samples"], after["progress"]["samples"]
        out["wall_samples_per_s"] = (s1 - s0) / (t_after - t_before) if t_after > t_before else None
        step0, step1 = before["progress"]["step"], after["progress"]["step"]
        pts = self.service.call("GET", f"/v1/jobs/{self.job_id}/metrics", "metrics", params={"since_step": step0})[
            "data"
        ]
        pts = [p for p in pts if p["step"] <= step1 and p.get("elapsed_s") is not None]
        out["metric_points"] = len(pts)
        if len(pts) >= 2 and pts[-1]["elapsed_s"] > pts[0]["elapsed_s"]:
            out["samples_per_s"] = (pts[-1]["samples"] - pts[0]["samples"]) / (
                pts[-1]["elapsed_s"] - pts[0]["elapsed_s"]
            )
        elif pts and pts[-1].get("samples_per_s"):
            out["samples_per_s"] = float(np.mean([p["samples_per_s"] for p in pts if p.get("samples_per_s")]))
        else:
            out["samples_per_s"] = None
        out["steps"] = step1 - step0
        return out

    def phase(
        self, name: str, mode: str | None, training: bool, duration: float, bodies: dict[str, list[bytes]]
    ) -> dict:
        a = self.args
        log(f"phase {name}: {duration:.0f}s")
        self.sampler.phase = name
        self.sampler.sample()
        before, t_before = (self.job(), time.time()) if training else (None, None)
        result: dict[str, Any] = {"phase": name, "mode": mode, "training": training, "duration_s": duration}
        if mode is None:
            gevent.sleep(duration)
        else:
            users, rate = (a.users, a.rate) if mode == "lsh" else (a.exact_users, a.exact_rate)
            result["load"] = run_load(
                self.service.url,
                f"/v1/models/{self.job_id}/predict",
                bodies[mode],
                users,
                rate,
                duration,
                self.service.headers,
            )
        self.sampler.sample()
        if training:
            after, t_after = self.job(), time.time()
            result["trainer_rate"] = self.trainer_rate(before, after, t_before, t_after)
            if after["state"] != "running":
                log(f"warning: the job is {after['state']} at the end of {name}")
        mine = [s for s in self.sampler.samples if s["phase"] == name]
        result["service_memory"] = memory_summary(mine, "service")
        result["trainer_memory"] = memory_summary(mine, "trainer") if training else None
        result["loadgen_memory"] = memory_summary(mine, "loadgen")
        cpus = [s["machine_cpu"] for s in mine[1:]]
        result["machine_cpu_percent_mean"] = float(np.mean(cpus)) if cpus else None
        mapped = [s["mapped"] for s in mine if s.get("mapped")]
        result["mapped_snapshot_versions_max"] = max((m[0] for m in mapped), default=None)
        result["mapped_deleted_versions_max"] = max((m[1] for m in mapped), default=None)
        result["load_average"] = os.getloadavg()
        self.phases.append(result)
        _print_phase(result)
        return result

    def stop_job(self) -> None:
        t0 = time.monotonic()
        state = self.job()["state"]
        if state not in ("queued", "running", "interrupted"):
            log(f"job {self.job_id} is already {state}")
            self.stop_s = 0.0
            return
        log(f"stopping job {self.job_id}")
        self.service.call("POST", f"/v1/jobs/{self.job_id}/stop", "stop job")
        while self.job()["state"] not in ("stopped", "completed", "failed", "interrupted"):
            if time.monotonic() - t0 > 600:
                raise RuntimeError("the job did not stop within 600 s")
            time.sleep(0.5)
        self.stop_s = time.monotonic() - t0
        log(f"job {self.job()['state']} after {self.stop_s:.1f}s")

    def main(self) -> dict:
        a = self.args
        modes = ["lsh", "exact"] if a.mode == "both" else [a.mode]
        data_dir = prepare_data(a)
        bodies = query_bodies(data_dir, a.queries, 5, a.seed)
        self.service.start()
        t_start = time.time()
        try:
            self.sampler = Sampler(self.service.pid, a.sample_s)
            self.sampler.start()
            dataset_id = self.upload(data_dir)
            self.start_job(dataset_id)
            warm = self.warm_up(bodies, modes)
            phase_len = {
                "lsh": a.duration,
                "exact": a.exact_duration if a.exact_duration is not None else min(a.duration, 120.0),
            }
            idle = a.idle_duration if a.idle_duration is not None else min(a.duration, 120.0)
            if idle > 0:
                self.phase("training / no load", None, True, idle, bodies)
            for m in modes:
                self.phase(f"training / {m}", m, True, phase_len[m], bodies)
            self.stop_job()
            for m in modes:
                stopped_len = phase_len[m] if a.stopped_duration is None else min(phase_len[m], a.stopped_duration)
                self.phase(f"stopped / {m}", m, False, stopped_len, bodies)
            self.sampler.phase = "end"
            self.sampler.sample()
            self.sampler.stop()
            report = self.report(data_dir, warm, t_start)
        finally:
            if self.sampler is not None:
                self.sampler.stop()
            if self.job_id and not a.keep:
                try:
                    if self.job()["state"] in ("running", "queued", "stopping"):
                        self.service.call("POST", f"/v1/jobs/{self.job_id}/stop", "stop job")
                        time.sleep(2)
                    if a.url or a.service_data_dir:  # a temp data dir goes away whole
                        self.service.call("DELETE", f"/v1/jobs/{self.job_id}", "delete job")
                except Exception as exc:  # noqa: BLE001
                    log(f"could not clean up job {self.job_id}: {exc}")
            self.service.close()
        return report

    def report(self, data_dir: Path, warm: dict, t_start: float) -> dict:
        a = self.args
        train_meta = json.loads((data_dir / "train" / "meta.json").read_text())
        by = {p["phase"]: p for p in self.phases}
        tl = by.get("training / lsh", {})
        errors = sum(p.get("load", {}).get("errors", 0) for p in self.phases)
        whole = memory_summary([s for s in self.sampler.samples if s["phase"] not in ("setup",)], "service")
        lsh_mem = tl.get("service_memory") or {}
        growth_limit = max(16.0, 0.02 * (lsh_mem.get("anon_start_mb") or 0.0))
        targets = {
            "lsh_p99_while_training_under_50ms": (tl.get("load", {}).get("p99_ms") or 1e9) < 50.0 if tl else None,
            "zero_errors": errors == 0,
            "no_memory_growth_while_training_lsh": (abs(lsh_mem["anon_growth_mb"]) <= growth_limit)
            if lsh_mem
            else None,
            "memory_growth_rule": f"service anonymous RSS after the phase's warm-up (first 25%, at most 60 s): "
            f"median of the last fifth minus the first fifth within {growth_limit:.0f} MB "
            f"(max(16 MB, 2%))",
            "total_errors": errors,
            "lsh_phase_seconds": tl.get("duration_s"),
        }
        versions = {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "locust": locust.__version__,
            "psutil": psutil.__version__,
        }
        for mod in ("numba", "fastapi", "uvicorn", "starlette"):
            try:
                versions[mod] = __import__(mod).__version__
            except ImportError:
                pass
        return {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "git": _git_state(),
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
            "machine": {
                "cpu": cpu_name(),
                "cores": os.cpu_count(),
                "memory_gb": psutil.virtual_memory().total / 1e9,
                "platform": platform.platform(),
            },
            "versions": versions,
            "data": {"dir": str(data_dir), "train": train_meta},
            "service": {
                "url": self.service.url,
                "started_here": self.service.proc is not None,
                "snapshot_interval_s": a.snapshot_interval if self.service.proc is not None else None,
                "trainer_threads": a.trainer_threads or "service default (all cores)",
                "trainer_nice": next((s["trainer"]["nice"] for s in self.sampler.samples if s.get("trainer")), None),
                "access_log": a.access_log,
            },
            "job": {
                "id": self.job_id,
                "config": getattr(self, "job_config", None),
                "first_snapshot_s": getattr(self, "first_snapshot_s", None),
                "stop_s": getattr(self, "stop_s", None),
            },
            "upload_s": getattr(self, "upload_s", None),
            "warm_up": warm,
            "phases": self.phases,
            "whole_run_service_memory": whole,
            "targets": targets,
            "samples": self.sampler.samples,
        }


def _fmt(v, spec=".1f", scale=1.0):
    return "-" if v is None else format(v * scale, spec)


def _print_phase(p: dict) -> None:
    load = p.get("load") or {}
    sm, tm = p.get("service_memory") or {}, p.get("trainer_memory") or {}
    tr = p.get("trainer_rate") or {}
    log(
        f"  {p['phase']}: {_fmt(load.get('requests_per_s'), '.0f')} req/s, p50 {_fmt(load.get('p50_ms'), '.2f')} "
        f"p99 {_fmt(load.get('p99_ms'), '.2f')} ms, errors {load.get('errors', '-')}, service RSS "
        f"{_fmt(sm.get('rss_start_mb'), '.0f')}->{_fmt(sm.get('rss_end_mb'), '.0f')} MB "
        f"(anon {_fmt(sm.get('anon_growth_mb'), '+.0f')}), trainer RSS {_fmt(tm.get('rss_end_mb'), '.0f')} MB, "
        f"trainer {_fmt(tr.get('samples_per_s'), '.0f')} samples/s (wall {_fmt(tr.get('wall_samples_per_s'), '.0f')})"
    )


def print_table(report: dict) -> None:
    print(
        f"\n{report['data']['dir']}: {report['data']['train'].get('num_points')} train points, "
        f"{report['data']['train'].get('num_labels')} labels; {report['machine']['cores']} cores; "
        f"single-query top-5 predictions of real test points"
    )
    head = (
        f"{'phase':<20}{'users':>6}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}{'errors':>7}"
        f"{'versions':>9}{'svc RSS MB':>16}{'svc anon +MB':>13}{'trainer RSS MB':>16}{'train smp/s':>12}"
        f"{'wall smp/s':>11}{'CPU% svc/trn/gen/all':>22}"
    )
    print(head)
    for p in report["phases"]:
        load = p.get("load") or {}
        sm, tm = p.get("service_memory") or {}, p.get("trainer_memory") or {}
        gm = p.get("loadgen_memory") or {}
        tr = p.get("trainer_rate") or {}
        users = load.get("users")
        if users and load.get("rate_target"):
            users = f"{users}@{load['rate_target']:g}"
        cpu = "/".join(
            _fmt(x, ".0f")
            for x in (
                sm.get("cpu_percent_mean"),
                tm.get("cpu_percent_mean"),
                gm.get("cpu_percent_mean"),
                p.get("machine_cpu_percent_mean"),
            )
        )
        rss = f"{_fmt(sm.get('rss_start_mb'), '.0f')}->{_fmt(sm.get('rss_end_mb'), '.0f')}" if sm else "-"
        print(
            f"{p['phase']:<20}{str(users or '-'):>6}{_fmt(load.get('requests_per_s'), '.0f'):>8}"
            f"{_fmt(load.get('p50_ms'), '.2f'):>9}{_fmt(load.get('p95_ms'), '.2f'):>9}"
            f"{_fmt(load.get('p99_ms'), '.2f'):>9}"
            f"{_fmt(load.get('max_ms'), '.1f'):>9}{str(load.get('errors', '-')):>7}"
            f"{len(load.get('model_versions', {})) or '-':>9}{rss:>16}{_fmt(sm.get('anon_growth_mb'), '+.1f'):>13}"
            f"{_fmt(tm.get('rss_end_mb'), '.0f'):>16}{_fmt(tr.get('samples_per_s'), '.0f'):>12}"
            f"{_fmt(tr.get('wall_samples_per_s'), '.0f'):>11}{cpu:>22}"
        )
    for p in report["phases"]:
        load = p.get("load") or {}
        if load.get("swaps"):
            near, away = load["near_swaps"], load["away_from_swaps"]
            print(
                f"{p['phase']}: {len(load['swaps'])} snapshot swap(s) under load; requests sent from 1 s before to "
                f"2 s after one: p99 {_fmt(near['p99_ms'], '.1f')} ms, max {_fmt(near['max_ms'], '.1f')} ms "
                f"({near['requests']}); the rest: p99 {_fmt(away['p99_ms'], '.1f')} ms, max "
                f"{_fmt(away['max_ms'], '.1f')} ms"
            )
    t = report["targets"]
    w = report.get("whole_run_service_memory") or {}
    print(
        f"\nservice RSS over the whole run: {_fmt(w.get('rss_start_mb'), '.0f')} -> "
        f"{_fmt(w.get('rss_end_mb'), '.0f')} MB "
        f"(max {_fmt(w.get('rss_max_mb'), '.0f')}); anonymous {_fmt(w.get('anon_start_mb'), '.0f')} -> "
        f"{_fmt(w.get('anon_end_mb'), '.0f')} MB"
    )
    print(
        f"targets: lsh p99 < 50 ms while training: {_yes(t['lsh_p99_while_training_under_50ms'])}; "
        f"zero errors: {_yes(t['zero_errors'])} ({t['total_errors']}); no memory growth while training + lsh "
        f"({_fmt(t['lsh_phase_seconds'], '.0f')} s): {_yes(t['no_memory_growth_while_training_lsh'])} "
        f"[{t['memory_growth_rule']}]"
    )


def _git_state() -> dict:
    """The commit measured, and the files that differed from it (a shared checkout may have edits in flight)."""

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "HEAD"), "modified": [f for f in changed if f.startswith(("app/", "engine/"))]}


def _yes(v) -> str:
    return "n/a" if v is None else ("met" if v else "NOT met")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="amazon670k", help="engine.synth preset; data in bench-data/<preset>-s<seed>")
    p.add_argument("--data", help="a dataset dir with train/ and test/ (engine.save_dataset format) instead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", help="a running service on 127.0.0.1 (default: start one)")
    p.add_argument("--service-pid", type=int, help="its process id, when --url's listening socket cannot be looked up")
    p.add_argument(
        "--service-data-dir",
        help="data dir of the service started here (default: a temp dir, removed "
        "after; a kept one lets later runs reuse the upload)",
    )
    p.add_argument("--tmp-dir", help="where the temp data dir goes (default: the system's)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--access-log", action="store_true", help="keep uvicorn's access log (off by default)")
    p.add_argument("--train-dataset-id", help="reuse this uploaded dataset")
    p.add_argument(
        "--snapshot-interval",
        type=float,
        default=30.0,
        help="SLIDE_SNAPSHOT_INTERVAL_S of the service started here (default 30, the service's)",
    )
    p.add_argument("--trainer-threads", type=int, default=0, help="trainer threads (default: the service's, all cores)")
    p.add_argument(
        "--trainer-nice", type=int, help="SLIDE_TRAINER_NICE of the service started here (default: the service's, 10)"
    )
    p.add_argument("--eval-every", type=int, default=20, help="steps between the job's metric points")
    p.add_argument("--job-config", help="JSON merged into the job's config")
    p.add_argument("--snapshot-timeout", type=float, default=1200.0)
    p.add_argument("--mode", choices=("lsh", "exact", "both"), default="both")
    p.add_argument("--duration", type=float, default=600.0, help="seconds per lsh phase (and exact, see below)")
    p.add_argument("--exact-duration", type=float, help="seconds per exact phase (default min(120, --duration))")
    p.add_argument(
        "--idle-duration", type=float, help="seconds of training without load, 0 = none (default min(120, --duration))"
    )
    p.add_argument(
        "--stopped-duration",
        type=float,
        help="at most this many seconds per phase after the stop (default: as while training)",
    )
    p.add_argument("--users", type=int, default=4, help="concurrent lsh clients")
    p.add_argument("--rate", type=float, default=0.0, help="total lsh requests/s to offer (0 = as fast as answered)")
    p.add_argument("--exact-users", type=int, default=1)
    p.add_argument("--exact-rate", type=float, default=10.0, help="total exact requests/s (0 = as fast as answered)")
    p.add_argument("--queries", type=int, default=2000, help="distinct test points sent")
    p.add_argument("--warmup", type=int, default=20, help="sequential requests per mode before the phases")
    p.add_argument("--sample-s", type=float, default=1.0, help="memory/CPU sampling interval")
    p.add_argument("--keep", action="store_true", help="keep the job (and the temp data dir)")
    p.add_argument(
        "--out",
        help="default benchmarks/results/load.json for the amazon670k preset (the recorded run), "
        "load-<data>.json for anything else (a quick look does not overwrite it)",
    )
    args = p.parse_args(argv)
    if args.url is None and args.service_pid:
        p.error("--service-pid goes with --url")
    logging.getLogger("locust").setLevel(logging.WARNING)

    report = Run(args).main()
    name = "load" if not args.data and args.preset == "amazon670k" else f"load-{Path(report['data']['dir']).name}"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
