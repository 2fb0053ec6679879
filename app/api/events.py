"""/v1/jobs/{id}/events: the job's metrics (and state and progress changes) as Server-Sent Events, live.

Events: `metrics` (one per evaluation; `id` is its step, so a reconnecting client resumes with Last-Event-ID),
`progress` (step, epoch, samples, samples/s, model_version whenever they change), `state` (on every state
change), `labels` (labels added or retired: ids, names, the version that serves them, or the error) and a final
`end` once the job is stopped, completed, failed or interrupted.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse

from app.api.deps import JobsDep, SettingsDep
from app.api.jobs import MAX_STEP, metric_point
from app.db import JobRow, MetricRow
from app.domain import LABEL_EVENTS, TERMINAL_STATES
from app.errors import problem_responses
from app.services.errors import NotFound

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get(
    "/{job_id}/events",
    summary="Live metrics as Server-Sent Events",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "An event stream"},
        **problem_responses(401, 404),
    },
)
async def job_events(
    job_id: str,
    request: Request,
    jobs: JobsDep,
    settings: SettingsDep,
    since_step: Annotated[
        int, Query(ge=-1, le=MAX_STEP, description="Replay metrics with step > since_step first.")
    ] = -1,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", include_in_schema=False)] = None,
) -> EventSourceResponse:
    await anyio.to_thread.run_sync(jobs.get, job_id)  # 404 before the stream starts
    if last_event_id and last_event_id.lstrip("-").isdigit():
        since_step = max(since_step, min(int(last_event_id), MAX_STEP))

    def poll(after: int) -> tuple[JobRow | None, list[MetricRow], int | None]:
        try:
            job = jobs.get(job_id)
        except NotFound:
            return None, [], None
        points = jobs.metrics(job_id, since_step=after)
        return job, points, jobs.latest_versions([job_id]).get(job_id)

    label_events = settings.job_dir(job_id) / LABEL_EVENTS

    def label_lines(seen: int) -> list[str]:
        try:
            with open(label_events) as fh:
                return fh.read().splitlines()[seen:]
        except OSError:
            return []

    async def stream() -> AsyncIterator[dict[str, Any]]:
        after = since_step
        last_state = last_progress = None
        labels_seen = 0
        while True:
            job, points, version = await anyio.to_thread.run_sync(poll, after)
            if job is None:
                yield {"event": "end", "data": json.dumps({"state": "deleted"})}
                return
            for line in await anyio.to_thread.run_sync(label_lines, labels_seen):
                labels_seen += 1
                yield {"event": "labels", "data": line}
            for p in points:
                after = max(after, p.step)
                yield {"event": "metrics", "id": str(p.step), "data": metric_point(p).model_dump_json()}
            progress = {
                "step": job.step,
                "epoch": job.epoch,
                "samples": job.samples,
                "samples_per_s": job.samples_per_s,
                "model_version": version,
            }
            if progress != last_progress:
                last_progress = progress
                yield {"event": "progress", "data": json.dumps(progress)}
            if job.state != last_state:
                last_state = job.state
                yield {"event": "state", "data": json.dumps({"state": job.state, "error": job.error})}
            if job.state in TERMINAL_STATES:
                yield {"event": "end", "data": json.dumps({"state": job.state})}
                return
            if await request.is_disconnected():
                return
            await anyio.sleep(settings.events_poll_s)

    return EventSourceResponse(stream(), ping=15)
