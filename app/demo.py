"""`python -m app.demo` (`make demo`): a small synthetic dataset, uploaded to a running service, and a job on it.

Generates the engine's `tiny` preset (2,000 training points, 2,000 features, 500 labels), uploads the train and
test files (gzipped, streamed), starts a job and waits for its first snapshot, then asks for a prediction, so
the console (`<url>/ui`) shows its curves and Swagger (`<url>/docs`) has a model to query within a minute. The
service is at $SLIDE_URL (default http://127.0.0.1:$PORT, PORT defaulting to 8000, as for `make run`);
$SLIDE_API_KEY is sent as X-API-Key when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


def _chunks(path: Path, size: int = 1 << 16) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(size):
            yield block


def _check(r: httpx.Response, what: str) -> dict[str, Any]:
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        sys.exit(f"demo: {what} failed with HTTP {r.status_code}: {detail}")
    body: dict[str, Any] = r.json()
    return body


def _wait_ready(client: httpx.Client, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"demo: no service answering at {client.base_url} (start it with `make run`)")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", default=os.environ.get("SLIDE_URL") or f"http://127.0.0.1:{os.environ.get('PORT') or 8000}"
    )
    parser.add_argument("--preset", default="tiny", help="engine.synth preset (default: tiny)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the demo job (default: 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wait",
        type=float,
        default=120.0,
        help="seconds to wait for the first snapshot (0 = start the job and return)",
    )
    args = parser.parse_args(argv)

    from engine import generate, write_xmc  # numpy/numba only here: --help stays fast

    headers = {"X-API-Key": os.environ["SLIDE_API_KEY"]} if os.environ.get("SLIDE_API_KEY") else {}
    client = httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=120)
    _wait_ready(client, timeout=30)

    print(f"demo: generating the '{args.preset}' synthetic dataset ...")
    train, test = generate(args.preset, seed=args.seed)
    ids = {}
    with tempfile.TemporaryDirectory(prefix="slide-demo-") as tmp:
        for split, data in (("train", train), ("test", test)):
            path = write_xmc(data, Path(tmp) / f"{args.preset}_{split}.txt.gz")
            body = _check(
                client.post(
                    "/v1/datasets",
                    params={"name": f"demo-{args.preset}-{split}"},
                    content=_chunks(path),
                    headers={"Content-Type": "application/gzip"},
                ),
                f"uploading {split}",
            )
            ids[split] = body["id"]
            print(
                f"demo: uploaded {split}: id {body['id']}, {body['num_points']} points, "
                f"{body['num_features']} features, {body['num_labels']} labels"
            )

    job = _check(
        client.post(
            "/v1/jobs",
            json={
                "train_dataset_id": ids["train"],
                "eval_dataset_id": ids["test"],
                "config": {"schedule": {"epochs": args.epochs}, "seed": args.seed},
            },
        ),
        "starting the job",
    )
    job_id = job["id"]
    print(f"demo: job {job_id} is {job['state']} ({args.epochs} epochs)")

    n = int(test.x_indptr[1])
    query = {
        "instances": [
            {"indices": [int(i) for i in test.x_indices[:n]], "values": [round(float(v), 4) for v in test.x_values[:n]]}
        ],
        "k": 5,
        "mode": "lsh",
    }
    truth = [int(label) for label in test.y_indices[: int(test.y_indptr[1])]]

    if args.wait > 0:
        print("demo: waiting for the first snapshot (the service publishes one every SLIDE_SNAPSHOT_INTERVAL_S) ...")
        deadline = time.monotonic() + args.wait
        while True:
            r = client.post(f"/v1/models/{job_id}/predict", json=query)
            if r.status_code == 200:
                answer = r.json()
                state = client.get(f"/v1/jobs/{job_id}").json()
                print(
                    f"demo: model v{answer['model_version']} (job {state['state']}, epoch "
                    f"{state['progress']['epoch']}/{args.epochs}) predicts {answer['predictions'][0]['labels']} "
                    f"for the first test point; its true labels are {truth}"
                )
                break
            if r.status_code != 503:
                _check(r, "predicting")
            if time.monotonic() > deadline:
                print("demo: no snapshot yet; the job is still starting, try the predict call below in a moment")
                break
            time.sleep(1.0)

    base = args.url.rstrip("/")
    key = ' -H "X-API-Key: $SLIDE_API_KEY"' if headers else ""
    print(f"""
Console:     {base}/ui/jobs/{job_id}
Swagger UI:  {base}/docs   (model id = job id = {job_id})
Watch:       curl -s{key} {base}/v1/jobs/{job_id}
Live events: curl -N{key} {base}/v1/jobs/{job_id}/events
Predict:     curl -s{key} -X POST {base}/v1/models/{job_id}/predict -H 'Content-Type: application/json' \\
               -d '{json.dumps(query)}'
Stop:        curl -s{key} -X POST {base}/v1/jobs/{job_id}/stop""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
