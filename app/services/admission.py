"""Memory admission: what a job will need (`engine.memory.estimate_memory` on its config and datasets' shapes)
against what the service allows (SLIDE_MAX_JOB_MEMORY), before any trainer starts.

A job whose estimate alone exceeds the limit is refused (`MemoryLimitExceeded`, a 422 naming the estimate, the
limit and the fields that drive it), at creation and at resume; the supervisor fails one that reaches it anyway (a
limit lowered since, an automatic resume). Queued jobs start in order, each when it fits beside the running ones
(`plan_queue`, which also says why the others wait).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from app.db import DatasetRow, JobRow
from app.services.errors import MemoryLimitExceeded
from app.settings import Settings
from engine import ConfigError, SlideConfig
from engine.config import setting, setting_paths, with_settings
from engine.memory import MemoryEstimate, estimate_memory, format_bytes


def trainer_pool(config: SlideConfig, settings: Settings) -> int:
    """The Numba thread pool a trainer of this job will have (its per-thread buffers scale with it); see
    `app.services.worker.run_job`."""
    cpus = os.cpu_count() or 1
    threads = config.threads or settings.trainer_threads
    if threads:
        return min(int(threads), cpus)
    return int(os.environ.get("NUMBA_NUM_THREADS") or cpus)


def estimate_job(
    config: SlideConfig | dict[str, Any],
    train: DatasetRow,
    test: DatasetRow | None,
    settings: Settings,
    init_from: str | None = None,
    shards: int = 0,
) -> MemoryEstimate:
    """The job's estimate; init_from: the snapshot version it starts from (its shape grown to the data's, plus what
    growing holds, engine.warmstart.warm_start_shape). shards > 0: a job on Ray (`sharded_estimate`)."""
    cfg = config if isinstance(config, SlideConfig) else SlideConfig.from_dict(config)
    num_features, num_labels, extra = train.num_features, train.num_labels, 0
    if init_from is not None:
        from engine.warmstart import warm_start_shape

        entries = int(round(train.avg_labels_per_point * train.num_points))
        if test is not None:
            entries += int(round(test.avg_labels_per_point * test.num_points))
        shape = warm_start_shape(
            init_from,
            cfg,
            num_features,
            num_labels,
            named=(settings.dataset_dir(train.id) / "text.json").is_file(),
            label_entries=entries,
            nnz=train.nnz + (test.nnz if test is not None else 0),
        )
        cfg, num_features, num_labels, extra = shape
    est = estimate_memory(
        cfg,
        train.num_points,
        num_features,
        num_labels,
        nnz=train.nnz,
        label_entries=int(round(train.avg_labels_per_point * train.num_points)),
        eval_points=test.num_points if test is not None else 0,
        eval_nnz=test.nnz if test is not None else 0,
        eval_label_entries=int(round(test.avg_labels_per_point * test.num_points)) if test is not None else 0,
        threads=trainer_pool(cfg, settings),
        spill=True,  # a job's trainer keeps its best model in the snapshot store's files (engine.spill)
    )
    if shards:
        return sharded_estimate(est)
    if init_from is None:
        return est
    from engine.warmstart import with_warm_start

    return with_warm_start(est, extra)


SHARDED_LOCAL_PARTS = ("baseline", "data", "evaluation")
"""What a ray job's trainer process holds on this machine: the model, its optimizer, tables and step buffers live in
the shards on the Ray nodes."""


def sharded_estimate(est: MemoryEstimate) -> MemoryEstimate:
    """A ray job's charge on this machine: its driver process (the estimate's baseline, data and evaluation parts)
    and the merged model the service maps to serve its snapshots."""
    return MemoryEstimate({k: v for k, v in est.parts.items() if k in SHARDED_LOCAL_PARTS}, est.serving, est.fields)


def shard_estimate(config: SlideConfig, train: DatasetRow, test: DatasetRow | None, shards: int) -> int:
    """Bytes one shard actor of a ray job needs on its node: a trainer over its slice of the labels (the widest one)
    with its own validation rows and scratch."""
    from engine.distributed.shard import shard_config

    est = estimate_memory(
        shard_config(config, train.num_labels),
        train.num_points,
        train.num_features,
        -(-train.num_labels // max(1, shards)),
        nnz=train.nnz,
        label_entries=int(round(train.avg_labels_per_point * train.num_points)),
        eval_points=0,
        threads=max(1, config.threads or 1),
    )
    return est.trainer


def check_shards(
    config: SlideConfig, train: DatasetRow, test: DatasetRow | None, shards: int, settings: Settings
) -> int:
    """A ray job's per-shard estimate; raises MemoryLimitExceeded when it exceeds SLIDE_RAY_SHARD_MEMORY (if set)."""
    need = shard_estimate(config, train, test, shards)
    limit = settings.ray_shard_memory
    if limit is not None and need > int(limit):
        raise MemoryLimitExceeded(
            f"each of the job's {shards} shards needs an estimated {format_bytes(need)} of memory, more than "
            f"SLIDE_RAY_SHARD_MEMORY = {format_bytes(int(limit))}. Use more shards (backend.shards), or raise "
            "SLIDE_RAY_SHARD_MEMORY if the Ray nodes have the memory.",
            loc=("body", "backend", "shards"),
            estimated_memory_bytes=need,
            limit_bytes=int(limit),
            fields=["shards"],
            memory_breakdown={"shard": need},
        )
    return need


def drivers(
    config: SlideConfig, train: DatasetRow, test: DatasetRow | None, settings: Settings, est: MemoryEstimate
) -> list[tuple[str, int]]:
    """(field, bytes saved by its default value) for each setting that, left at its default, would make the
    estimate smaller by at least 1%, largest first; else the fields of the estimate's largest part."""
    defaults = SlideConfig()
    found: list[tuple[str, int]] = []
    for path in setting_paths():
        if setting(config, path) == setting(defaults, path):
            continue
        try:
            other = estimate_job(with_settings(config, {path: setting(defaults, path)}), train, test, settings)
        except (ConfigError, ValueError):
            continue
        saved = est.total - other.total
        if saved >= est.total / 100:
            found.append((path, saved))
    if found:
        return sorted(found, key=lambda kv: -kv[1])
    largest = max(est.parts, key=lambda k: est.parts[k])
    return [(name, 0) for name in est.fields.get(largest, ())[:3]]


def check_fits(
    config: SlideConfig,
    train: DatasetRow,
    test: DatasetRow | None,
    settings: Settings,
    what: str = "this job",
    init_from: str | None = None,
    shards: int = 0,
) -> MemoryEstimate:
    """The job's estimate; raises MemoryLimitExceeded when it alone exceeds SLIDE_MAX_JOB_MEMORY (and, for a job on
    Ray, when a shard exceeds SLIDE_RAY_SHARD_MEMORY)."""
    if shards:
        check_shards(config, train, test, shards, settings)
    est = estimate_job(config, train, test, settings, init_from, shards)
    limit = int(settings.max_job_memory)
    if est.total <= limit:
        return est
    found = drivers(config, train, test, settings, est)
    named = ", ".join(
        f"{name}={_shown(setting(config, name))}" + (f" ({format_bytes(saved)} more than its default)" if saved else "")
        for name, saved in found
    )
    detail = (
        f"{what} needs an estimated {est.describe()} of memory, more than SLIDE_MAX_JOB_MEMORY = {format_bytes(limit)}."
        f" What drives it: {named or 'the dataset'} on a training set of {train.num_features:,} features and "
        f"{train.num_labels:,} labels. Use smaller values (narrower model.hidden layers, a smaller "
        "optimizer.batch_size, bfloat16 model.weight_dtype and optimizer.moment_dtype), or raise "
        "SLIDE_MAX_JOB_MEMORY on a machine with the memory."
    )
    raise MemoryLimitExceeded(
        detail,
        loc=("body", "config", *found[0][0].split(".")) if found else ("body", "config"),
        estimated_memory_bytes=est.total,
        limit_bytes=limit,
        fields=[name for name, _ in found],
        memory_breakdown=est.breakdown(),
    )


def _shown(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


@dataclass(frozen=True)
class QueueSlot:
    position: int
    """1 = next to start."""
    reason: str
    start: bool
    """It fits now: the supervisor starts it."""
    too_large: bool = False
    """Its estimate alone exceeds the limit: it can never start (the supervisor fails it)."""


def plan_queue(
    running: list[int | None], queued: list[tuple[JobRow, int | None]], settings: Settings
) -> dict[str, QueueSlot]:
    """Which queued jobs (oldest first, with their estimates) start now beside the running ones (their estimates),
    and why the others wait. First come, first served: a job that does not fit yet keeps the later ones waiting,
    so a large job is never overtaken indefinitely. An unknown estimate (a deleted dataset) counts as 0."""
    limit = int(settings.max_job_memory)
    free = limit - sum(e or 0 for e in running)
    slots = settings.max_concurrent_jobs - len(running)
    plan: dict[str, QueueSlot] = {}
    blocked_by: str | None = None
    for position, (job, est) in enumerate(queued, start=1):
        need = est or 0
        if need > limit:
            plan[job.id] = QueueSlot(
                position,
                f"needs an estimated {format_bytes(need)}, more than SLIDE_MAX_JOB_MEMORY = {format_bytes(limit)}",
                False,
                too_large=True,
            )
            continue
        if blocked_by is not None:
            reason = f"waiting behind job {blocked_by}, earlier in the queue"
        elif slots <= 0:
            reason = (
                f"waiting for a free slot: {settings.max_concurrent_jobs} job(s) training (SLIDE_MAX_CONCURRENT_JOBS)"
            )
        elif need > free:
            reason = (
                f"waiting for memory: needs an estimated {format_bytes(need)}, {format_bytes(max(0, free))} of "
                f"SLIDE_MAX_JOB_MEMORY = {format_bytes(limit)} is free beside {len(running)} running job(s)"
            )
        else:
            plan[job.id] = QueueSlot(position, "starting", True)
            free -= need
            slots -= 1
            continue
        blocked_by = blocked_by or job.id
        plan[job.id] = QueueSlot(position, reason, False)
    return plan
