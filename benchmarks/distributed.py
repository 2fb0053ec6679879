"""Label-sharded training on Ray against the shard count, and a cost model projecting time per epoch on N machines.

    .venv/bin/python benchmarks/distributed.py [--shards 1,2,4] [--points 6000] [--steps 30] [--cores 2]

On this machine: an amazon670k-shaped model (670,091 labels, 135,909 features; `--points` training points) trains
`--steps` batches on a local Ray instance for each shard count (one thread per shard), after the same number of
warm-up steps. It prints samples/s, bytes sent per step between the driver and the shards, the driver's time per
step and the slowest shard's compute per step, next to the single-process Trainer.

The cost model: the slowest shard's compute per step is A + B / P (A: what every shard does whatever P, i.e. the
replicated hidden layers and the shard's own capped active set; B / P: what shrinks with the shard's slice of the
labels, i.e. rehashing and table upkeep), stretched by P / cores when shards outnumber the cores; the driver adds
an overhead per step of c0 + c1 * P (Ray calls and reductions). A, B, c0 and c1 are fitted on the first two shard
counts and checked on the others. The projection puts one shard per machine (N = P) with `--speedup` times this
machine's single-thread compute, the measured bytes at `--bandwidth-gbps`, and prints time per epoch for
Amazon-670K and a catalog of `--catalog-labels` labels (one training query per label and epoch), and which term
dominates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(cfg, train, shards: int, steps: int, warmup: int) -> dict:
    from engine.distributed import DistributedTrainer

    t0 = time.perf_counter()
    trainer = DistributedTrainer(cfg, train, shards=shards, address="local")
    start_s = time.perf_counter() - t0
    try:
        order = trainer.epoch_order(0)
        b = cfg.batch_size

        def run(first: int, count: int) -> float:
            t = time.perf_counter()
            for s in range(first, first + count):
                trainer.train_step(order[s * b : (s + 1) * b])
            trainer.sync()
            return time.perf_counter() - t

        run(0, warmup)
        bytes0, stages0, shard0 = trainer.group.bytes_sent, dict(trainer.stage_seconds), trainer.shard_timings()
        seconds = run(warmup, steps)
        shard1 = trainer.shard_timings()
        per_shard = [sum(t1.values()) - sum(t0.values()) for t0, t1 in zip(shard0, shard1, strict=True)]
        by_stage = {
            k: max(t1.get(k, 0.0) - t0.get(k, 0.0) for t0, t1 in zip(shard0, shard1, strict=True)) / steps * 1e3
            for k in ("forward", "exps", "update", "backward")
        }
        return {
            "shards": shards,
            "start_s": start_s,
            "samples_per_s": steps * b / seconds,
            "step_ms": seconds / steps * 1e3,
            "bytes_per_step": (trainer.group.bytes_sent - bytes0) / steps,
            "shard_compute_ms": max(per_shard) / steps * 1e3,
            "shard_stage_ms": by_stage,
            "driver_stage_ms": {k: (v - stages0.get(k, 0.0)) / steps * 1e3 for k, v in trainer.stage_seconds.items()},
        }
    finally:
        trainer.close()


def single_process(cfg, train, steps: int, warmup: int) -> dict:
    from engine import Trainer

    trainer = Trainer(cfg, train)
    order = trainer.epoch_order(0)
    b = cfg.batch_size
    for s in range(warmup):
        trainer.train_step(order[s * b : (s + 1) * b])
    t = time.perf_counter()
    for s in range(warmup, warmup + steps):
        trainer.train_step(order[s * b : (s + 1) * b])
    seconds = time.perf_counter() - t
    return {"samples_per_s": steps * b / seconds, "step_ms": seconds / steps * 1e3}


def fit(rows: list[dict], cores: int) -> dict:
    """A, B (ms) of compute(P) = (A + B / P) * max(1, P / cores) and c0, c1 (ms) of overhead(P) = c0 + c1 * P, from
    the first two shard counts."""
    (p1, r1), (p2, r2) = [(r["shards"], r) for r in rows[:2]]

    def unstretched(r: dict) -> float:
        return r["shard_compute_ms"] / max(1.0, r["shards"] / cores)

    b = (unstretched(r1) - unstretched(r2)) / (1 / p1 - 1 / p2)
    a = unstretched(r1) - b / p1
    o1, o2 = r1["step_ms"] - r1["shard_compute_ms"], r2["step_ms"] - r2["shard_compute_ms"]
    c1 = (o2 - o1) / (p2 - p1)
    return {"A_ms": a, "B_ms": b, "c0_ms": o1 - c1 * p1, "c1_ms": c1}


def predict(model: dict, shards: int, cores: int) -> float:
    compute = (model["A_ms"] + model["B_ms"] / shards) * max(1.0, shards / cores)
    return compute + model["c0_ms"] + model["c1_ms"] * shards


def project(model: dict, labels_measured: int, bytes_per_step: float, args) -> list[dict]:
    """Time per epoch with one shard per machine: compute / speedup (A fixed, B scaled to the catalog's labels per
    shard), the driver overhead measured here (Ray calls), and the bytes over the network."""
    out = []
    catalogs = [("Amazon-670K", 670_091, 490_449), (f"{args.catalog_labels:,} labels", args.catalog_labels, None)]
    for name, labels, points in catalogs:
        points = points or labels
        steps = -(-points // args.batch)
        for n in (1, 2, 4, 8, 16, 32, 64):
            fixed = model["A_ms"] / args.speedup
            sliced = model["B_ms"] * labels / labels_measured / n / args.speedup
            network = bytes_per_step * 8 / (args.bandwidth_gbps * 1e9) * 1e3 + model["c0_ms"] + model["c1_ms"] * n
            step = fixed + sliced + network
            terms = {"replicated + per-shard active set": fixed, "label slice (rehash, tables)": sliced}
            terms["communication"] = network
            out.append(
                {
                    "catalog": name,
                    "machines": n,
                    "step_ms": step,
                    "epoch_h": steps * step / 3.6e6,
                    "dominant": max(terms, key=lambda k: terms[k]),
                    "shard_gb": shard_memory(labels, n, args) / 1e9,
                }
            )
    return out


def shard_memory(labels: int, shards: int, args) -> float:
    from engine import SlideConfig
    from engine.memory import estimate_memory

    cfg = SlideConfig(batch_size=args.batch, threads=16, sample_output=True)
    return estimate_memory(cfg, 1000, 135_909, -(-labels // shards), nnz=75_000, label_entries=5_400).trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--points", type=int, default=6000)
    parser.add_argument("--labels", type=int, default=670_091)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--cores", type=int, default=2, help="cores of this machine the shards share")
    parser.add_argument("--speedup", type=float, default=8.0, help="a machine's compute against one thread here")
    parser.add_argument("--bandwidth-gbps", type=float, default=10.0)
    parser.add_argument("--catalog-labels", type=int, default=100_000_000)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from engine import SlideConfig, generate, load_dataset, save_dataset
    from engine._numba import set_threads

    shard_counts = [int(s) for s in args.shards.split(",")]
    train, _ = generate("amazon670k", num_train=args.points, num_test=10, num_labels=args.labels)
    with tempfile.TemporaryDirectory() as tmp:
        train = load_dataset(save_dataset(train, Path(tmp) / "train"))  # the shards open it from its directory
        cfg = SlideConfig(batch_size=args.batch, threads=1, sample_output=True, val_points="none")
        set_threads(1)
        single = single_process(cfg, train, args.steps, args.warmup)
        rows = [measure(cfg, train, p, args.steps, args.warmup) for p in shard_counts]
    model = fit(rows, args.cores)
    print(f"amazon670k shape: {args.labels:,} labels, {args.points:,} points, batch {args.batch}, one thread per shard")
    print(f"single-process Trainer: {single['samples_per_s']:.0f} samples/s ({single['step_ms']:.1f} ms/step)\n")
    print("| shards | samples/s | bytes/step | step ms | slowest shard compute ms | model ms | model / measured |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m = predict(model, r["shards"], args.cores)
        print(
            f"| {r['shards']} | {r['samples_per_s']:.0f} | {r['bytes_per_step']:,.0f} | {r['step_ms']:.1f} | "
            f"{r['shard_compute_ms']:.1f} | {m:.1f} | {m / r['step_ms']:.2f} |"
        )
    print(
        f"\nfit on {shard_counts[0]} and {shard_counts[1]} shards: A = {model['A_ms']:.1f} ms (every shard, any P), "
        f"B = {model['B_ms']:.1f} ms (divided by P), overhead = {model['c0_ms']:.1f} + {model['c1_ms']:.2f} * P ms"
    )
    for r in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["shard_stage_ms"].items())
        print(f"  {r['shards']} shards, slowest shard per stage (ms/step): {stages}")
    proj = project(model, args.labels, rows[0]["bytes_per_step"], args)
    speed = f"{args.speedup:g}x this machine's thread, {args.bandwidth_gbps:g} Gb/s"
    print(f"\nprojection: one shard per machine at {speed}")
    print("| catalog | machines | step ms | hours per epoch | largest term | shard memory GB |")
    print("|---|---|---|---|---|---|")
    for p in proj:
        print(
            f"| {p['catalog']} | {p['machines']} | {p['step_ms']:.1f} | {p['epoch_h']:.2f} | {p['dominant']} | "
            f"{p['shard_gb']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"single": single, "rows": rows, "model": model, "projection": proj}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
