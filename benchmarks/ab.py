"""Training speed of two commits in one process: each commit's engine steps alternately on the same batches.

Both trainers see the same machine load step by step, so their time ratio holds on a shared, noisy machine
where runs of `make bench` taken minutes apart differ by more than the effect measured. Each commit's
`engine/` is extracted with `git archive` into a temporary directory under its own package name; the first
steps (Numba compilation) are left out of the timing. With the same seed the two trainers should also end with
the same weights when the commits change no numbers ("weights equal").

    python benchmarks/ab.py --base main --new HEAD --preset amazon670k --num-train 100000 --steps 300
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import cpu_name  # noqa: E402
from run import prepare  # noqa: E402

WARMUP = 3


def extract(rev: str, package: str, into: Path) -> str:
    """The commit's engine/ as package `package` in `into`; returns the commit's short hash."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True)
    archive = subprocess.run(["git", "archive", rev, "engine"], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "engine").rename(into / package)
    for path in (into / package).rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\b(from|import) engine([. ])", rf"\1 {package}\2", text)
        path.write_text(text.replace('"engine.', f'"{package}.'))
    return sha.stdout.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="main")
    p.add_argument("--new", default="HEAD")
    p.add_argument("--preset", default="amazon670k")
    p.add_argument("--num-train", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default="{}", help="JSON object of settings both commits understand")
    args = p.parse_args()

    data = Path(prepare(args)["dir"])
    tmp = Path(tempfile.mkdtemp(prefix="slide-ab-"))
    sys.path.insert(0, str(tmp))
    commits = {"base": extract(args.base, "engine_base", tmp), "new": extract(args.new, "engine_new", tmp)}
    trainers = {}
    for side, package in (("base", "engine_base"), ("new", "engine_new")):
        # flat names: a commit from before the settings groups reads only those, a later one reads them too
        config = importlib.import_module(f"{package}.config").SlideConfig.from_dict(
            {"epochs": 1000, "threads": args.threads, "seed": args.seed, "sample_output": True}
            | json.loads(args.config)
        )
        importlib.import_module(f"{package}._numba").set_threads(args.threads)
        train = importlib.import_module(f"{package}.sparse").load_dataset(data / "train")
        trainers[side] = importlib.import_module(f"{package}.trainer").Trainer(config, train)
    order = trainers["base"].epoch_order(0)
    base = trainers["base"].config
    b = base.optimizer.batch_size if hasattr(base, "optimizer") else base.batch_size
    spent = dict.fromkeys(trainers, 0.0)
    for step in range(WARMUP + args.steps):
        batch = order[step * b : (step + 1) * b]
        for side in ("base", "new") if step % 2 == 0 else ("new", "base"):
            t0 = time.perf_counter()
            trainers[side].train_step(batch)
            if step >= WARMUP:
                spent[side] += time.perf_counter() - t0
    equal = all(
        np.array_equal(a, c) for a, c in zip(trainers["base"].model.weights, trainers["new"].model.weights, strict=True)
    )
    result = {
        "machine": cpu_name(),
        "commits": commits,
        "steps": args.steps,
        "samples_per_s": {side: args.steps * b / s for side, s in spent.items()},
        "new_over_base_speed": spent["base"] / spent["new"],
        "weights_equal": equal,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
