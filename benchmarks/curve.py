"""P@1 after fixed numbers of training steps, and where a step's time goes, for one engine config.

Training quality per step is deterministic (same seed, same data order), so two configs compare by
their P@1 at equal steps even on a busy machine; the per-phase timings are only as quiet as the
machine. Most of BENCHMARKS.md's "Why the defaults" and "Tried and rejected" measurements come from it.

    python benchmarks/curve.py --preset amazon670k --steps 3000 --evals 4
    python benchmarks/curve.py --preset delicious200k --steps 4000 --config '{"sampling": {"hard_negatives": "all"}}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import prepare  # noqa: E402

import engine.trainer as trainer_module  # noqa: E402

PHASES = (
    "train_batch",
    "group_by_row",
    "update_sampled_layer",
    "backward_batch",
    "group_by_feature",
    "update_input_layer",
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="amazon670k")
    p.add_argument("--num-train", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--evals", type=int, default=4, help="evaluations, evenly spaced over the steps")
    p.add_argument("--eval-points", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default="{}", help="JSON object of SlideConfig overrides")
    args = p.parse_args()

    from engine import SlideConfig, Trainer, load_dataset
    from engine._numba import set_threads
    from engine.config import merge_settings

    data = Path(prepare(args)["dir"])
    train, test = load_dataset(data / "train"), load_dataset(data / "test")
    config = SlideConfig.from_dict(
        merge_settings(
            {"schedule": {"epochs": 1000, "eval_points": args.eval_points}, "threads": args.threads, "seed": args.seed},
            json.loads(args.config),
        )
    )
    set_threads(config.threads)
    trainer = Trainer(config, train, test)

    spent = dict.fromkeys(PHASES + ("rehash",), 0.0)

    def timed(name, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            spent[name] += time.perf_counter() - t0
            return out

        return call

    for name in PHASES:
        setattr(trainer_module, name, timed(name, getattr(trainer_module, name)))
    trainer.rehash = timed("rehash", trainer.rehash)

    b = config.optimizer.batch_size
    per_epoch = -(-train.num_points // b)
    every = max(1, args.steps // max(1, args.evals))
    trained = 0.0
    orders: dict[int, np.ndarray] = {}
    for s in range(args.steps):
        epoch, i = divmod(s, per_epoch)
        if epoch not in orders:
            orders = {epoch: trainer.epoch_order(epoch)}
        order = orders[epoch]
        t0 = time.perf_counter()
        trainer.train_step(order[i * b : (i + 1) * b])
        trained += time.perf_counter() - t0
        if (s + 1) % every == 0 or s + 1 == args.steps:
            lsh, exact = trainer.evaluate(), trainer.evaluate(mode="exact")
            print(
                json.dumps(
                    {
                        "step": s + 1,
                        "samples": trainer.samples_seen,
                        "train_s": round(trained, 1),
                        "p_at_1_lsh": lsh["p_at_1"],
                        "p_at_1_exact": exact["p_at_1"],
                    }
                ),
                flush=True,
            )
    ms = {name: round(1e3 * v / args.steps, 2) for name, v in spent.items()}
    print(
        json.dumps(
            {
                "config": json.loads(args.config),
                "ms_per_step": round(1e3 * trained / args.steps, 1),
                "samples_per_s": round(args.steps * b / trained),
                "phases_ms_per_step": ms,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
