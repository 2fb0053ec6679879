"""The `slide` command: generate data, train, evaluate and predict without the service.

slide gen --preset tiny --out data/tiny
slide train --train data/tiny/train.txt --test data/tiny/test.txt --out models/tiny [--dense] [--lr 1e-3 ...]
slide eval --model models/tiny --test data/tiny/test.txt --mode lsh
slide predict --model models/tiny --input data/tiny/test.txt --k 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import tomllib
import typing
from pathlib import Path

import numpy as np

from .config import ConfigError, SlideConfig


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field value` flag per SlideConfig field (help text from the field's docstring default)."""
    hints = typing.get_type_hints(SlideConfig)
    group = parser.add_argument_group("model and training settings (override --config)")
    for f in dataclasses.fields(SlideConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if f.name == "hidden":
            group.add_argument(
                flag,
                type=lambda s: tuple(int(x) for x in s.split(",")),
                default=None,
                help=f"comma-separated hidden widths (default {','.join(map(str, f.default))})",
            )
        elif kind is bool:
            group.add_argument(flag, type=_parse_bool, default=None, metavar="true|false", help=f"default {f.default}")
        elif kind in (int, float):
            group.add_argument(flag, type=kind, default=None, help=f"default {f.default}")
        else:
            choices = list(typing.get_args(kind)) or None
            group.add_argument(flag, choices=choices, default=None, help=f"default {f.default}")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_config(args: argparse.Namespace) -> SlideConfig:
    values: dict = {}
    if args.config:
        with open(args.config, "rb") as fh:
            values.update(tomllib.load(fh))
    for f in dataclasses.fields(SlideConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    if args.dense:
        values["sample_output"] = False
        values["sample_hidden"] = False
    return SlideConfig.from_dict(values)


def _load(path: str):
    from .data import read_xmc

    return read_xmc(path)


def _model_dir(path: str) -> Path:
    """A snapshot directory, or the newest version inside a store directory."""
    from .snapshot import MANIFEST, SnapshotStore

    p = Path(path)
    if (p / MANIFEST).is_file():
        return p
    latest = SnapshotStore(p).latest()
    if latest is None:
        raise SystemExit(f"slide: no snapshot found in {p}")
    return latest[1]


def _emit(record: dict) -> None:
    print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}), flush=True)


def cmd_gen(args) -> int:
    from .synth import generate_to_files

    overrides = {k: v for k, v in (("num_train", args.num_train), ("num_test", args.num_test)) if v is not None}
    t0 = time.perf_counter()
    train, test = generate_to_files(args.preset, args.out, seed=args.seed, gzip=args.gzip, **overrides)
    _emit({"train": str(train), "test": str(test), "seconds": time.perf_counter() - t0})
    return 0


def cmd_train(args) -> int:
    import numba
    from tqdm import tqdm

    from .memory import estimate_for
    from .snapshot import SnapshotStore, manifest_config, read_manifest
    from .trainer import Trainer

    train = _load(args.train)
    test = _load(args.test) if args.test else None
    store = SnapshotStore(args.out, keep=args.keep)
    latest = store.latest() if args.resume else None
    config = manifest_config(read_manifest(latest[1])) if latest else build_config(args)
    estimate = estimate_for(config, train, test, threads=numba.config.NUMBA_NUM_THREADS)  # the buffers' pool
    _emit({"estimated_memory_bytes": estimate.total, "estimated_memory": estimate.describe()})
    trainer = Trainer.resume(store, train, test) if latest else Trainer(config, train, test, store)
    total = trainer.config.epochs * train.num_points
    with tqdm(
        total=total,
        initial=min(total, trainer.epoch * train.num_points + trainer.batch_in_epoch * trainer.config.batch_size),
        unit="pt",
        file=sys.stderr,
        disable=args.quiet,
        dynamic_ncols=True,
    ) as bar:
        result = trainer.run(
            on_metrics=_emit, progress=bar.update, snapshot_every_s=args.snapshot_every, time_budget_s=args.time_budget
        )
    latest = store.latest()
    _emit({"done": True, "stopped": result["stopped"], "model": str(latest[1]) if latest else None})
    return 0


def cmd_eval(args) -> int:
    from .metrics import evaluate, propensity_scores
    from .snapshot import load_model

    model = load_model(_model_dir(args.model))
    test = _load(args.test)
    t0 = time.perf_counter()
    pred, _, scored = model.predict_with_stats(test.x_indptr, test.x_indices, test.x_values, k=5, mode=args.mode)
    seconds = time.perf_counter() - t0
    inv_p = None
    if args.train:
        train = _load(args.train)
        inv_p = propensity_scores(train.label_counts(), train.num_points, *_propensity_ab(args.propensity))
    record = {
        "mode": args.mode,
        "points": test.num_points,
        **evaluate(pred, test, inv_propensity=inv_p),
        "queries_per_s": test.num_points / seconds if seconds > 0 else None,
        "mean_scored": float(scored.mean()) if len(scored) else 0.0,
        "scored_fraction": float(scored.mean()) / model.num_labels if len(scored) else 0.0,
    }
    if args.mode == "lsh" and args.recall:
        exact, _ = model.predict(test.x_indptr, test.x_indices, test.x_values, k=5, mode="exact")
        record["recall_at_5_vs_exact"] = topk_recall(pred, exact)
    _emit(record)
    return 0


def _propensity_ab(name: str) -> tuple[float, float]:
    from .metrics import AMAZON_PROPENSITY, DEFAULT_PROPENSITY

    return AMAZON_PROPENSITY if name == "amazon" else DEFAULT_PROPENSITY


def topk_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact top-k labels that the approximate top-k also returns."""
    if exact.shape[0] == 0:
        return 0.0
    hits = sum(
        len(set(a.tolist()) & set(e[e >= 0].tolist())) / max(1, int((e >= 0).sum()))
        for a, e in zip(approx, exact, strict=True)
    )
    return hits / exact.shape[0]


def cmd_predict(args) -> int:
    from .snapshot import load_model

    model = load_model(_model_dir(args.model))
    data = _load(args.input)
    labels, scores = model.predict(data.x_indptr, data.x_indices, data.x_values, k=args.k, mode=args.mode)
    out = sys.stdout
    for lab, sc in zip(labels, scores, strict=True):
        keep = lab >= 0
        out.write(json.dumps({"labels": lab[keep].tolist(), "scores": [round(float(s), 6) for s in sc[keep]]}) + "\n")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slide", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gen", help="write a synthetic dataset (train.txt, test.txt) in XMC format")
    g.add_argument("--preset", default="tiny", help="tiny, small, amazon670k or delicious200k")
    g.add_argument("--out", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--gzip", action="store_true")
    g.add_argument("--num-train", type=int)
    g.add_argument("--num-test", type=int)
    g.set_defaults(func=cmd_gen)

    t = sub.add_parser("train", help="train a model; one JSON line of metrics per evaluation")
    t.add_argument("--train", required=True)
    t.add_argument("--test")
    t.add_argument("--out", required=True, help="snapshot directory (versions v000001, ...)")
    t.add_argument("--config", help="TOML file of settings (flags override it)")
    t.add_argument("--dense", action="store_true", help="train every output neuron (the dense baseline)")
    t.add_argument("--resume", action="store_true", help="continue from the newest snapshot in --out")
    t.add_argument("--snapshot-every", type=float, default=60.0, help="seconds between snapshots")
    t.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    t.add_argument("--keep", type=int, default=2, help="snapshot versions to keep")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    _config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="P@k, nDCG@k (and PSP@k with --train) of a model on a test file")
    e.add_argument("--model", required=True)
    e.add_argument("--test", required=True)
    e.add_argument("--mode", choices=["lsh", "exact"], default="lsh")
    e.add_argument("--recall", action="store_true", help="also report top-5 recall of lsh against exact")
    e.add_argument("--train", help="training file, for propensity-scored PSP@k")
    e.add_argument("--propensity", choices=["default", "amazon"], default="default")
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k labels of each point of a file, one JSON line each")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--mode", choices=["lsh", "exact"], default="lsh")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"slide: bad setting {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"slide: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
