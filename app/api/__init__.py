"""The routers, joined in one place. Everything but the health endpoints sits behind the optional API key."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api import aliases, datasets, events, health, jobs, labels, metrics, models
from app.api.deps import require_api_key

api_router = APIRouter()
api_router.include_router(health.router)
protected = [Depends(require_api_key)]
for module in (datasets, jobs, events, models, labels, aliases, metrics):
    api_router.include_router(module.router, dependencies=protected)
api_router.include_router(models.evaluations_router, dependencies=protected)

__all__ = ["api_router"]
