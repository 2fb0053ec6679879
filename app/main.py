"""The ASGI app: `uvicorn app.main:app`. Tests build their own with `create_app(Settings(...))`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

import engine
from app.api import api_router
from app.docs import install_docs
from app.errors import install_error_handlers
from app.openapi import install_openapi
from app.services.container import Services
from app.services.telemetry import MetricsMiddleware
from app.settings import Settings
from app.ui import install_ui

DESCRIPTION = """
**SLIDE** (Sub-LInear Deep learning Engine): extreme multi-label classification trained on CPUs, with
locality-sensitive hashing choosing which output neurons each point touches.

Try it in order: **1.** `POST /v1/datasets` (pick a file in the Extreme Classification Repository format;
`make demo` uploads a synthetic one) → **2.** `POST /v1/jobs` with the dataset `id` → **3.** `GET /v1/jobs/{id}`
to watch progress → **4.** `POST /v1/models/{id}/predict` (the job id) — answers come from the newest snapshot
and improve while it trains → **5.** `POST /v1/jobs/{id}/stop` and `/resume`.

Errors are `application/problem+json` (RFC 9457). When the service has an API key, use **Authorize**.
The console at [/ui](/ui) shows datasets, jobs with their live training curves, and answers queries.
"""

TAGS = [
    {"name": "datasets", "description": "Training and evaluation data, uploaded as files (streamed)."},
    {"name": "jobs", "description": "Training runs, each in its own process; stop, resume, live metrics."},
    {"name": "models", "description": "One model per job, served from its newest snapshot or a retained version."},
    {"name": "aliases", "description": "Stable names for a model version (or a model's newest); predict through them."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
]


def _configure_logging() -> None:
    logger = logging.getLogger("app")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Nothing is opened until the lifespan starts (database, data dir, job supervisor)."""
    settings = settings or Settings()
    services = Services.build(settings)
    _configure_logging()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(services.start)
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(services.close)

    app = FastAPI(
        title="SLIDE service",
        version=engine.__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        docs_url=None,  # served by install_docs, from local assets
        redoc_url=None,
        swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
    )
    app.state.services = services
    install_error_handlers(app)
    install_openapi(app, services)
    app.include_router(api_router)
    install_docs(app)
    install_ui(app)
    app.add_middleware(MetricsMiddleware, telemetry=services.telemetry)
    return app


app = create_app()
