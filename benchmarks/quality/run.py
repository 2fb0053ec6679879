"""`make bench-quality`: our engine against napkinXC, Omikuji, PECOS and a PyTorch dense net, all with defaults.

Every system trains on the same training split of each set (`benchmarks.quality.datasets`) with the
same threads, in a process of its own (so its peak RSS is its own), and predicts the top 5 labels of
every test point; the metrics (P@1/3/5, PSP@5 with propensities from the training labels) are computed
here from those predictions with `engine.metrics`, the same code for every system. Training seconds are
wall time from the data in memory to a trained model (ours: building the network and its tables and
training, without the reporting evaluations described below); prediction seconds are reported apart.

    python benchmarks/quality/run.py                                  # all default sets, all systems
    python benchmarks/quality/run.py --sets debtags --systems slide,pecos
    python benchmarks/quality/run.py --sets wordnet --large           # --large allows the Amazon-shaped sets

Systems: `slide` (ours: `SlideConfig()` defaults through `Trainer`, served by `SlideModel.predict`'s
default mode; also scored in exact mode), `omikuji` (its default hyper-parameters), `napkinxc` (PLT with
its defaults, seed 0), `pecos` (XR-Linear: PIFA label embedding, hierarchical k-means indexer,
`XLinearModel` defaults), `torch` (`benchmarks/torch_dense.py`: the same 128-wide network, dense, as
many epochs as our default, capped by `--torch-budget` seconds).

For ours the script also records a learning curve: after every evaluation the trainer reports (each
epoch by default), the current model's P@1 on the whole test set, against training seconds, and the P@1
of the model a run stopped there would serve (the best by the trainer's validation P@1 so far, when it
has a validation split). This is for reporting only (nothing is chosen with the test set): it gives our
served P@1 at the training time of the best library (napkinXC, Omikuji or PECOS) and the training time
ours needed to reach that library's P@1.

Tuning our defaults: run only `slide`, with SlideConfig overrides as JSON; the peers' figures come
from the recorded results (`--baseline`, default benchmarks/results/quality.json), so the table still
compares, and the run is written to benchmarks/results/quality-tuning.json unless `--out` is given:

    python benchmarks/quality/run.py --sets debtags,sparselinear --systems slide \\
        --slide-config '{"model": {"hidden": [256]}, "optimizer": {"lr": 0.001}}' --epochs 10

Results of (set, system) pairs not run keep their recorded values in the output file (marked with
when they were measured), so one system or set can be re-run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from machine import cpu_name  # noqa: E402

from benchmarks.quality import datasets  # noqa: E402

SYSTEMS = ["slide", "omikuji", "napkinxc", "pecos", "torch"]
LIBRARIES = ["omikuji", "napkinxc", "pecos"]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality.json"
TUNING_OUT = ROOT / "benchmarks" / "results" / "quality-tuning.json"
K = 5


# ------------------------------------------------------------------------------------------------
# workers: each trains one system on one set and writes its top-5 test predictions


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _scipy(ds, labels: bool = False):
    import scipy.sparse as sp

    if labels:
        data = np.ones(len(ds.y_indices), dtype=np.float32)
        return sp.csr_matrix((data, ds.y_indices, ds.y_indptr), shape=(ds.num_points, ds.num_labels))
    return sp.csr_matrix((ds.x_values, ds.x_indices, ds.x_indptr), shape=(ds.num_points, ds.num_features))


def _pad(rows: list, k: int = K) -> np.ndarray:
    out = np.full((len(rows), k), -1, dtype=np.int32)
    for i, r in enumerate(rows):
        r = list(r)[:k]
        out[i, : len(r)] = r
    return out


def slide_config(threads: int, overrides: dict):
    from engine import SlideConfig

    return SlideConfig.from_dict({"threads": threads, **overrides})


def served_curve(curve: list[dict]) -> None:
    """Add `served_p_at_1` to each curve point: the test P@1 of the state a run stopped there would serve.

    With a validation split (`val_p_at_1` in the trainer's metrics) that is the state with the best
    validation P@1 so far (the first of equals), as the trainer keeps it; without one, the current state.
    """
    best = None
    for c in curve:
        v = c.get("val_p_at_1")
        if v is None:
            c["served_p_at_1"] = c["p_at_1"]
            continue
        if best is None or v > best["val_p_at_1"]:
            best = c
        c["served_p_at_1"] = best["p_at_1"]


def worker_slide(args, data: Path) -> tuple[np.ndarray, dict, dict]:
    from engine import Trainer, TrainingMetrics, load_dataset
    from engine.metrics import precision_at_k

    train, test = load_dataset(data / "train"), load_dataset(data / "test")
    overrides = json.loads(args.slide_config) if args.slide_config else {}
    if args.epochs:
        overrides["schedule"] = {**overrides.get("schedule", {}), "epochs": args.epochs}
    config = slide_config(args.threads, overrides)
    curve: list[dict] = []
    spent = {"reporting": 0.0}
    t0 = time.perf_counter()

    def on_metrics(record: TrainingMetrics) -> None:
        metrics = record.to_dict()
        t = time.perf_counter()
        trainer.refresh_serving_hubs()
        pred, _ = trainer.model.predict(test.x_indptr, test.x_indices, test.x_values, k=K)
        curve.append(
            {
                "epoch": metrics.get("epoch"),
                "samples": metrics.get("samples"),
                "train_s": t - t0 - spent["reporting"],
                "loss": metrics.get("loss"),
                "p_at_1": precision_at_k(pred, test.y_indptr, test.y_indices, 1),
                "p_at_5": precision_at_k(pred, test.y_indptr, test.y_indices, 5),
                "val_p_at_1": metrics.get("val_p_at_1"),
            }
        )
        print(json.dumps({"system": "slide", **curve[-1]}), file=sys.stderr, flush=True)
        spent["reporting"] += time.perf_counter() - t

    trainer = Trainer(config, train)
    final = trainer.run(on_metrics=on_metrics)
    train_s = time.perf_counter() - t0 - spent["reporting"]
    served_curve(curve)
    model = trainer.model
    t = time.perf_counter()
    pred, _ = model.predict(test.x_indptr, test.x_indices, test.x_values, k=K)
    predict_s = time.perf_counter() - t
    exact, _ = model.predict(test.x_indptr, test.x_indices, test.x_values, k=K, mode="exact")
    info = {
        "train_s": train_s,
        "predict_s": predict_s,
        "config": config.to_dict(),
        "overrides": overrides,
        "epochs_run": final.get("epoch"),
        "curve": curve,
        "history": [m.to_dict() for m in trainer.history],
        "predict_mode": "default",
    }
    return pred, info, {"exact": exact}


def worker_omikuji(args, data: Path) -> tuple[np.ndarray, dict, dict]:
    import omikuji

    from engine import load_dataset

    test = load_dataset(data / "test")
    hp = omikuji.Model.default_hyper_param()
    t0 = time.perf_counter()
    model = omikuji.Model.train_on_data(str(data / "train.txt"), hp, n_threads=args.threads)
    train_s = time.perf_counter() - t0
    t = time.perf_counter()
    rows = []
    for i in range(test.num_points):
        s, e = int(test.x_indptr[i]), int(test.x_indptr[i + 1])
        pairs = list(zip(test.x_indices[s:e].tolist(), test.x_values[s:e].tolist(), strict=True))
        rows.append([label for label, _ in model.predict(pairs, top_k=K)])
    info = {"train_s": train_s, "predict_s": time.perf_counter() - t, "hyper_param": _public_attrs(hp)}
    return _pad(rows), info, {}


def _public_attrs(obj) -> dict:
    out = {}
    for name in dir(obj):
        if name.startswith("_"):
            continue
        value = getattr(obj, name)
        if isinstance(value, int | float | str | bool):
            out[name] = value
        elif value is not None and not callable(value):
            out[name] = _public_attrs(value)
    return out


def worker_napkinxc(args, data: Path) -> tuple[np.ndarray, dict, dict]:
    from napkinxc.models import PLT

    from engine import load_dataset

    train, test = load_dataset(data / "train", mmap=False), load_dataset(data / "test", mmap=False)
    with tempfile.TemporaryDirectory(prefix="napkinxc-") as tmp:
        t0 = time.perf_counter()
        x = _scipy(train)
        y = [train.y_indices[train.y_indptr[i] : train.y_indptr[i + 1]].tolist() for i in range(train.num_points)]
        model = PLT(tmp, threads=args.threads, seed=0)
        model.fit(x, y)
        train_s = time.perf_counter() - t0
        t = time.perf_counter()
        rows = model.predict(_scipy(test), top_k=K)
        predict_s = time.perf_counter() - t
    return _pad(rows), {"train_s": train_s, "predict_s": predict_s}, {}


def worker_pecos(args, data: Path) -> tuple[np.ndarray, dict, dict]:
    from pecos.xmc import Indexer, LabelEmbeddingFactory
    from pecos.xmc.xlinear.model import XLinearModel

    from engine import load_dataset

    train, test = load_dataset(data / "train", mmap=False), load_dataset(data / "test", mmap=False)
    t0 = time.perf_counter()
    x, y = _scipy(train), _scipy(train, labels=True)
    label_feat = LabelEmbeddingFactory.create(y, x, method="pifa")
    chain = Indexer.gen(label_feat, threads=args.threads)
    model = XLinearModel.train(x, y, C=chain, threads=args.threads)
    train_s = time.perf_counter() - t0
    t = time.perf_counter()
    scores = model.predict(_scipy(test), only_topk=K, threads=args.threads).tocsr()
    predict_s = time.perf_counter() - t
    rows = []
    for i in range(scores.shape[0]):
        s, e = scores.indptr[i], scores.indptr[i + 1]
        order = np.argsort(-scores.data[s:e], kind="stable")
        rows.append(scores.indices[s:e][order])
    return _pad(rows), {"train_s": train_s, "predict_s": predict_s}, {}


def worker_torch(args, data: Path) -> tuple[np.ndarray, dict, dict]:
    from torch_dense import predict_topk, train_torch_dense

    from engine import SlideConfig, load_dataset
    from engine.trainer import epoch_order

    train, test = load_dataset(data / "train", mmap=False), load_dataset(data / "test", mmap=False)
    defaults = SlideConfig()
    epochs = args.epochs or defaults.schedule.epochs
    t0 = time.perf_counter()
    res = train_torch_dense(
        train,
        None,
        hidden=128,
        batch_size=defaults.optimizer.batch_size,
        lr=defaults.optimizer.lr,
        epochs=epochs,
        time_budget_s=args.torch_budget,
        threads=args.threads,
        seed=0,
        epoch_order=lambda e: epoch_order(0, e, train.num_points),
        return_model=True,
    )
    train_s = time.perf_counter() - t0
    t = time.perf_counter()
    pred, _ = predict_topk(res["model"], test, K)
    info = {
        "train_s": train_s,
        "predict_s": time.perf_counter() - t,
        "epochs": epochs,
        "samples": res["samples"],
        "epochs_run": res["samples"] / train.num_points,
        "stopped_by_budget": res["stopped_by_budget"],
        "lr": defaults.optimizer.lr,
    }
    return pred.astype(np.int32), info, {}


WORKERS = {
    "slide": worker_slide,
    "omikuji": worker_omikuji,
    "napkinxc": worker_napkinxc,
    "pecos": worker_pecos,
    "torch": worker_torch,
}


def run_worker_main(args) -> int:
    data, out = Path(args.data), Path(args.pred_out)
    pred, info, extra = WORKERS[args.worker](args, data)
    info["peak_rss_bytes"] = peak_rss_bytes()
    np.save(out, np.ascontiguousarray(pred, dtype=np.int32))
    for name, arr in extra.items():
        np.save(out.with_name(f"{out.stem}-{name}.npy"), np.ascontiguousarray(arr, dtype=np.int32))
    print(json.dumps(info, default=str))
    return 0


def compile_engine_kernels(args) -> None:
    """Fill Numba's cache in a process of its own, so that our measured worker loads compiled kernels:
    compiling is a one-off cost per machine, not training (the libraries ship compiled code)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from run import compile_kernels

    overrides = json.loads(args.slide_config) if args.slide_config else {}
    compile_kernels(slide_config(args.threads, overrides))


# ------------------------------------------------------------------------------------------------
# the driver


def launch(system: str, name: str, args, tmp: Path) -> tuple[dict, dict[str, np.ndarray]]:
    data = datasets.build(name, args.root)
    pred_out = tmp / f"{name}-{system}.npy"
    cmd = [sys.executable, __file__, "--worker", system, "--data", str(data), "--pred-out", str(pred_out)]
    cmd += ["--threads", str(args.threads), "--torch-budget", str(args.torch_budget)]
    if args.epochs:
        cmd += ["--epochs", str(args.epochs)]
    if args.slide_config:
        cmd += ["--slide-config", args.slide_config]
    n = str(args.threads)
    env = dict(
        os.environ,
        NUMBA_NUM_THREADS=n,
        OMP_NUM_THREADS=n,
        MKL_NUM_THREADS=n,
        OPENBLAS_NUM_THREADS=n,
        RAYON_NUM_THREADS=n,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    log = Path(args.root) / "logs" / f"{name}-{system}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as err:  # the libraries draw progress bars on stderr
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"killed after {args.timeout:.0f} s (log: {log})"}, {}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"worker exited with {proc.returncode} (log: {log})", "wall_s": wall}, {}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info["wall_s"] = wall
    preds = {"served": np.load(pred_out)}
    for extra in tmp.glob(f"{name}-{system}-*.npy"):
        preds[extra.stem.rsplit("-", 1)[1]] = np.load(extra)
    return info, preds


def score(pred: np.ndarray, test, inv_p: np.ndarray) -> dict:
    from engine import evaluate

    m = evaluate(pred, test, ks=(1, 3, 5), inv_propensity=inv_p)
    return {key: m[key] for key in ("p_at_1", "p_at_3", "p_at_5", "psp_at_5")}


def slide_vs_best(results: dict) -> dict | None:
    """Ours at the best library's training time, and the time ours needed to reach its P@1."""
    ours = results.get("slide", {})
    libs = {s: r for s, r in results.items() if s in LIBRARIES and "p_at_1" in r}
    if "curve" not in ours or not libs:
        return None
    best = max(libs, key=lambda s: libs[s]["p_at_1"])
    target, t_best = libs[best]["p_at_1"], libs[best]["train_s"]
    served = [(c["train_s"], c.get("served_p_at_1", c["p_at_1"])) for c in ours["curve"]]
    before = [p for t, p in served if t <= t_best]
    reached = [t for t, p in served if p >= target]
    return {
        "best_library": best,
        "best_p_at_1": target,
        "best_train_s": t_best,
        "slide_p_at_1_at_best_time": before[-1] if before else None,
        "slide_s_to_best_p_at_1": reached[0] if reached else None,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("numpy", "numba", "scikit-learn", "omikuji", "napkinxc", "libpecos", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def fmt(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict, sets: list[str]) -> str:
    lines = [
        "| set | system | P@1 | P@3 | P@5 | PSP@5 | train s | peak RSS GB | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in sets:
        res = report["results"].get(name, {})
        for system in SYSTEMS:
            r = res.get(system)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {name} | {system} | {r['error']} ||||||")
                continue
            note = []
            if system == "slide":
                if "exact" in r:
                    note.append(f"exact P@1 {r['exact']['p_at_1']:.3f}")
                if r.get("epochs_run") is not None:
                    note.append(f"{r['epochs_run']} epochs")
                if r.get("overrides"):
                    note.append(f"config {json.dumps(r['overrides'])}")
            if system == "torch" and r.get("epochs_run") is not None:
                note.append(f"{r['epochs_run']:.1f} epochs")
            if r.get("from_baseline"):
                note.append("recorded")
            lines.append(
                f"| {name} | {system} | {fmt(r['p_at_1'])} | {fmt(r['p_at_3'])} | {fmt(r['p_at_5'])} | "
                f"{fmt(r['psp_at_5'])} | {fmt(r['train_s'], '.1f')} | {r['peak_rss_bytes'] / 1e9:.2f} | "
                f"{', '.join(note)} |"
            )
    vs = []
    for name in sets:
        c = report.get("slide_vs_best", {}).get(name)
        if c:
            vs.append(
                f"- {name}: best library {c['best_library']} P@1 {c['best_p_at_1']:.3f} in {c['best_train_s']:.1f} s; "
                f"ours at that time {fmt(c['slide_p_at_1_at_best_time'])}, "
                f"reached it after {fmt(c['slide_s_to_best_p_at_1'], '.1f')} s"
                + ("" if c["slide_s_to_best_p_at_1"] is not None else " (not reached)")
            )
    return "\n".join(lines + ([""] + vs if vs else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(datasets.NAMES), help="comma-separated (default: %(default)s)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--slide-config", default="", help="JSON of SlideConfig overrides for ours")
    ap.add_argument("--epochs", type=int, default=0, help="epochs for ours and torch (default: our default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--torch-budget", type=float, default=300.0, help="cap on torch's training seconds per set")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before a worker is killed")
    ap.add_argument("--large", action="store_true", help="allow the Amazon-670K-shaped sets in --sets")
    ap.add_argument("--root", default=str(datasets.DEFAULT_ROOT), help="data set cache")
    ap.add_argument(
        "--out",
        default="",
        help=f"results JSON (default {DEFAULT_OUT.relative_to(ROOT)}, "
        f"or {TUNING_OUT.relative_to(ROOT)} with --slide-config)",
    )
    ap.add_argument("--baseline", default=str(DEFAULT_OUT), help="recorded results shown for systems not run")
    ap.add_argument("--show", action="store_true", help="only print the tables of the recorded results (--out)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--pred-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker == "compile":
        compile_engine_kernels(args)
        print("{}")
        return 0
    if args.worker:
        return run_worker_main(args)

    sets = [s for s in args.sets.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in sets if s not in datasets.ALL_NAMES] + [s for s in systems if s not in SYSTEMS]
    if unknown:
        ap.error(f"unknown set or system {unknown[0]!r}; sets: {datasets.ALL_NAMES}; systems: {SYSTEMS}")
    large = [s for s in sets if s in datasets.LARGE_NAMES]
    if large and not args.large:
        ap.error(f"{large[0]} is a large set: add --large")
    if args.slide_config:
        try:
            json.loads(args.slide_config)
        except json.JSONDecodeError as e:
            ap.error(f"--slide-config is not JSON: {e}")
    out = Path(args.out) if args.out else (TUNING_OUT if args.slide_config else DEFAULT_OUT)

    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.show:
        shown = [s for s in sets if s in previous.get("results", {})]
        print(datasets.markdown_table([previous["sets"][s] for s in shown]))
        print()
        print(markdown(previous, shown))
        return 0
    same_setup = previous.get("threads") == args.threads
    results: dict = previous.get("results", {}) if same_setup else {}
    shapes: dict = previous.get("sets", {}) if same_setup else {}
    for name in sets:
        try:
            datasets.build(name, args.root)
        except datasets.DataSourceMissing as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 2
        shapes[name] = datasets.describe(name, args.root)

    from engine import load_dataset, propensity_scores

    if "slide" in systems:
        subprocess.run(
            [sys.executable, __file__, "--worker", "compile", "--threads", str(args.threads)]
            + (["--slide-config", args.slide_config] if args.slide_config else []),
            check=True,
            stdout=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])),
        )
    commit = _git_commit()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for name in sets:
            d = datasets.build(name, args.root)
            train, test = load_dataset(d / "train"), load_dataset(d / "test")
            inv_p = propensity_scores(train.label_counts(), train.num_points)
            for system in systems:
                print(f"{name} / {system} ...", file=sys.stderr, flush=True)
                info, preds = launch(system, name, args, Path(tmp))
                if "served" in preds:
                    info.update(score(preds["served"], test, inv_p))
                    for extra, pred in preds.items():
                        if extra != "served":
                            info[extra] = score(pred, test, inv_p)
                info.update(measured_at=time.strftime("%Y-%m-%d %H:%M:%S"), commit=commit)
                results.setdefault(name, {})[system] = info
                summary = {k: info.get(k) for k in ("p_at_1", "p_at_5", "psp_at_5", "train_s", "peak_rss_bytes")}
                print(f"{name} / {system}: {json.dumps(summary)}", file=sys.stderr, flush=True)

    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": _versions(),
        "threads": args.threads,
        "torch_budget_s": args.torch_budget,
        "sets": shapes,
        "results": results,
    }
    report["slide_vs_best"] = {name: slide_vs_best(res) for name, res in results.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")

    # For the table, systems not run and not in `out` come from the recorded baseline.
    shown = json.loads(json.dumps(report, default=str))
    base_path = Path(args.baseline)
    if base_path.exists() and base_path.resolve() != out.resolve():
        base = json.loads(base_path.read_text()).get("results", {})
        for name in sets:
            for system, r in base.get(name, {}).items():
                if system not in shown["results"].get(name, {}):
                    shown["results"].setdefault(name, {})[system] = {**r, "from_baseline": True}
        shown["slide_vs_best"] = {name: slide_vs_best(shown["results"].get(name, {})) for name in sets}
    print(f"\n{args.threads} threads; results in {out}\n")
    print(datasets.markdown_table([shapes[s] for s in sets]))
    print()
    print(markdown(shown, sets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
