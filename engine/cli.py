"""The `slide` command: generate data, train, evaluate and predict without the service.

slide gen --preset tiny --out data/tiny
slide train --train data/tiny/train.txt --test data/tiny/test.txt --out models/tiny [--dense] [--lr 1e-3 ...]
slide eval --model models/tiny --test data/tiny/test.txt [--mode auto|lsh|exact]
slide predict --model models/tiny --input data/tiny/test.txt --k 5
slide train --train data/new/train.txt --init-from models/tiny --out models/tiny2   # fine-tune (warm start)

Text: `slide train --train train.jsonl --test test.jsonl --out models/t` fits a TF-IDF featurizer and a label
vocabulary on lines of {"text": ..., "labels": [names]} and stores both in every snapshot;
`slide predict --model models/t --text "red running shoes"` prints label names.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
import tomllib
import typing
from pathlib import Path
from typing import Any

from .config import FLAT_NAMES, GROUPS, RUN_SETTINGS, ConfigError, SlideConfig, upgrade_settings


def _setting_fields() -> list[tuple[str, str, Any, Any]]:
    """(flag name, path, type, default) of every setting: a group's settings take their flat name as flag
    (`--hash-l` sets sampling.hash_l, `--predict-hubs` sets predict.hubs), so the flags read as before."""
    out = []
    for flat, path in FLAT_NAMES.items():
        group, name = path.split(".")
        cls = GROUPS[group]
        f = next(f for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]
        out.append((flat, path, typing.get_type_hints(cls)[name], f.default))
    hints = typing.get_type_hints(SlideConfig)
    fields = {f.name: f for f in dataclasses.fields(SlideConfig)}
    out += [(name, name, hints[name], fields[name].default) for name in RUN_SETTINGS]
    return out


def _config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field value` flag per setting, under one heading per settings group (the group's docstring); each
    help names the setting's path, as the TOML file and a job body give it, and its default."""
    groups = {
        name: parser.add_argument_group(
            f"{name} settings (--config table [{name}]; flags override the file)",
            " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split()),
        )
        for name, cls in GROUPS.items()
    }
    run = parser.add_argument_group("run settings (--config top level; flags override the file)")
    for name, path, kind, default in _setting_fields():
        flag = "--" + name.replace("_", "-")
        group = groups[path.split(".")[0]] if "." in path else run
        shown = "auto" if default is None else default
        if path == "model.hidden":
            group.add_argument(
                flag,
                dest=name,
                type=lambda s: tuple(int(x) for x in s.split(",")),
                default=None,
                help="model.hidden: comma-separated hidden widths (default auto: 512 when the output layer is "
                "sampled and has at most 100,000 labels, else 128)",
            )
        elif kind in (bool, bool | None):
            group.add_argument(
                flag, dest=name, type=_parse_bool, default=None, metavar="true|false", help=f"{path}; default {shown}"
            )
        elif kind in (int, float):
            group.add_argument(flag, dest=name, type=kind, default=None, help=f"{path}; default {shown}")
        elif int in typing.get_args(kind):  # a number, auto (None) and/or a word
            words = [
                w for a in typing.get_args(kind) if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)
            ]
            metavar = "|".join(["N", *(["auto"] if type(None) in typing.get_args(kind) else []), *words])
            group.add_argument(
                flag, dest=name, type=_setting_value, default=None, metavar=metavar, help=f"{path}; default {shown}"
            )
        else:
            choices = list(typing.get_args(kind)) or None
            group.add_argument(flag, dest=name, choices=choices, default=None, help=f"{path}; default {shown}")


def _setting_value(s: str) -> int | str:
    """A number, or a word (`auto`, `none`, `all`) that SlideConfig checks against the field."""
    try:
        return int(s)
    except ValueError:
        return s.lower()


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_config(args: argparse.Namespace) -> SlideConfig:
    """The config of `slide train`: the --config TOML file (one table per group, `[model]`, `[sampling]`, ...;
    run-level `threads` and `seed` at the top), then the flags over it."""
    values: dict = {}
    if args.config:
        with open(args.config, "rb") as fh:
            values.update(tomllib.load(fh))
    values, notes = upgrade_settings(values)
    for note in notes:
        print(f"slide: {args.config}: {note}", file=sys.stderr)
    flags = {
        path: getattr(args, name) for name, path, _, _ in _setting_fields() if getattr(args, name, None) is not None
    }
    if args.dense:
        flags.update({"model.sample_output": False, "model.sample_hidden": False})
    for path, value in flags.items():
        group, _, name = path.rpartition(".")
        holder = values.setdefault(group, {}) if group else values
        if not isinstance(holder, dict):
            raise ConfigError(group, f"must be a table of {group} settings")
        holder[name] = value
    values, notes = upgrade_settings(values)
    for note in notes:
        print(f"slide: {note}", file=sys.stderr)
    return SlideConfig.from_dict(values)


def _load(path: str):
    from .data import read_xmc

    return read_xmc(path)


def is_jsonl(path: str) -> bool:
    name = str(path).lower().removesuffix(".gz")
    return name.endswith((".jsonl", ".ndjson"))


def _load_like(path: str, model):
    """A test file for `model`: XMC as is, JSONL featurized with the model's featurizer and label names."""
    if not is_jsonl(path):
        return _load(path)
    from .text import featurize_like, read_jsonl

    if model.featurizer is None or model.label_names is None:
        raise ValueError(f"{path} is JSONL text but the model was not trained on text: it has no featurizer")
    data, unknown = featurize_like(read_jsonl(path), model.featurizer, model.label_names, model.num_labels)
    if unknown:
        print(f"slide: {unknown} label name(s) in {path} are not in the model's vocabulary (dropped)", file=sys.stderr)
    return data


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

    from .memory import estimate_for
    from .snapshot import SnapshotStore, manifest_config, read_manifest
    from .trainer import Trainer

    store = SnapshotStore(args.out, keep=args.keep)
    resume = args.resume and store.latest() is not None
    featurizer = names = None
    if is_jsonl(args.train):
        from .snapshot import load_model
        from .text import featurize_like, fit_text_dataset, read_jsonl

        records = read_jsonl(args.train)
        if resume:  # the snapshot's featurizer and vocabulary, so feature and label ids keep their meaning
            latest = store.latest()
            assert latest is not None  # resume is only set when the store holds a snapshot
            held = load_model(latest[1])
            featurizer, names = held.featurizer, held.label_names
            if featurizer is None or names is None:
                raise ValueError(f"{args.out} holds a model without a text featurizer; train it from XMC files")
            train, _ = featurize_like(records, featurizer, names)
        else:
            train, featurizer, names = fit_text_dataset(records)
        test = None
        if args.test:
            if not is_jsonl(args.test):
                raise ValueError("--train is JSONL text, so --test must be JSONL text too")
            test, unknown = featurize_like(read_jsonl(args.test), featurizer, names)
            if unknown:
                print(
                    f"slide: {unknown} label name(s) of --test are not in the training set (dropped)", file=sys.stderr
                )
    else:
        train = _load(args.train)
        test = _load(args.test) if args.test else None
    latest = store.latest() if resume else None
    config = manifest_config(read_manifest(latest[1])) if latest else build_config(args)
    threads = numba.config.NUMBA_NUM_THREADS  # the buffers' pool
    trainer: Trainer
    if args.shards:
        from .distributed import DistributedTrainer

        if args.init_from:
            raise ValueError("--init-from: a warm start is not available with --shards yet")
        estimate = estimate_for(config, train, test, threads=threads)
        if latest:
            trainer = DistributedTrainer.resume(store, train, test, shards=args.shards, address=args.ray_address)
        else:
            trainer = DistributedTrainer(config, train, test, store, shards=args.shards, address=args.ray_address)
        if featurizer is not None:
            trainer.attach_text(featurizer, names)
    elif args.init_from and not latest:
        from .warmstart import estimate_warm_start

        name_list = names.to_list() if names is not None else None
        estimate = estimate_warm_start(args.init_from, config, train, test, threads, name_list, spill=True)
        trainer = Trainer(
            config, train, test, store, init_from=args.init_from, label_names=name_list, featurizer=featurizer
        )
    else:
        estimate = estimate_for(config, train, test, threads=threads, spill=True)  # it has a store: the best in files
        trainer = Trainer.resume(store, train, test) if latest else Trainer(config, train, test, store)
        if featurizer is not None:
            trainer.attach_text(featurizer, names)
    try:
        return _train(args, trainer, store, estimate)
    except RuntimeError as exc:
        if not args.shards:
            raise
        print(f"slide: {exc}", file=sys.stderr)  # a lost shard: the message says how to resume
        return 3
    finally:
        close = getattr(trainer, "close", None)
        if close is not None:
            close()


def _train(args, trainer, store, estimate) -> int:
    from tqdm import tqdm

    resolved = trainer.resolved().to_dict()
    _emit(
        {
            "estimated_memory_bytes": estimate.total,
            "estimated_memory": estimate.describe(),
            "resolved": resolved,
        }
    )
    per_epoch = resolved["train_points"]
    total = trainer.config.schedule.epochs * per_epoch
    with tqdm(
        total=total,
        initial=min(total, trainer.epoch * per_epoch + trainer.batch_in_epoch * trainer.config.optimizer.batch_size),
        unit="pt",
        file=sys.stderr,
        disable=args.quiet,
        dynamic_ncols=True,
    ) as bar:
        result = trainer.run(
            on_metrics=lambda m: _emit(m.to_dict()),
            progress=bar.update,
            snapshot_every_s=args.snapshot_every,
            time_budget_s=args.time_budget,
        )
    latest = store.latest()
    final = {k: result.get(k) for k in ("early_stopped", "served_step", "best_val_p_at_1", "p_at_1", "eval_mode")}
    _emit({"done": True, "stopped": result["stopped"], **final, "model": str(latest[1]) if latest else None})
    return 0


def cmd_eval(args) -> int:
    from .metrics import evaluate, propensity_scores, topk_recall
    from .snapshot import load_model

    model = load_model(_model_dir(args.model))
    test = _load_like(args.test, model)
    t0 = time.perf_counter()
    pred, _, scored, used = model.predict_with_stats(test.x_indptr, test.x_indices, test.x_values, k=5, mode=args.mode)
    seconds = time.perf_counter() - t0
    inv_p = None
    if args.train:
        train = _load_like(args.train, model)
        inv_p = propensity_scores(train.label_counts(), train.num_points, *_propensity_ab(args.propensity))
    record = {
        "mode": used,
        "requested_mode": args.mode,
        "points": test.num_points,
        **evaluate(pred, test, inv_propensity=inv_p),
        "queries_per_s": test.num_points / seconds if seconds > 0 else None,
        "mean_scored": float(scored.mean()) if len(scored) else 0.0,
        "scored_fraction": float(scored.mean()) / model.num_labels if len(scored) else 0.0,
    }
    if used == "lsh" and args.recall:
        exact, _ = model.predict(test.x_indptr, test.x_indices, test.x_values, k=5, mode="exact")
        record["recall_at_5_vs_exact"] = topk_recall(pred, exact)
    _emit(record)
    return 0


def _propensity_ab(name: str) -> tuple[float, float]:
    from .metrics import AMAZON_PROPENSITY, DEFAULT_PROPENSITY

    return AMAZON_PROPENSITY if name == "amazon" else DEFAULT_PROPENSITY


def cmd_predict(args) -> int:
    from .snapshot import load_model

    model = load_model(_model_dir(args.model))
    if args.text is not None:
        if model.featurizer is None:
            raise ValueError("--text: the model was not trained on text (it has no featurizer); use --input")
        if any(not t.strip() for t in args.text):
            raise ValueError("--text: empty text")
        indptr, indices, values = model.featurizer.transform(args.text)
    elif args.input:
        data = _load_like(args.input, model)
        indptr, indices, values = data.x_indptr, data.x_indices, data.x_values
    else:
        raise ValueError("give --input FILE or --text TEXT")
    labels, scores, _, used = model.predict_with_stats(indptr, indices, values, k=args.k, mode=args.mode)
    out = sys.stdout
    names = model.label_names
    for lab, sc in zip(labels, scores, strict=True):
        keep = lab >= 0
        ids = lab[keep].tolist()
        record = {"labels": ids, "scores": [round(float(s), 6) for s in sc[keep]], "mode": used}
        if names is not None:
            record = {"names": names.names(ids), **record}
        out.write(json.dumps(record) + "\n")
    return 0


_MODE_HELP = (
    "auto (default): hash tables for wide layers where they recall the exact top-5, every label elsewhere; "
    "lsh: tables for every sampled layer; exact: score every label. Each output says which answered."
)


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
    t.add_argument("--train", required=True, help="XMC file, or JSONL text (.jsonl / .jsonl.gz)")
    t.add_argument("--test")
    t.add_argument("--out", required=True, help="snapshot directory (versions v000001, ...)")
    t.add_argument(
        "--config",
        help="TOML file of settings: one table per group ([model], [sampling], [optimizer], [schedule], "
        "[predict]), threads and seed at the top; flags override it",
    )
    t.add_argument("--dense", action="store_true", help="train every output neuron (the dense baseline)")
    t.add_argument("--resume", action="store_true", help="continue from the newest snapshot in --out")
    t.add_argument(
        "--init-from",
        metavar="DIR",
        help="start from this model (a snapshot directory, or a version in it): its weights, tables, optimizer "
        "state and featurizer; labels are matched by name (text) or id (XMC), new ones are added",
    )
    t.add_argument("--snapshot-every", type=float, default=60.0, help="seconds between snapshots")
    t.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    t.add_argument("--keep", type=int, default=2, help="snapshot versions to keep")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--shards",
        type=int,
        default=0,
        help="split the output layer by label over this many Ray actors (pip install -e '.[ray]'); 0 = one process",
    )
    t.add_argument(
        "--ray-address",
        default="local",
        help="with --shards: 'local' starts a Ray instance on this machine, else a cluster's address (ray://head:10001)",
    )
    _config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="P@k, nDCG@k (and PSP@k with --train) of a model on a test file")
    e.add_argument("--model", required=True)
    e.add_argument("--test", required=True)
    e.add_argument("--mode", choices=["auto", "lsh", "exact"], default="auto", help=_MODE_HELP)
    e.add_argument("--recall", action="store_true", help="also report top-5 recall against exact when tables answer")
    e.add_argument("--train", help="training file, for propensity-scored PSP@k")
    e.add_argument("--propensity", choices=["default", "amazon"], default="default")
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k labels of each point of a file, one JSON line each")
    p.add_argument("--model", required=True)
    p.add_argument("--input", help="XMC file (or JSONL text for a model trained on text)")
    p.add_argument("--text", action="append", help="a query text (repeatable); prints label names")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--mode", choices=["auto", "lsh", "exact"], default="auto", help=_MODE_HELP)
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
