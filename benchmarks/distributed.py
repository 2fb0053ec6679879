"""Label-sharded training on Ray against the shard count, and a cost model projecting time per epoch on N machines.

    .venv/bin/python benchmarks/distributed.py [--shards 1,2,4] [--points 6000] [--steps 30] [--cores 2]

On this machine: an amazon670k-shaped model (670,091 labels, 135,909 features; `--points` training points) trains
`--steps` batches on a local Ray instance for each shard count (one thread per shard), after the same number of
warm-up steps. It prints samples/s, bytes sent per step between the driver and the shards, the driver's time per
step and the slowest shard's compute per step, next to the single-process Trainer.

The cost model of one step with P shards on `cores` cores:

    step(P) = (A + R / P) * max(1, P / cores) + 3 * rt(P) + bytes(P) / bandwidth

R is the output layer's rehash (timed here on the whole layer, in-process) spread over rehash_max_interval steps:
the only per-step work that shrinks with a shard's slice of the labels. A is the rest of one shard's compute at
P = 1 (the replicated hidden layers, and the shard's own active set, which is capped per shard and so does not
shrink either). rt(P) is a round of Ray calls to P actors (timed with empty calls); a step makes three rounds the
driver waits for (the backward stage overlaps the next forward). A and R come from P = 1; the other shard counts
check the model. The projection puts one shard per machine (N = P, no contention) with `--speedup` times this
machine's single-thread compute, R scaled to the catalog's labels, rt(1) per round and the measured bytes at
`--bandwidth-gbps`, and prints time per epoch for Amazon-670K and a catalog of `--catalog-labels` labels (one
training query per label and epoch), with the largest term.
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
        b = cfg.optimizer.batch_size

        def run(first: int, count: int) -> float:
            t = time.perf_counter()
            for s in range(first, first + count):
                trainer.train_step(order[s * b : (s + 1) * b])
            trainer.sync()
            return time.perf_counter() - t

        run(0, warmup)
        group = trainer.group
        group.get([a.ping.remote() for a in group.actors])
        t = time.perf_counter()
        for _ in range(50):
            group.get([a.ping.remote() for a in group.actors])
        rt_ms = (time.perf_counter() - t) / 50 * 1e3
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
            "round_trip_ms": rt_ms,
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
    b = cfg.optimizer.batch_size
    for s in range(warmup):
        trainer.train_step(order[s * b : (s + 1) * b])
    t = time.perf_counter()
    for s in range(warmup, warmup + steps):
        trainer.train_step(order[s * b : (s + 1) * b])
    seconds = time.perf_counter() - t
    return {"samples_per_s": steps * b / seconds, "step_ms": seconds / steps * 1e3}


def rehash_ms(cfg, train) -> float:
    """Milliseconds of one rehash of the whole output layer (hashing every row, rebuilding the tables)."""
    from engine.network import SlideModel

    model = SlideModel.initialize(cfg, train.num_features, train.num_labels)
    out = model.depth - 1
    model.rehash_layer(out, round_id=1)
    t = time.perf_counter()
    for r in range(3):
        model.rehash_layer(out, round_id=2 + r, serving_hubs=False)
    return (time.perf_counter() - t) / 3 * 1e3


def fit(rows: list[dict], rehash: float, interval: int) -> dict:
    """A and R (ms) from the one-shard run: R = rehash / interval, A = the shard's compute - R."""
    one = rows[0]
    assert one["shards"] == 1, "the first shard count must be 1"
    r = rehash / interval
    return {"A_ms": one["shard_compute_ms"] - r, "R_ms": r}


def predict(model: dict, row: dict, cores: int) -> float:
    p = row["shards"]
    compute = (model["A_ms"] + model["R_ms"] / p) * max(1.0, p / cores)
    return compute + 3 * row["round_trip_ms"]


def project(model: dict, labels_measured: int, rows: list[dict], args) -> list[dict]:
    """Time per epoch with one shard per machine (see the module docstring)."""
    out = []
    catalogs = [("Amazon-670K", 670_091, 490_449), (f"{args.catalog_labels:,} labels", args.catalog_labels, None)]
    rt, per_shard_bytes = rows[0]["round_trip_ms"], rows[0]["bytes_per_step"]
    for name, labels, points in catalogs:
        points = points or labels
        steps = -(-points // args.batch)
        for n in (1, 2, 4, 8, 16, 32, 64):
            terms = {
                "replicated + own active set": model["A_ms"] / args.speedup,
                "label slice (rehash)": model["R_ms"] * labels / labels_measured / n / args.speedup,
                "Ray calls": 3 * rt,
                "bytes": per_shard_bytes * n * 8 / (args.bandwidth_gbps * 1e9) * 1e3,
            }
            step = sum(terms.values())
            out.append(
                {
                    "catalog": name,
                    "machines": n,
                    "step_ms": step,
                    "epoch_h": steps * step / 3.6e6,
                    "terms": terms,
                    "dominant": max(terms, key=lambda k: terms[k]),
                    "shard_gb": shard_memory(labels, n, args) / 1e9,
                }
            )
    return out


def shard_memory(labels: int, shards: int, args) -> float:
    from engine import ModelConfig, OptimizerConfig, SlideConfig
    from engine.memory import estimate_memory

    cfg = SlideConfig(
        model=ModelConfig(sample_output=True), optimizer=OptimizerConfig(batch_size=args.batch), threads=16
    )
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
    from engine import ModelConfig, OptimizerConfig, ScheduleConfig, SlideConfig, generate, load_dataset, save_dataset
    from engine._numba import set_threads

    shard_counts = [int(s) for s in args.shards.split(",")]
    train, _ = generate("amazon670k", num_train=args.points, num_test=10, num_labels=args.labels)
    with tempfile.TemporaryDirectory() as tmp:
        train = load_dataset(save_dataset(train, Path(tmp) / "train"))  # the shards open it from its directory
        cfg = SlideConfig(
            model=ModelConfig(sample_output=True),
            optimizer=OptimizerConfig(batch_size=args.batch),
            schedule=ScheduleConfig(val_points="none"),
            threads=1,
        )
        set_threads(1)
        single = single_process(cfg, train, args.steps, args.warmup)
        rows = [measure(cfg, train, p, args.steps, args.warmup) for p in shard_counts]
        rehash = rehash_ms(cfg, train)
    model = fit(rows, rehash, cfg.sampling.rehash_max_interval)
    print(f"amazon670k shape: {args.labels:,} labels, {args.points:,} points, batch {args.batch}, one thread per shard")
    print(f"single-process Trainer: {single['samples_per_s']:.0f} samples/s ({single['step_ms']:.1f} ms/step)\n")
    print(
        "| shards | samples/s | bytes/step | step ms | slowest shard ms | Ray round ms | model ms | model / measured |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = predict(model, r, args.cores)
        print(
            f"| {r['shards']} | {r['samples_per_s']:.0f} | {r['bytes_per_step']:,.0f} | {r['step_ms']:.1f} | "
            f"{r['shard_compute_ms']:.1f} | {r['round_trip_ms']:.2f} | {m:.1f} | {m / r['step_ms']:.2f} |"
        )
    print(
        f"\nrehash of all {args.labels:,} rows: {rehash:.0f} ms, every {cfg.sampling.rehash_max_interval} steps: "
        f"R = {model['R_ms']:.1f} ms/step; A = {model['A_ms']:.1f} ms/step"
    )
    for r in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["shard_stage_ms"].items())
        print(f"  {r['shards']} shards, slowest shard per stage (ms/step): {stages}")
    proj = project(model, args.labels, rows, args)
    speed = f"{args.speedup:g}x this machine's thread, {args.bandwidth_gbps:g} Gb/s"
    print(f"\nprojection: one shard per machine at {speed}")
    print("| catalog | machines | step ms | hours per epoch | largest term | terms ms | shard memory GB |")
    print("|---|---|---|---|---|---|---|")
    for p in proj:
        terms = " / ".join(f"{v:.1f}" for v in p["terms"].values())
        print(
            f"| {p['catalog']} | {p['machines']} | {p['step_ms']:.1f} | {p['epoch_h']:.2f} | {p['dominant']} | "
            f"{terms} | {p['shard_gb']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"single": single, "rows": rows, "model": model, "projection": proj}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
