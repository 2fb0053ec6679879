"""The services of one app instance, built from its settings; started and closed by the app's lifespan."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from app.db import Database
from app.services.aliases import AliasService
from app.services.datasets import DatasetService
from app.services.evaluations import EvaluationService
from app.services.jobs import JobService, Supervisor
from app.services.labels import LabelService
from app.services.registry import ModelRegistry
from app.services.telemetry import Telemetry
from app.settings import Settings

log = logging.getLogger("app")


@dataclass
class Services:
    settings: Settings
    db: Database
    datasets: DatasetService
    jobs: JobService
    supervisor: Supervisor
    registry: ModelRegistry
    telemetry: Telemetry
    aliases: AliasService
    evaluations: EvaluationService
    labels: LabelService

    @classmethod
    def build(cls, settings: Settings) -> Services:
        """No I/O here: the app object can be created (e.g. imported by uvicorn) before anything is opened."""
        db = Database(settings.database_url)
        supervisor = Supervisor(settings, db)
        datasets = DatasetService(settings, db)
        registry = ModelRegistry(settings)
        jobs = JobService(settings, db, supervisor)
        labels = LabelService(settings, jobs, registry)
        supervisor.exit_hooks.append(labels.settle)  # label requests a trainer left are applied once it is gone
        return cls(
            settings=settings,
            db=db,
            datasets=datasets,
            jobs=jobs,
            supervisor=supervisor,
            registry=registry,
            telemetry=Telemetry(db),
            aliases=AliasService(settings, db),
            evaluations=EvaluationService(settings, db, datasets, registry),
            labels=labels,
        )

    def start(self) -> None:
        """Open the data dir and database, clean up after a crash, recover and supervise jobs. Blocking."""
        for d in (self.settings.data_dir, self.settings.datasets_dir, self.settings.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db.create_schema()
        self.supervisor.start()
        if self.supervisor.active:  # only the process that owns the data dir cleans it
            self.datasets.sweep()
        log.info(
            "SLIDE service ready: data dir %s, database %s",
            self.settings.data_dir,
            self.db.engine.url.render_as_string(hide_password=True),
        )

    def close(self) -> None:
        self.supervisor.shutdown()
        self.db.dispose()
