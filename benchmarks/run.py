"""`make bench`: SLIDE sparse vs our dense mode vs PyTorch dense on amazon670k-shaped data.

Every system trains the same network (sparse input -> 128 ReLU -> softmax over all labels) on the
same data in the same order, with the same threads, for the same training-time budget, and is
evaluated on the same test points. Each system runs in its own process so peak RSS is its own.
Prints a table and writes benchmarks/results/<preset>.json.

    python benchmarks/run.py --preset amazon670k --budget 300 --threads 2
    python benchmarks/run.py --preset small --budget 30          # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_name  # noqa: E402

if TYPE_CHECKING:
    from engine.progress import TrainingMetrics


def prepare(args) -> dict:
    from engine import load_dataset, save_dataset
    from engine.synth import generate

    d = Path(
        str(ROOT / "bench-data" / f"{args.preset}-s{args.seed}") + (f"-n{args.num_train}" if args.num_train else "")
    )
    if not (d / "test" / "meta.json").exists():
        t0 = time.perf_counter()
        overrides = {"num_train": args.num_train} if args.num_train else {}
        train, test = generate(args.preset, seed=args.seed, **overrides)
        save_dataset(train, d / "train")
        save_dataset(test, d / "test")
        print(f"generated {args.preset} in {time.perf_counter() - t0:.1f}s -> {d}", file=sys.stderr)
    train = load_dataset(d / "train")
    return {"dir": str(d), "train": train.summary(), "test": load_dataset(d / "test").summary()}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Peak anonymous and file-backed RSS of this process, sampled every `interval` s in a thread.

    ru_maxrss counts the pages of memory-mapped files too: the shared libraries (~90 MB, most of it
    LLVM's) and the data's indptr arrays. The trainer reads its batches and evaluation points with pread
    (sparse.RowReader), so the features (~300 MB at amazon670k scale) stay in the page cache and out of
    its resident set. The split shows how much of the peak is the process's own memory; a transient
    shorter than the interval can be missed."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_anon_rss_bytes": self.peak["RssAnon"], "peak_file_rss_bytes": self.peak["RssFile"]}


def engine_config(args, dense: bool):
    from engine import ModelConfig, OptimizerConfig, ScheduleConfig, SlideConfig

    return SlideConfig(
        model=ModelConfig(sample_output=not dense),
        optimizer=OptimizerConfig(batch_size=args.batch_size),
        schedule=ScheduleConfig(epochs=1000, eval_points=args.eval_points),
        threads=args.threads,
        seed=args.seed,
    )


def epoch_records(history: list[TrainingMetrics], num_points: int) -> list[dict]:
    """The evaluations a trainer made at the end of each epoch (eval_every None evaluates there), once
    each: a budget that ends on an epoch's last batch reports that point twice."""
    ends = {}
    for h in history:
        if h.epoch > 0 and h.samples == h.epoch * num_points:
            keys = ("epoch", "samples", "elapsed_s", "p_at_1", "p_at_5")
            ends.setdefault(h.epoch, {key: h.to_dict()[key] for key in keys})
    return [ends[e] for e in sorted(ends)]


def worker_engine(args, dense: bool) -> dict:
    import tempfile

    # beside the data, on disk as a snapshot store is (/tmp may be a tmpfs: memory outside the process's RSS)
    with tempfile.TemporaryDirectory(prefix=".spill-", dir=Path(args.data).parent) as spill:
        return measure_engine(args, dense, spill)


def measure_engine(args, dense: bool, spill: str) -> dict:
    """spill: the trainer's spill directory, where it keeps the model not in use (the best one so far while
    training) in files, as the service's trainer does in its snapshot store."""
    from engine import Trainer, load_dataset

    d = Path(args.data)
    train, test = load_dataset(d / "train"), load_dataset(d / "test")
    config = engine_config(args, dense)
    sampler = RssSampler()
    compile_kernels(config)
    t0 = time.perf_counter()
    trainer = Trainer(config, train, test, spill_dir=spill)
    init_s = time.perf_counter() - t0
    records = []
    segments = args.segments
    for _ in range(segments):
        trainer.run(time_budget_s=args.budget / segments)
        rec = trainer.history[-1].to_dict()
        rec["samples_per_s"] = trainer.samples_seen / trainer.train_seconds
        records.append(rec)
        print(json.dumps({"system": "ours-dense" if dense else "ours-sparse", **rec}), file=sys.stderr, flush=True)
    result = {
        "records": records,
        "init_s": init_s,
        "samples_per_s": trainer.samples_seen / trainer.train_seconds,
        "p_at_1": records[-1]["p_at_1"],
        "p_at_5": records[-1]["p_at_5"],
        "active_fraction": records[-1]["active_fraction"],
        "rehashes": trainer.rehash_round,
        "seconds_per_epoch": train.num_points / (trainer.samples_seen / trainer.train_seconds),
    }
    result["epochs"] = epoch_records(trainer.history, train.num_points)
    # the records score the model being trained; what the run serves is the best one by validation
    served = trainer.evaluate()
    result["served"] = {"p_at_1": served["p_at_1"], "p_at_5": served["p_at_5"], "mode": served["eval_mode"]}
    arrays = trainer.arrays()
    result["state_bytes"] = int(sum(a.nbytes for a in arrays.values()))
    result["peak_rss_bytes"] = peak_rss_bytes()
    result.update(sampler.stop())
    if not dense:
        result["inference"] = measure_inference(as_served(trainer.model), test, args)
    return result


def as_served(model):
    """The model with every array read-only, as the service holds a version (mapped from its snapshot with
    np.load(mmap_mode="r")), which lets prediction pack the serving hubs' rows (SlideModel._hub_arrays)."""
    from engine.snapshot import model_arrays, model_from_arrays

    def frozen(a: np.ndarray) -> np.ndarray:
        view = a.view()
        view.flags.writeable = False
        return view

    arrays = {name: frozen(a) for name, a in model_arrays(model).items()}
    served = model_from_arrays(model.config, model.num_features, model.num_labels, arrays)
    served.featurizer, served.label_names = model.featurizer, model.label_names
    return served


def compile_kernels(config) -> None:
    """Compile the training and prediction kernels outside the timed budget, on a tiny dataset whose
    arrays have the benchmark's types (memory-mapped, read-only). main() runs this first in a process
    of its own (the `compile` worker), so that a measured worker loads the kernels from Numba's cache:
    compiling them in it would add LLVM's few hundred MB, which stays resident, to its peak RSS
    (BENCHMARKS.md, "Conditions that change the numbers")."""
    import tempfile

    from engine import Trainer, load_dataset, save_dataset
    from engine.synth import generate

    with tempfile.TemporaryDirectory() as tmp:
        small, _ = generate("tiny", seed=1)
        save_dataset(small, Path(tmp) / "tiny")
        small = load_dataset(Path(tmp) / "tiny")
        warm = Trainer(config.replace(schedule=config.schedule.replace(epochs=1)), small, small)
        warm.train_step(np.arange(64))
        warm.evaluate()
        one = small.row_slice(0, 1)
        warm.model.predict(one.x_indptr, one.x_indices, one.x_values, k=5, mode="lsh")


def measure_inference(model, test, args) -> dict:
    """Single-query latency, batch throughput and candidates scored for exact and for lsh with 0, 1
    and 2 probes per table; recall@5 of each lsh variant against exact on the same queries."""
    from engine.metrics import topk_recall

    rng = np.random.default_rng(args.seed)
    n = test.num_points
    rows = rng.choice(n, size=min(n, args.queries), replace=False)
    out = {}
    tops = {}
    variants = [("exact", "exact", 0, min(len(rows), args.exact_queries))]
    variants += [("lsh" if p == 0 else f"lsh+{p}probe", "lsh", p, len(rows)) for p in (0, 1, 2)]
    for name, mode, probes, count in variants:
        lat = []
        top = []
        for r in rows[:count]:
            s, e = test.x_indptr[r], test.x_indptr[r + 1]
            ip = np.array([0, e - s], dtype=np.int64)
            t0 = time.perf_counter()
            lab, _ = model.predict(ip, test.x_indices[s:e], test.x_values[s:e], k=5, mode=mode, probes=probes)
            lat.append(time.perf_counter() - t0)
            top.append(lab[0])
        tops[name] = np.array(top)
        batch = rows[:count]
        sub_ip = np.concatenate([[0], np.cumsum(test.x_indptr[batch + 1] - test.x_indptr[batch])]).astype(np.int64)
        idx = np.concatenate([test.x_indices[test.x_indptr[r] : test.x_indptr[r + 1]] for r in batch])
        val = np.concatenate([test.x_values[test.x_indptr[r] : test.x_indptr[r + 1]] for r in batch])
        t0 = time.perf_counter()
        _, _, scored, _ = model.predict_with_stats(sub_ip, idx, val, k=5, mode=mode, probes=probes)
        bt = time.perf_counter() - t0
        out[name] = {
            "queries": count,
            "probes": probes,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "batch_queries_per_s": count / bt,
            "mean_scored": float(scored.mean()),
        }
        if mode == "lsh":
            m = len(tops["exact"])
            out[name]["recall_at_5_vs_exact"] = topk_recall(tops[name][:m], tops["exact"][:m])
    out["text"] = measure_text(model, test, rows, args)
    return out


def measure_text(model, test, rows, args) -> dict:
    """The text path's cost at this model's size: `lsh` top-5 of the same queries as feature ids and as text,
    alternating query by query (so the machine's load falls on both alike). The text featurizer's vocabulary is
    the feature space (term `t<i>` = feature i, idf drawn once), a query's text its feature ids as words; the
    text path runs `TextFeaturizer.transform_one` first, as the service does."""
    from engine.text import TextFeaturizer

    rng = np.random.default_rng(args.seed)
    idf = (1.0 + rng.gamma(2.0, 2.0, size=int(model.num_features))).astype(np.float32)
    featurizer = TextFeaturizer({}, [f"t{i}" for i in range(int(model.num_features))], idf)
    lat: dict[str, list[float]] = {"indices": [], "text": []}
    cpu: dict[str, list[float]] = {"indices": [], "text": []}
    words = []
    for r in rows:
        s, e = test.x_indptr[r], test.x_indptr[r + 1]
        ids, vals = test.x_indices[s:e], test.x_values[s:e]
        text = " ".join(f"t{i}" for i in np.asarray(ids).tolist())
        words.append(e - s)
        t0, c0 = time.perf_counter(), time.thread_time()
        model.predict(np.array([0, e - s], dtype=np.int64), ids, vals, k=5, mode="lsh")
        lat["indices"].append(time.perf_counter() - t0)
        cpu["indices"].append(time.thread_time() - c0)
        t0, c0 = time.perf_counter(), time.thread_time()
        t_ids, t_vals = featurizer.transform_one(text)
        model.predict(np.array([0, len(t_ids)], dtype=np.int64), t_ids, t_vals, k=5, mode="lsh")
        lat["text"].append(time.perf_counter() - t0)
        cpu["text"].append(time.thread_time() - c0)
    out: dict = {"queries": len(rows), "mean_words": float(np.mean(words)), "vocabulary": int(model.num_features)}
    for name in lat:
        out[f"{name}_p50_ms"] = 1e3 * float(np.percentile(lat[name], 50))
        out[f"{name}_p99_ms"] = 1e3 * float(np.percentile(lat[name], 99))
        out[f"{name}_cpu_p50_ms"] = 1e3 * float(np.percentile(cpu[name], 50))
    out["text_minus_indices_p50_ms"] = out["text_p50_ms"] - out["indices_p50_ms"]
    out["text_minus_indices_cpu_p50_ms"] = out["text_cpu_p50_ms"] - out["indices_cpu_p50_ms"]
    return out


def worker_torch(args) -> dict:
    from torch_dense import train_torch_dense

    from engine import SlideConfig, load_dataset
    from engine.trainer import epoch_order

    d = Path(args.data)
    train, test = load_dataset(d / "train", mmap=False), load_dataset(d / "test", mmap=False)
    n = train.num_points

    def order(epoch):
        return epoch_order(args.seed, epoch, n)

    res = train_torch_dense(
        train,
        test,
        hidden=128,
        batch_size=args.batch_size,
        lr=SlideConfig().optimizer.lr,
        epochs=1000,
        time_budget_s=args.budget,
        threads=args.threads,
        seed=args.seed,
        eval_points=args.eval_points,
        eval_every_s=args.budget / args.segments,
        epoch_order=order,
        on_eval=lambda r: print(json.dumps({"system": "torch-dense", **r}), file=sys.stderr, flush=True),
    )
    res.pop("model", None)
    res["seconds_per_epoch"] = n / res["samples_per_s"] if res["samples_per_s"] else None
    res["peak_rss_bytes"] = peak_rss_bytes()
    return res


def run_worker(system: str, args, data: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        system,
        "--data",
        data,
        "--budget",
        str(args.budget),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
        "--eval-points",
        str(args.eval_points),
        "--segments",
        str(args.segments),
        "--batch-size",
        str(args.batch_size),
        "--queries",
        str(args.queries),
        "--exact-queries",
        str(args.exact_queries),
    ]
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {"error": f"worker exited with {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="amazon670k")
    p.add_argument("--num-train", type=int, default=0, help="override the preset's training points")
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per system")
    p.add_argument("--segments", type=int, default=4, help="evaluations along the budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-points", type=int, default=2000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--exact-queries", type=int, default=200)
    p.add_argument(
        "--systems",
        default="ours-sparse,ours-dense,torch-dense",
        help="systems to (re)run; results of others from an earlier run with the same budget are kept",
    )
    p.add_argument("--out", help="results file (default benchmarks/results/<preset>.json)")
    p.add_argument("--worker")
    p.add_argument("--data")
    args = p.parse_args()

    if args.worker == "compile":
        for dense in (False, True):
            compile_kernels(engine_config(args, dense))
        print("{}")
        return 0
    if args.worker:
        result = (
            worker_torch(args) if args.worker == "torch-dense" else worker_engine(args, args.worker == "ours-dense")
        )
        print(json.dumps(result))
        return 0

    info = prepare(args)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{args.preset}.json"
    previous = json.loads(out.read_text()) if out.exists() else {}
    same_setup = previous.get("budget_s") == args.budget and previous.get("threads") == args.threads
    results = dict(previous.get("results", {})) if same_setup else {}
    if any(system.startswith("ours") for system in args.systems.split(",")):
        run_worker("compile", args, info["dir"])
    for system in args.systems.split(","):
        results[system] = run_worker(system, args, info["dir"])
        results[system]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    try:
        import numba

        versions["numba"] = numba.__version__
        import torch

        versions["torch"] = torch.__version__
    except ImportError:
        pass
    report = {
        "command": " ".join(sys.argv),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": versions,
        "data": info,
        "budget_s": args.budget,
        "threads": args.threads,
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))

    print(
        f"\n{args.preset}: {info['train']['num_points']} train points, {info['train']['num_labels']} labels, "
        f"{args.threads} threads, {args.budget:.0f}s training budget each"
    )
    print(f"{'system':<13}{'samples/s':>11}{'s/epoch':>10}{'P@1':>8}{'P@5':>8}{'active':>8}{'peak RSS GB':>13}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<13} {r['error']}")
            continue
        print(
            f"{name:<13}{fmt(r['samples_per_s'], '.0f'):>11}{fmt(r['seconds_per_epoch'], '.0f'):>10}"
            f"{fmt(r['p_at_1']):>8}{fmt(r['p_at_5']):>8}{fmt(r.get('active_fraction'), '.4f'):>8}"
            f"{r['peak_rss_bytes'] / 1e9:>13.2f}"
        )
    for name, r in results.items():
        if "served" in r:
            sv = r["served"]
            print(
                f"{name} served model (the best by validation P@1): P@1 {fmt(sv['p_at_1'])}, P@5 {fmt(sv['p_at_5'])}"
                f" ({sv['mode']}; the table's P@k are the last evaluation of the model being trained)"
            )
    for name, r in results.items():
        if "epochs" in r:
            ends = ", ".join(
                f"{e['epoch']} ({e['elapsed_s']:.0f} s): {fmt(e['p_at_1'])} / {fmt(e['p_at_5'])}" for e in r["epochs"]
            )
            print(f"{name} P@1 / P@5 after each epoch: {ends or 'no epoch ended within the budget'}")
    sp = results.get("ours-sparse", {})
    if "inference" in sp:
        print(f"\n{'mode':<13}{'p50 ms':>9}{'p99 ms':>9}{'batch q/s':>11}{'scored':>9}{'recall@5':>10}")
        for mode, r in sp["inference"].items():
            if mode == "text":
                continue
            print(
                f"{mode:<13}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}{r['batch_queries_per_s']:>11.0f}"
                f"{r['mean_scored']:>9.0f}{fmt(r.get('recall_at_5_vs_exact')):>10}"
            )
        tx = sp["inference"].get("text")
        if tx:
            print(
                f"\nlsh top-5 by text ({tx['mean_words']:.0f} words, {tx['vocabulary']:,}-term vocabulary) against "
                f"feature ids, alternating: p50 {tx['text_p50_ms']:.3f} / {tx['indices_p50_ms']:.3f} ms, p99 "
                f"{tx['text_p99_ms']:.3f} / {tx['indices_p99_ms']:.3f} ms; text adds "
                f"{tx['text_minus_indices_p50_ms']:.3f} ms at p50 (target: <= 1 ms); CPU time p50 "
                f"{tx['text_cpu_p50_ms']:.3f} / {tx['indices_cpu_p50_ms']:.3f} ms"
            )
        print(f"\nours-sparse peak RSS / (weights + Adam + tables) = {sp['peak_rss_bytes'] / sp['state_bytes']:.2f}")
        if "peak_anon_rss_bytes" in sp:
            print(
                f"ours-sparse peak anonymous RSS / (weights + Adam + tables) = "
                f"{sp['peak_anon_rss_bytes'] / sp['state_bytes']:.2f} (file-backed peak "
                f"{sp['peak_file_rss_bytes'] / 1e9:.2f} GB: the memory-mapped data and libraries)"
            )
    if "torch-dense" in results and "samples_per_s" in results["torch-dense"] and "samples_per_s" in sp:
        speedup = sp["samples_per_s"] / results["torch-dense"]["samples_per_s"]
        print(f"ours-sparse / torch-dense training speed = {speedup:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
