"""The memory estimate against the measured peak resident size of trainer processes, on a few dataset shapes.

    .venv/bin/python benchmarks/memory.py [--threads 2] [--steps 16]

For each shape: a synthetic dataset is written to a temp dir, one trainer process trains on it for `--steps`
steps (evaluation, validation and snapshots included) and reports its peak RSS (VmHWM); the table compares it with
`engine.memory.estimate_for`. Each config's kernels are compiled first in a throw-away process: a cold compile
adds ~260 MB that a service trainer only pays once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = [
    ("tiny: 2,000 points, 500 labels", "tiny", {}, {"model": {"hidden": [128]}}),
    ("100k labels, 20k features", "small", {"num_train": 20_000, "num_test": 2_000, "num_labels": 100_000}, {}),
    (
        "100k labels, hidden 256, float32",
        "small",
        {"num_train": 20_000, "num_test": 2_000, "num_labels": 100_000},
        {"model": {"hidden": [256], "weight_dtype": "float32"}, "optimizer": {"moment_dtype": "float32"}},
    ),
    ("amazon670k shape, 20k points", "amazon670k", {"num_train": 20_000, "num_test": 2_000}, {}),
]

PROBE = """
import json, sys
import numba
from engine import SlideConfig, SnapshotStore, Trainer, load_dataset
from engine.memory import estimate_for
a = json.loads(sys.argv[1])
train, test = load_dataset(a["train"]), load_dataset(a["test"])
cfg = SlideConfig.from_dict(a["config"])
trainer = Trainer(cfg, train, test, SnapshotStore(a["store"]))
trainer.run(snapshot_every_s=1.0, should_stop=lambda: trainer.step >= a["steps"])
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
est = estimate_for(cfg, train, test, threads=numba.config.NUMBA_NUM_THREADS, spill=True)
print(json.dumps({"peak": peak, "estimate": est.trainer, "parts": est.parts, "steps": trainer.step}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from engine import generate, save_dataset

    env = {**os.environ, "NUMBA_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    print("| shape | config | estimate MiB | peak RSS MiB | estimate / peak |")
    print("|---|---|---|---|---|")
    for title, preset, sizes, config in SHAPES:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            train, test = generate(preset, seed=1, **sizes)
            save_dataset(train, d / "train")
            save_dataset(test, d / "test")
            del train, test
            results = []
            for attempt in ("compile", "measure"):
                a = {
                    "train": str(d / "train"),
                    "test": str(d / "test"),
                    "store": str(d / attempt),
                    # validations keep a best copy
                    "config": {**config, "schedule": {"epochs": 1, "eval_every": max(1, args.steps // 2)}},
                    "steps": 2 if attempt == "compile" else args.steps,
                }
                out = subprocess.run(
                    [sys.executable, "-c", PROBE, json.dumps(a)], capture_output=True, text=True, env=env, check=True
                )
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(
                f"| {title} | `{json.dumps(config) if config else 'defaults'}` | {r['estimate'] >> 20:,} | "
                f"{r['peak'] >> 20:,} | {r['estimate'] / r['peak']:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
