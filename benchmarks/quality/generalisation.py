"""Served P@1 after few and many epochs, with and without the generalisation defaults, on the quality sets.

    python benchmarks/quality/generalisation.py --sets wordnet-top,debtags,synth-small,sparselinear
    python benchmarks/quality/generalisation.py --sets debtags --variants new --config '{"optimizer": {"lr": 1e-3}}'

For each set and variant one run of `--epochs` (default 50) epochs reports, after every epoch, the current
model's validation P@1 (the split the trainer holds out of the training set) and its P@1 on a fixed subset
of the test set (`--test-points`, reporting only). The served P@1 after E epochs is then:
- `new` (the defaults: warm-up, reduce-on-plateau, early stopping, the best snapshot by validation P@1):
  the test P@1 of the model with the best validation P@1 among the first E evaluations (what a run of
  E epochs serves: the schedule does not depend on the number of epochs configured), or of the model early
  stopping kept when the run stopped before E;
- `old` (constant step size, no split, no early stopping, the last model served): the test P@1 after epoch E.
Both also report the P@1 of the served model scored exactly, and the mode `auto` chose.
Variants run one after the other in one process, so compare them as ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import datasets  # noqa: E402
from engine import SlideConfig, Trainer, TrainingMetrics  # noqa: E402
from engine.config import merge_settings  # noqa: E402
from engine.metrics import precision_at_k  # noqa: E402

OLD = {
    "schedule": {"val_points": "none", "lr_warmup_steps": "none", "lr_decay": 1.0, "early_stop_patience": "never"},
    "optimizer": {"lr": 3e-3},
    "model": {"init_std": 0.01},
}
"""The defaults before model selection: constant step size 3e-3, init N(0, 0.01), no split, the last model served."""
VARIANTS = {"old": OLD, "new": {}}


def subset(data, points: int, seed: int = 0):
    """A seeded subset of `points` rows (all when points is 0 or more than there are)."""
    if points <= 0 or points >= data.num_points:
        return data
    from engine.sparse import RowReader

    rows = np.sort(np.random.default_rng([seed, 99]).choice(data.num_points, size=points, replace=False))
    return RowReader(data).take(rows)


def p_at_1(model, data, mode: str) -> tuple[float, str]:
    pred, _, _, used = model.predict_with_stats(data.x_indptr, data.x_indices, data.x_values, k=1, mode=mode)
    return precision_at_k(pred, data.y_indptr, data.y_indices, 1), used


def run(name: str, variant: str, overrides: dict, epochs: int, test_points: int, at: list[int], max_train: int) -> dict:
    train, test = datasets.load(name)
    train = subset(train, max_train, seed=1)
    sub = subset(test, test_points)
    cfg = SlideConfig.from_dict(merge_settings(VARIANTS[variant], overrides, {"schedule": {"epochs": epochs}}))
    trainer = Trainer(cfg, train, None)
    curve = []

    def on_metrics(record: TrainingMetrics) -> None:
        m = record.to_dict()
        test_p1, used = p_at_1(trainer.model, sub, "auto" if variant == "new" else "lsh")
        exact_p1, _ = p_at_1(trainer.model, sub, "exact")
        curve.append(
            {
                "epoch": m["epoch"],
                "val_p_at_1": m.get("val_p_at_1"),
                "test_p_at_1": test_p1,
                "test_exact_p_at_1": exact_p1,
                "mode": used,
                "loss": m["loss"],
                "lr": m.get("lr"),
                "train_s": m["elapsed_s"],
            }
        )
        print(json.dumps({"set": name, "variant": variant, **curve[-1]}), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = trainer.run(on_metrics=on_metrics)
    served = {}
    for e in at:
        upto = [c for c in curve if c["epoch"] <= e]
        if not upto:
            continue
        if variant == "old":
            pick = upto[-1]
        else:
            pick = max(upto, key=lambda c: (c["val_p_at_1"], -c["epoch"]))  # the first best, as the trainer keeps
        served[e] = {k: pick[k] for k in ("epoch", "test_p_at_1", "test_exact_p_at_1", "mode")}
    return {
        "set": name,
        "variant": variant,
        "overrides": overrides,
        "epochs_run": curve[-1]["epoch"] if curve else 0,
        "early_stopped": bool(result.get("early_stopped")),
        "served": served,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="wordnet-top,debtags,synth-small,sparselinear")
    ap.add_argument("--variants", default="old,new")
    ap.add_argument("--config", default="", help="JSON of SlideConfig overrides for every variant")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--old-epochs", type=int, default=30, help="epochs of the `old` variant (it never stops early)")
    ap.add_argument("--at", default="5,50", help="epoch counts to report the served P@1 at")
    ap.add_argument("--test-points", type=int, default=5000)
    ap.add_argument("--max-train", type=int, default=0, help="train on a seeded subset of this many points (0 = all)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    overrides = json.loads(args.config) if args.config else {}
    at = [int(x) for x in args.at.split(",")]
    results = []
    for name in args.sets.split(","):
        for variant in args.variants.split(","):
            epochs = min(args.epochs, args.old_epochs) if variant == "old" else args.epochs
            results.append(run(name, variant, overrides, epochs, args.test_points, at, args.max_train))
    print("| set | variant | " + " | ".join(f"served P@1 at {e} (exact)" for e in at) + " | epochs run |")
    print("|---|---|" + "---:|" * (len(at) + 1))
    for r in results:
        cells = [
            f"{r['served'][e]['test_p_at_1']:.3f} ({r['served'][e]['test_exact_p_at_1']:.3f}, {r['served'][e]['mode']})"
            if e in r["served"]
            else "-"
            for e in at
        ]
        print(f"| {r['set']} | {r['variant']} | " + " | ".join(cells) + f" | {r['epochs_run']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
