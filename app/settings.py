"""Service settings: one object, read from `SLIDE_*` environment variables (or a `.env` file), refused at start-up
when a value is out of range."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PositiveSeconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Settings(BaseSettings):
    """Everything the service can be told. Env names are the field names upper-cased with `SLIDE_` in front."""

    model_config = SettingsConfigDict(
        env_prefix="SLIDE_", env_file=".env", extra="ignore", frozen=True, use_attribute_docstrings=True
    )

    data_dir: Path = Path("./data")
    """Arrays live here: uploaded datasets, job snapshots, the default SQLite database."""
    database_url: str = ""
    """SQLAlchemy URL; empty = SQLite at `<data_dir>/slide.db`. PostgreSQL works too: `pip install -e
    '.[postgres]'`, then `postgresql+psycopg://user@host/db`."""

    max_upload_bytes: ByteSize = ByteSize(2 * 1024**3)
    """Largest dataset accepted, counted both as bytes received and as bytes after gzip inflation (e.g. `512MiB`)."""
    min_free_disk: ByteSize = ByteSize(256 * 1024**2)
    """/readyz reports the data dir as full (503) when less than this is free on its file system (e.g. `1GiB`)."""
    snapshot_interval_s: PositiveSeconds = 30.0
    """A training job publishes a snapshot (weights + hash tables) this often; a killed trainer loses at most this."""
    snapshot_keep: int = Field(3, ge=1, le=100)
    """Snapshot versions kept per job (older ones are pruned by the trainer)."""
    trainer_threads: int = Field(0, ge=0, le=1024)
    """Numba threads per training process when the job's config leaves `threads` null (0 = all cores)."""
    trainer_nice: int = Field(10, ge=0, le=19)
    """Niceness added to training processes: when predictions and training want the same cores, predictions (a
    user waiting) get them first and training (throughput) takes the rest; 0 = the service's own priority."""
    max_concurrent_jobs: int = Field(1, ge=1, le=64)
    """Jobs training at once; the rest wait in `queued`."""
    max_job_memory: ByteSize = Field(default_factory=lambda: default_job_memory())
    """Memory the training jobs may use together, by their estimates (e.g. `8GiB`). A job whose estimate exceeds it is
    refused (422); one that fits alone but not beside the running jobs waits in `queued`. Each trainer is held to its
    own estimate plus a margin."""
    ray_address: str | None = None
    """A Ray cluster for jobs that ask for `"backend": {"kind": "ray", "shards": P}` (their output layer split by
    label over P actors): `ray://head:10001`, `auto` (this machine is a node of the cluster), or `local` (start
    Ray on this machine). The nodes must see the data dir at the same path. Unset = such jobs are refused (422).
    Needs `pip install -e '.[ray]'`."""
    ray_shard_memory: ByteSize | None = None
    """Memory one shard of a ray job may use on a Ray node, by its estimate (e.g. `16GiB`): a job whose shards need
    more is refused (422); each shard reserves its estimate from Ray's `memory` resource. Unset = not checked."""
    auto_resume: bool = True
    """On start-up, resume jobs that were training when the service stopped (else they stay `interrupted`)."""

    api_key: SecretStr | None = None
    """When set, every endpoint needs the header `X-API-Key: <key>`, except /healthz, /readyz, the API description
    (/docs, /redoc, /openapi.json: Swagger loads it before you can authorize; with a key it names no real ids) and
    the console's static pages (/ui, which ask for the key and keep it for the browser tab)."""

    predict_max_instances: int = Field(1024, ge=1)
    """Most instances in one predict request."""
    predict_max_k: int = Field(1000, ge=1)
    """Largest `k` a predict request may ask for."""
    predict_concurrency: int = Field(0, ge=0, le=1024)
    """Predict requests computed at once; more wait their turn without holding a thread. Each one computing holds
    scratch buffers the size of the output layer, so this bounds memory and threads under load. 0 = 2 x CPU cores."""
    pinned_cache_memory: ByteSize = Field(ByteSize(2**30))
    """Process memory that exact versions kept loaded for pinned requests (an alias, or `version` in the body) may
    hold beyond their mapped files, e.g. `1GiB`. A version read with its files mapped holds almost none; one built
    from label-edit deltas holds its own output layer and tables (~260 MB at 670k labels). Past the limit the least
    recently used versions are dropped (and read again when asked for); at most 8 are kept in any case."""
    predict_inline_max_instances: int = Field(4, ge=0, le=64)
    """A predict request of up to this many instances, scored through the hash tables (or against a small output
    layer), is answered on the event loop, without the hop to a predict thread that would cost more than its
    sub-millisecond work, once its model is loaded. 0 = every request in a predict thread."""

    progress_interval_s: PositiveSeconds = 1.0
    """How often a training process records its progress (step, samples/s) and checks for a stop request."""
    events_poll_s: PositiveSeconds = 0.5
    """How often the Server-Sent Events stream looks for new metrics."""
    supervisor_poll_s: PositiveSeconds = 0.5
    """How often the supervisor reaps finished trainer processes and starts queued jobs."""
    shutdown_grace_s: PositiveSeconds = 20.0
    """On shutdown, running trainers checkpoint and exit; after this long they are killed."""

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @field_validator("ray_address", "ray_shard_memory", mode="before")
    @classmethod
    def _empty_ray_setting_is_none(cls, v: object) -> object:
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @field_validator("max_upload_bytes")
    @classmethod
    def _positive_limit(cls, v: ByteSize) -> ByteSize:
        if v < 1:
            raise ValueError("max_upload_bytes must be >= 1 byte (e.g. 2GiB)")
        return v

    @field_validator("max_job_memory")
    @classmethod
    def _enough_memory(cls, v: ByteSize) -> ByteSize:
        if v < 2**26:
            raise ValueError("max_job_memory must be at least 64MiB: a trainer process alone takes ~200 MB")
        return v

    @field_validator("data_dir")
    @classmethod
    def _dir_not_file(cls, v: Path) -> Path:
        if v.exists() and not v.is_dir():
            raise ValueError(f"data_dir {v} exists and is not a directory")
        return v.expanduser().resolve()

    @model_validator(mode="after")
    def _default_database(self) -> Settings:
        if not self.database_url:
            db = (self.data_dir / "slide.db").resolve()
            object.__setattr__(self, "database_url", f"sqlite:///{db}")
        return self

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def snapshots_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "snapshots"

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.datasets_dir / dataset_id


def physical_memory() -> int:
    """Bytes of memory this process can use: the machine's, or its cgroup's (container) limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return int(total)


def default_job_memory() -> ByteSize:
    """Half of `physical_memory()`: the other half is for the API process, the models it serves, the page cache."""
    return ByteSize(physical_memory() // 2)


# ------------------------------------------------------------------------------------------ the README's table

TABLE_START = "<!-- settings-table: generated by `python -m app.settings --readme`; do not edit by hand -->"
TABLE_END = "<!-- settings-table end -->"


def _shown_default(name: str, value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, ByteSize):
        for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value % size == 0:
                return f"`{value // size}{unit}`"
        return f"`{int(value)}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, Path):
        return f"`{value.as_posix() if value.is_absolute() else './' + value.as_posix()}`"
    if value == "":
        return "empty"
    return f"`{value}`"


_FACTORY_DEFAULTS = {"max_job_memory": "half the machine's (or container's) memory"}


def settings_table() -> str:
    """Markdown: one row per setting (variable, default, meaning), from the fields and their docstrings."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    prefix = Settings.model_config.get("env_prefix", "")
    for name, field in Settings.model_fields.items():
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        shown = _shown_default(name, field.default) if field.default_factory is None else _FACTORY_DEFAULTS[name]
        rows.append(f"| `{prefix}{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows)


def readme_with_table(readme: str) -> str:
    """`readme` with the text between the table markers replaced by `settings_table()`."""
    start, end = readme.index(TABLE_START), readme.index(TABLE_END)
    return readme[: start + len(TABLE_START)] + "\n" + settings_table() + "\n" + readme[end:]


if __name__ == "__main__":  # python -m app.settings [--readme]: print the table, or rewrite README.md's copy
    import sys

    if sys.argv[1:] == ["--readme"]:
        path = Path(__file__).resolve().parents[1] / "README.md"
        path.write_text(readme_with_table(path.read_text()))
    else:
        print(settings_table())
