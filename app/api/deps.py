"""Dependencies as named types: endpoints declare `settings: SettingsDep`, `jobs: JobsDep`, ...

They are `async def` because they only look things up: FastAPI runs a plain `def` dependency in the thread pool,
one hop per dependency per request (six on a predict request), which under load cost more than the prediction."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from app.services.aliases import AliasService
from app.services.container import Services
from app.services.datasets import DatasetService
from app.services.evaluations import EvaluationService
from app.services.jobs import JobService
from app.services.labels import LabelService
from app.services.registry import ModelRegistry
from app.services.telemetry import Telemetry
from app.settings import Settings


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.services.settings
    return settings


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_datasets(services: ServicesDep) -> DatasetService:
    return services.datasets


async def get_jobs(services: ServicesDep) -> JobService:
    return services.jobs


async def get_registry(services: ServicesDep) -> ModelRegistry:
    return services.registry


async def get_telemetry(services: ServicesDep) -> Telemetry:
    return services.telemetry


async def get_aliases(services: ServicesDep) -> AliasService:
    return services.aliases


async def get_evaluations(services: ServicesDep) -> EvaluationService:
    return services.evaluations


async def get_labels(services: ServicesDep) -> LabelService:
    return services.labels


AliasesDep = Annotated[AliasService, Depends(get_aliases)]
EvaluationsDep = Annotated[EvaluationService, Depends(get_evaluations)]
DatasetsDep = Annotated[DatasetService, Depends(get_datasets)]
JobsDep = Annotated[JobService, Depends(get_jobs)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
TelemetryDep = Annotated[Telemetry, Depends(get_telemetry)]
LabelsDep = Annotated[LabelService, Depends(get_labels)]

api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Needed on every endpoint except /healthz, /readyz and the docs when the service has SLIDE_API_KEY "
    "set.",
)


async def require_api_key(settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)]) -> None:
    expected = settings.api_key
    if expected is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise HTTPException(
            status_code=401,
            detail="missing or wrong X-API-Key header" if key else "this endpoint needs an X-API-Key header",
            headers={"WWW-Authenticate": "APIKey"},
        )
