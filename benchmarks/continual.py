"""Continual learning: labels added online, fine-tuning with init_from, and the latency of adding labels.

    python benchmarks/continual.py                      # both parts (~30 minutes on 2 cores)
    python benchmarks/continual.py --skip-latency       # only the WordNet part
    python benchmarks/continual.py --skip-wordnet       # only the amazon670k-shaped latency
    python benchmarks/continual.py --skip-latency --set debtags --work bench-data/continual  # keep the models

WordNet part (the `wordnet` set of benchmarks/quality/datasets.py, `apt-get install -y wordnet-base`, or another
set with --set): hold out a share of the labels (among those with at least `--examples` training points), take
them off the training points and train (`old`); add them online with `--examples` example points each, taken from
training points that carried them (`engine.labels.edit_snapshot`, as the service does: `added`); train a model with
every label from the start (`full`, the same config and budget). Reported:

- recall@5 of the new labels on the test points that carry them: each (point, new label) pair counts once,
  `added` against `full` (target: >= 50%);
- P@1 on the other test points, `old` against `added` (target: a drop of at most 0.005), and P@5 (new labels
  that rank high where they do not belong push correct labels out of the top 5);
- fine-tuning: `added` trained on the full data for one epoch with init_from, against `full` (target: >= 0.98x its
  P@1 in <= 1/3 of its time).

Latency part: an amazon670k-shaped model (engine.synth, trained for a few seconds), 100 labels with 5 examples each
added through edit_snapshot, until the new version is loaded and has answered a query (target: <= 1 s): as the
service does it (the edit starts from the served model, is published as a delta version and applied to the served
model, engine.delta; every MAX_DEPTH + 1-th edit compacts the chain into a full version), then with every edit
written as a full version and read back from disk, for comparison. The
results go to benchmarks/results/continual.json and a table to stdout (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import Dataset, ScheduleConfig, SlideConfig, SnapshotStore, Trainer, load_model  # noqa: E402
from engine.labels import edit_snapshot, without_labels  # noqa: E402
from engine.metrics import precision_at_k  # noqa: E402
from engine.snapshot import read_manifest  # noqa: E402


def remap_labels(data: Dataset, mapping: np.ndarray, num_labels: int) -> Dataset:
    y = np.asarray(data.y_indices)
    return Dataset(
        np.asarray(data.x_indptr),
        np.asarray(data.x_indices),
        np.asarray(data.x_values),
        np.asarray(data.y_indptr),
        mapping[y].astype(np.int32),
        data.num_features,
        num_labels,
    )


def with_num_labels(data: Dataset, num_labels: int) -> Dataset:
    return Dataset(
        data.x_indptr, data.x_indices, data.x_values, data.y_indptr, data.y_indices, data.num_features, num_labels
    )


def points_of(data: Dataset, label: int, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first n points of data that carry label, as (indices, values) pairs."""
    y_indptr, y = np.asarray(data.y_indptr), np.asarray(data.y_indices)
    rows = np.repeat(np.arange(data.num_points), np.diff(y_indptr))[y == label][:n]
    xp = np.asarray(data.x_indptr)
    return [(np.asarray(data.x_indices[xp[r] : xp[r + 1]]), np.asarray(data.x_values[xp[r] : xp[r + 1]])) for r in rows]


def train(config: SlideConfig, data: Dataset, store_dir: Path, **kwargs) -> tuple[Trainer, float]:
    t0 = time.perf_counter()
    trainer = Trainer(config, data, None, SnapshotStore(store_dir), **kwargs)
    trainer.run(snapshot_every_s=1e9)
    seconds = time.perf_counter() - t0
    print(f"  trained {store_dir.name}: {seconds:.0f}s, {trainer.epoch} epochs", file=sys.stderr, flush=True)
    return trainer, seconds


def new_label_recall(pred: np.ndarray, test: Dataset, new: np.ndarray) -> tuple[float, int]:
    """Share of (test point, new label) pairs whose label is in the point's top 5; the number of pairs."""
    y_indptr, y = np.asarray(test.y_indptr), np.asarray(test.y_indices)
    rows = np.repeat(np.arange(test.num_points), np.diff(y_indptr))
    is_new = np.isin(y, new)
    hits = [(pred[r] == j).any() for r, j in zip(rows[is_new], y[is_new], strict=True)]
    return float(np.mean(hits)) if hits else float("nan"), len(hits)


def wordnet_part(args) -> dict:
    from benchmarks.quality.datasets import load

    train_set, test_set = load(args.set, args.data_root) if args.data_root else load(args.set)
    rng = np.random.default_rng(args.seed)
    counts = np.bincount(np.asarray(train_set.y_indices), minlength=train_set.num_labels)
    eligible = np.flatnonzero(counts >= args.examples)
    n_new = int(round(args.holdout * train_set.num_labels))
    held = np.sort(rng.choice(eligible, size=n_new, replace=False))
    is_held = np.zeros(train_set.num_labels, bool)
    is_held[held] = True
    # old labels keep their order in ids 0..n_old-1, the held-out ones come after (the ids adding gives them)
    mapping = np.empty(train_set.num_labels, np.int64)
    mapping[~is_held] = np.arange(int((~is_held).sum()))
    mapping[held] = np.arange(int((~is_held).sum()), train_set.num_labels)
    n_old = train_set.num_labels - n_new
    full_train = remap_labels(train_set, mapping, train_set.num_labels)
    test = remap_labels(test_set, mapping, train_set.num_labels)
    new_ids = np.arange(n_old, train_set.num_labels)
    drop = np.zeros(train_set.num_labels, bool)
    drop[new_ids] = True
    old_train = with_num_labels(without_labels(full_train, drop), n_old)
    print(f"{args.set}: {n_new} of {train_set.num_labels} labels held out", file=sys.stderr, flush=True)

    overrides = json.loads(args.slide_config) if args.slide_config else {}
    config = SlideConfig.from_dict({**overrides, "threads": args.threads, "seed": args.seed})
    if args.epochs is not None:
        config = config.replace(schedule=config.schedule.replace(epochs=args.epochs))
    work = Path(args.work) / args.set if args.work else Path(tempfile.mkdtemp(prefix="continual-"))
    work.mkdir(parents=True, exist_ok=True)
    trained_file = work / "trained.json"
    trained = json.loads(trained_file.read_text()) if trained_file.exists() else {}
    for name, data in (("old", old_train), ("full", full_train)):
        # a model trained by an earlier run of the same set, seed and config is read back, not trained again
        kept = trained.get(name, {}).get("config")
        if kept is not None and SlideConfig.from_dict(kept) == config and SnapshotStore(work / name).latest():
            continue
        shutil.rmtree(work / name, ignore_errors=True)
        _, seconds = train(config, data, work / name)
        version = SnapshotStore(work / name).latest()[0]
        trained[name] = {"seconds": seconds, "version": version, "config": config.to_dict()}
        trained_file.write_text(json.dumps(trained, indent=1))
    print(f"  models in {work}", file=sys.stderr, flush=True)
    store = SnapshotStore(work / "old")
    for v in store.versions():  # the versions an earlier run added labels in
        if v > trained["old"]["version"]:
            shutil.rmtree(store.path(v))
    shutil.rmtree(work / "finetune", ignore_errors=True)
    old_s, full_s = trained["old"]["seconds"], trained["full"]["seconds"]
    full_model = load_model(SnapshotStore(work / "full").latest()[1])

    store = SnapshotStore(work / "old")
    old_model = load_model(store.latest()[1])
    add = [(f"held-{j}", points_of(full_train, int(j), args.examples)) for j in new_ids]
    t0 = time.perf_counter()
    edit = edit_snapshot(store, add=add)
    add_s = time.perf_counter() - t0
    assert edit.added.tolist() == new_ids.tolist()
    added = load_model(store.latest()[1])
    full = full_model

    x = (test.x_indptr, test.x_indices, test.x_values)
    carries_new = np.zeros(test.num_points, bool)
    rows = np.repeat(np.arange(test.num_points), np.diff(np.asarray(test.y_indptr)))
    carries_new[rows[np.isin(np.asarray(test.y_indices), new_ids)]] = True
    result: dict = {
        "held_out": n_new,
        "labels": train_set.num_labels,
        "examples": args.examples,
        "epochs": config.schedule.epochs,
    }
    for mode in args.modes.split(","):
        pred_added = added.predict(*x, k=5, mode=mode)[0]
        pred_full = full.predict(*x, k=5, mode=mode)[0]
        pred_old = old_model.predict(*x, k=5, mode=mode)[0]
        r_added, pairs = new_label_recall(pred_added, test, new_ids)
        r_full, _ = new_label_recall(pred_full, test, new_ids)
        other = ~carries_new
        p1_old = precision_at_k(pred_old[other], *_y(test, other), 1)
        p1_added = precision_at_k(pred_added[other], *_y(test, other), 1)
        p5_old = precision_at_k(pred_old[other], *_y(test, other), 5)
        p5_added = precision_at_k(pred_added[other], *_y(test, other), 5)
        result[mode] = {
            "new_label_pairs": pairs,
            "recall5_added": r_added,
            "recall5_full": r_full,
            "recall_ratio": r_added / r_full if r_full else None,
            "old_p1_before": p1_old,
            "old_p1_after": p1_added,
            "old_p1_drop": p1_old - p1_added,
            "old_p5_before": p5_old,
            "old_p5_after": p5_added,
            "old_p5_drop": p5_old - p5_added,
            "p1_full_all": precision_at_k(pred_full, test.y_indptr, test.y_indices, 1),
        }
    result["add_seconds"] = add_s
    result["train_old_s"], result["train_full_s"] = old_s, full_s

    if args.skip_finetune:
        return result
    ft_trainer, ft_s = train(
        config.replace(schedule=config.schedule.replace(epochs=1)), full_train, work / "finetune", init_from=store
    )
    # the steps beside the seconds: the two runs may meet different loads on a shared machine
    full_steps = int(read_manifest(SnapshotStore(work / "full").latest()[1])["trainer_state"]["step"])
    for mode in args.modes.split(","):
        p_ft = precision_at_k(ft_trainer.model.predict(*x, k=1, mode=mode)[0], test.y_indptr, test.y_indices, 1)
        p_full = result[mode]["p1_full_all"]
        result[mode].update(finetune_p1=p_ft, finetune_p1_ratio=p_ft / p_full if p_full else None)
    result.update(
        finetune_s=ft_s,
        finetune_time_ratio=ft_s / full_s,
        finetune_steps=int(ft_trainer.step),
        train_full_steps=full_steps,
        finetune_steps_ratio=ft_trainer.step / full_steps,
    )
    return result


def _y(test: Dataset, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(rows)
    y_indptr = np.asarray(test.y_indptr)
    starts, stops = y_indptr[idx], y_indptr[idx + 1]
    indptr = np.concatenate(([0], np.cumsum(stops - starts)))
    take = np.concatenate([np.arange(s, e) for s, e in zip(starts, stops, strict=True)])
    return indptr, np.asarray(test.y_indices)[take]


def _latency_round(store: SnapshotStore, test_set: Dataset, r: int, n: int, served, query, delta: bool) -> tuple:
    """Add n labels (5 examples each) to the store's newest version and serve it: as the service does (`delta`:
    the edit starts from the served model and its version is applied to it), or as a full version read back."""
    from engine.snapshot import read_manifest

    xp = np.asarray(test_set.x_indptr)
    add = []
    for i in range(n):
        first = (r * n + i) * 5 % (test_set.num_points - 5)
        rows = range(first, first + 5)
        points = [(test_set.x_indices[xp[p] : xp[p + 1]], test_set.x_values[xp[p] : xp[p + 1]]) for p in rows]
        add.append((f"new-{r}-{i}", points))
    t0, c0 = time.perf_counter(), time.process_time()
    edit = edit_snapshot(store, add=add, model=served if delta else None)
    t_published = time.perf_counter()
    model = load_model(store.path(edit.version), base=served if delta else None)
    model.predict(*query, k=5)
    t_served, c_served = time.perf_counter(), time.process_time()
    assert model.num_labels == served.num_labels + n and model.label_names[model.num_labels - 1] == add[-1][0]
    kind = "delta" if "delta" in read_manifest(store.path(edit.version)) else "full"
    # process CPU time (every thread): what a machine shared with other work inflates least
    return model, {"kind": kind, "publish_s": t_published - t0, "served_s": t_served - t0, "cpu_s": c_served - c0}


def latency_part(args) -> dict:
    from engine import delta, generate

    train_set, test_set = generate("amazon670k", seed=args.seed, num_train=args.latency_points, num_test=2000)
    work = Path(tempfile.mkdtemp(prefix="continual-670k-"))
    store = SnapshotStore(work / "m", keep=2)
    if args.latency_model:
        shutil.copytree(args.latency_model, store.root)
    else:
        config = SlideConfig(schedule=ScheduleConfig(val_points="none"), threads=args.threads, seed=args.seed)
        trainer = Trainer(config, train_set, None, store)
        trainer.run(time_budget_s=args.latency_train_s, snapshot_every_s=1e9)
        del trainer
    served = load_model(store.latest()[1])
    labels_before = int(served.num_labels)
    xp = np.asarray(test_set.x_indptr)
    query = (np.array([0, xp[1]]), np.asarray(test_set.x_indices[: xp[1]]), np.asarray(test_set.x_values[: xp[1]]))
    served.predict(*query, k=5)
    rounds, full_rounds = [], []
    load_before = os.getloadavg()
    for r in range(args.latency_rounds):  # as the service does: deltas, a full version every MAX_DEPTH + 1 edits
        served, result = _latency_round(store, test_set, r, args.latency_labels, served, query, delta=True)
        rounds.append(result)
        print(f"  round {r}: {result}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()  # a restart: the newest version read from disk, its chain applied
    load_model(store.latest()[1]).predict(*query, k=5)
    restart_s = time.perf_counter() - t0
    max_depth, delta.MAX_DEPTH = delta.MAX_DEPTH, 0  # every edit a full version, read back whole (as before deltas)
    try:
        for r in range(args.latency_rounds, args.latency_rounds + args.latency_full_rounds + 1):
            served, result = _latency_round(store, test_set, r, args.latency_labels, served, query, delta=False)
            if r > args.latency_rounds:  # the first one reads the chain the delta rounds left
                full_rounds.append(result)
                print(f"  full round {r}: {result}", file=sys.stderr, flush=True)
    finally:
        delta.MAX_DEPTH = max_depth
    shutil.rmtree(work, ignore_errors=True)
    deltas = [x for x in rounds if x["kind"] == "delta"]
    compactions = [x for x in rounds if x["kind"] == "full"]
    return {
        "labels_before": labels_before,
        "added": args.latency_labels,
        "rounds": rounds,
        "load_average": [load_before, os.getloadavg()],
        "median_served_s": float(np.median([x["served_s"] for x in deltas])),
        "median_cpu_s": float(np.median([x["cpu_s"] for x in deltas])),
        "median_full_cpu_s": float(np.median([x["cpu_s"] for x in full_rounds])) if full_rounds else None,
        "median_publish_s": float(np.median([x["publish_s"] for x in deltas])),
        "compaction_served_s": [x["served_s"] for x in compactions],
        "restart_load_s": restart_s,
        "full_rounds": full_rounds,
        "median_full_served_s": float(np.median([x["served_s"] for x in full_rounds])) if full_rounds else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="wordnet", help="a set of benchmarks/quality/datasets.py")
    ap.add_argument("--holdout", type=float, default=0.05)
    ap.add_argument("--examples", type=int, default=5)
    ap.add_argument(
        "--epochs", type=int, default=None, help="the training budget (default: the config's; early stopping applies)"
    )
    ap.add_argument("--threads", type=int, default=None, help="Numba threads (default: all cores)")
    ap.add_argument(
        "--slide-config", help='SlideConfig overrides of both models, as JSON: \'{"model": {"loss": "sigmoid"}}\''
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None, help="where the quality sets are cached (default bench-data/quality)")
    ap.add_argument("--latency-points", type=int, default=20000)
    ap.add_argument("--latency-train-s", type=float, default=20.0)
    ap.add_argument("--latency-labels", type=int, default=100)
    ap.add_argument("--latency-rounds", type=int, default=10, help="edits as the service makes them (deltas)")
    ap.add_argument("--latency-full-rounds", type=int, default=3, help="then edits written as full versions")
    ap.add_argument("--latency-model", help="a snapshot store of an amazon670k-shaped model to start from (copied)")
    ap.add_argument(
        "--work",
        help="where the trained models are kept (per set): a later run with the same set, seed and config reads them "
        "back and only adds labels and fine-tunes again (default: a new temporary directory)",
    )
    ap.add_argument("--modes", default="auto,exact", help="the predict modes the WordNet part scores")
    ap.add_argument("--skip-wordnet", action="store_true")
    ap.add_argument("--skip-finetune", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "continual.json"))
    args = ap.parse_args(argv)
    results: dict = {}
    if not args.skip_latency:
        results["latency"] = latency_part(args)
    if not args.skip_wordnet:
        results[args.set] = wordnet_part(args)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, **results}, indent=1))
    print_table(results, args.set)
    return 0


def print_table(results: dict, name: str = "wordnet") -> None:
    if name in results and "finetune_s" in results[name]:
        w = results[name]
        modes = [m for m in ("auto", "exact") if m in w]
        print(f"| measure ({name}, {w['held_out']} of {w['labels']} labels held out) | {' | '.join(modes)} | target |")
        print("|---|" + "---|" * len(modes) + "---|")

        def row(what: str, cell, target: str) -> None:
            print(f"| {what} | " + " | ".join(cell(w[m]) for m in modes) + f" | {target} |")

        row(
            "recall@5 of new labels: added online / trained with",
            lambda r: f"{r['recall5_added']:.3f} / {r['recall5_full']:.3f} = {r['recall_ratio']:.2f}",
            ">= 0.50",
        )
        row(
            "P@1 on the other test points: before / after adding",
            lambda r: f"{r['old_p1_before']:.4f} / {r['old_p1_after']:.4f}",
            "drop <= 0.005",
        )
        row(
            "P@5 on the other test points: before / after adding",
            lambda r: f"{r['old_p5_before']:.4f} / {r['old_p5_after']:.4f}",
            "",
        )
        row(
            "fine-tune 1 epoch (init_from) / scratch P@1",
            lambda r: f"{r['finetune_p1']:.3f} / {r['p1_full_all']:.3f} = {r['finetune_p1_ratio']:.3f}",
            ">= 0.98",
        )
        print(
            f"| fine-tune / scratch time | {w['finetune_s']:.0f} s / {w['train_full_s']:.0f} s = "
            f"{w['finetune_time_ratio']:.2f} (steps {w['finetune_steps']} / {w['train_full_steps']} = "
            f"{w['finetune_steps_ratio']:.2f})" + " |" * len(modes) + " <= 0.33 |"
        )
        print(f"| adding {w['held_out']} labels (edit_snapshot) | {w['add_seconds']:.2f} s" + " |" * len(modes) + " |")
    if "latency" in results:
        lat = results["latency"]
        deltas = [x for x in lat["rounds"] if x["kind"] == "delta"]
        print(
            f"| adding {lat['added']} labels to a {lat['labels_before']:,}-label model, to the new version served: "
            f"delta versions (median of {len(deltas)}) | {lat['median_served_s']:.2f} s "
            f"(published in {lat['median_publish_s']:.2f} s; CPU {lat['median_cpu_s']:.2f} s) | | <= 1 s |"
        )
        if lat.get("median_full_served_s") is not None:
            print(
                f"| the same written as full versions and read back (median of {len(lat['full_rounds'])}) | "
                f"{lat['median_full_served_s']:.2f} s (CPU {lat['median_full_cpu_s']:.2f} s) | | |"
            )
        for c in lat["compaction_served_s"]:
            print(f"| an edit that compacts the chain into a full version | {c:.2f} s | | |")
        print(f"| restart: the newest version read from disk, its chain applied | {lat['restart_load_s']:.2f} s | | |")


if __name__ == "__main__":
    raise SystemExit(main())
