"""Request/response schemas (pydantic), kept apart from the DB rows and engine objects.

The job `config` schema is generated from `engine.SlideConfig`: one object per settings group, same fields, same
defaults, same descriptions, so the two cannot drift apart. Range checks stay in the engine
(`SlideConfig.from_dict`), whose `ConfigError.field` becomes the `field` of the 422 problem.

Request bodies are strict: JSON types as the schema states them (`true` is not an integer, `"5"` is not a number),
so what the OpenAPI document promises to refuse is refused.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import inspect
import itertools
import json
import typing
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from app.db import METRIC_FIELDS
from app.domain import JobState
from engine import SlideConfig
from engine.config import (
    BOUNDS,
    FLAT_NAMES,
    GROUPS,
    LEGACY,
    MAX_HIDDEN_LAYERS,
    Bounds,
    ConfigError,
    check_setting,
    nest_flat_names,
)
from engine.progress import TrainingMetrics

EXAMPLE_ID = "3f2c9a7e5b1d4c8e9f0a1b2c3d4e5f60"

# --------------------------------------------------------------------------------------------------- problems


class Problem(BaseModel):
    """RFC 9457 problem details (served as `application/problem+json`)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["urn:slide:problem:invalid-content"])
    title: str = Field(examples=["Invalid content"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["line 7: expected 'feature:value', got '12-0.5'"])
    instance: str | None = Field(None, examples=["/v1/datasets"])
    field: str | None = Field(
        None, description="Dotted path of the first value at fault.", examples=["body.config.sampling.hash_l"]
    )
    line: int | None = Field(
        None, description="Dataset uploads and malformed JSON: 1-based line at fault (a dataset's header is line 1)."
    )
    column: int | None = Field(None, description="Dataset uploads and malformed JSON: 1-based column, when known.")
    errors: list[dict[str, Any]] | None = Field(None, description="One `{loc, msg, type}` per invalid value.")
    reason: str | None = Field(None, description="507: the storage fault, as an errno name.", examples=["ENOSPC"])


# --------------------------------------------------------------------------------------------------- datasets


class DatasetPublic(BaseModel):
    id: str = Field(examples=[EXAMPLE_ID])
    name: str = Field(examples=["tiny-train"])
    num_points: int = Field(examples=[2000])
    num_features: int = Field(examples=[500])
    num_labels: int = Field(examples=[100])
    nnz: int = Field(description="Stored feature values over all points.", examples=[30000])
    avg_labels_per_point: float = Field(examples=[2.1])
    avg_features_per_point: float = Field(examples=[15.0])
    bytes: int = Field(description="Size of the uploaded file as received (compressed if it was sent gzipped).")
    created_at: dt.datetime
    format: Literal["xmc", "jsonl"] = Field(
        "xmc", description="`jsonl`: uploaded as text; the dataset holds a fitted featurizer (or its `like` set's)."
    )
    label_names: bool = Field(
        False, description="Its labels have names (from a JSONL upload or `PUT /v1/datasets/{id}/label-names`)."
    )
    like_dataset_id: str | None = Field(
        None, description="A `like` set: the dataset whose featurizer and label vocabulary featurized it."
    )
    unknown_labels: int | None = Field(
        None,
        description="A `like` set: label names (occurrences) missing from the training set's vocabulary; they "
        "were dropped, not added as new labels.",
    )


NEXT_CURSOR = Field(
    None,
    description="Pass as `cursor` to get the next page; null on the last page.",
    examples=["eyJ0IjoiMjAyNi0wMS0wMVQwMDowMDowMCIsImkiOiJhYmMifQ"],
)


class DatasetList(BaseModel):
    data: list[DatasetPublic]
    count: int = Field(description="Items in this page.")
    next_cursor: str | None = NEXT_CURSOR


# --------------------------------------------------------------------------------------------------- job config


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """`field: T = default` followed by a string literal: the string documents the field (PEP 257 style)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _group_model(name: str, cls: type) -> type[BaseModel]:
    """The schema of one settings group (or, with name "", of SlideConfig's run-level settings): the dataclass's
    fields, defaults and attribute docstrings, with the ranges of engine.config.BOUNDS."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docstrings(cls)
    defaults = SlideConfig().to_dict()
    defaults = defaults[name] if name else defaults
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in GROUPS and not name:
            continue
        path = f"{name}.{f.name}" if name else f.name
        tp = hints.get(f.name, Any)
        bounds = BOUNDS.get(path)
        limits: dict[str, Any] = _limits(bounds) if bounds is not None else {}
        arrays = [a for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is tuple]
        if arrays:  # JSON has arrays, not tuples; the bounds are the items'; null = auto where the field allows it
            (item, *_rest) = typing.get_args(arrays[0]) or (Any,)
            items = Annotated[
                list[Annotated[item, Field(**limits)]],  # type: ignore[valid-type]
                Field(min_length=1, max_length=MAX_HIDDEN_LAYERS),
            ]
            tp = items | None if type(None) in typing.get_args(tp) else items
            limits = {}
        elif bounds is not None and tp not in (int, float):  # a number, or null (auto) and/or a word
            tp, limits = _setting_type(path, tp, limits, defaults[f.name]), {}
        description = docs.get(f.name)
        if bounds is not None:
            description = f"{description or ''}\n\nRange: {bounds}.".strip()
        if path in LEGACY:
            old = ", ".join(f"{n} (= {json.dumps(v)})" for n, v in LEGACY[path].items())
            description = f"{description or ''}\n\nDeprecated, still accepted for one release: {old}."
        # pydantic copies list defaults
        fields[f.name] = (tp, Field(defaults[f.name], description=description, **limits))
    return create_model(
        cls.__name__,
        __config__=ConfigDict(
            extra="forbid", strict=True, json_schema_extra={"description": inspect.cleandoc(cls.__doc__ or "")}
        ),
        **fields,
    )


class _FlatNames(BaseModel):
    """Reads the flat setting names of the previous release (engine.config.FLAT_NAMES) as their paths, and keeps a
    deprecation note per name it moved in `flat_name_notes()`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    FORMER_NAMES: typing.ClassVar[dict[str, str]] = FLAT_NAMES
    """Read by the 422 handler: an unknown name close to a former one is pointed to its path."""

    _flat_notes: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _nest_flat_names(cls, data: Any, handler: Any) -> Any:
        notes: list[str] = []
        if isinstance(data, dict):
            try:
                data, notes = nest_flat_names(data)
            except ConfigError as exc:  # a setting given both ways: the 422 names the former name, to drop
                former = next(name for name, path in FLAT_NAMES.items() if path == exc.field)
                message = str(exc).split(": ", 1)[-1]
                error = PydanticCustomError("value_error", "{message}", {"message": message})
                raise ValidationError.from_exception_data(
                    cls.__name__, [InitErrorDetails(type=error, loc=(former,), input=data[former])]
                ) from exc
        model = handler(data)
        model._flat_notes = notes
        return model

    def flat_name_notes(self) -> list[str]:
        return list(self._flat_notes)


def _config_model() -> type[BaseModel]:
    """The job `config` schema: one object per settings group (engine.config.GROUPS), then the run-level
    settings; the flat names of the previous release are read too (`_FlatNames`)."""
    run = _group_model("", SlideConfig)
    docs = _attribute_docstrings(SlideConfig)
    fields: dict[str, Any] = {}
    for name, cls in GROUPS.items():
        group = _group_model(name, cls)
        fields[name] = (group, Field(default_factory=group, description=docs.get(name)))
    fields.update({k: (f.annotation, f) for k, f in run.model_fields.items()})
    return create_model(
        "SlideConfig",
        __base__=_FlatNames,
        __doc__=inspect.cleandoc(SlideConfig.__doc__ or "")
        + "\n\nThe flat names of the previous release (`hash_l` for `sampling.hash_l`, `predict_hubs` for "
        "`predict.hubs`) are still read for one release; the answer's `deprecations` lists each one given.",
        **fields,
    )


def _setting_type(name: str, tp: Any, limits: dict[str, Any], default: Any) -> Any:
    """The type of a setting that is a bounded number or null (auto) or its word, plus the numbers it took before
    (engine.config.LEGACY), which a job body may still send (the service reads them as what they meant). One
    validator checks it as SlideConfig does, so an error names the field and its range."""
    args = typing.get_args(tp)
    number = next(a for a in args if a in (int, float))
    words = [w for a in args if typing.get_origin(a) is Literal for w in typing.get_args(a)]
    legacy = list(LEGACY.get(name, {}))

    def validate(value: Any) -> Any:
        if type(value) is int and value in legacy:
            return value
        if value is not None and type(value) not in (number, str):
            raise ValueError(
                f"expected {'an integer' if number is int else 'a number'}, null or {words}; got {value!r}"
            )
        try:
            check_setting(name, value)
        except ConfigError as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
        return value

    schema: list[dict[str, Any]] = [{"type": "integer" if number is int else "number", **_json_limits(limits)}]
    schema += [{"const": w, "type": "string"} for w in words]
    if legacy:
        schema.append({"enum": legacy, "type": "integer", "deprecated": True})
    if type(None) in args:
        schema.append({"type": "null"})
    return Annotated[Any, PlainValidator(validate), WithJsonSchema({"anyOf": schema, "default": default})]


def _json_limits(limits: dict[str, Any]) -> dict[str, Any]:
    names = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
    return {names[k]: v for k, v in limits.items()}


def _limits(bounds: Bounds) -> dict[str, float]:
    """pydantic's (and so the OpenAPI schema's) minimum / maximum for engine.config.BOUNDS."""
    return {
        ("gt" if bounds.low_open else "ge"): bounds.low,
        ("lt" if bounds.high_open else "le"): bounds.high,
    }


if typing.TYPE_CHECKING:  # built at import time from SlideConfig's groups; its base to the type checker
    SlideConfigModel = _FlatNames
else:
    SlideConfigModel = _config_model()

# --------------------------------------------------------------------------------------------------- jobs

JOB_CONFIG_EXAMPLE = {
    "model": {"hidden": [256]},
    "sampling": {"hash_family": "dwta", "hash_k": 6, "hash_l": 50},
    "optimizer": {"batch_size": 128, "lr": 0.003},
    "schedule": {"epochs": 5},
    "predict": {"hubs": "none"},
    "seed": 0,
}


class InitFrom(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model_id: str = Field(description="The model (job id) to start from.", examples=[EXAMPLE_ID])
    version: int | None = Field(None, ge=1, description="A retained version; null = its newest.")


class JobBackend(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Literal["local", "ray"] = Field(
        "local",
        description="`local`: one trainer process on this machine. `ray`: the output layer split by label over "
        "`shards` actors of the Ray cluster in SLIDE_RAY_ADDRESS (the service must be started with it).",
    )
    shards: int = Field(1, ge=1, le=1024, description="Label shards of a `ray` job (1 for `local`).")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    train_dataset_id: str = Field(description="Id returned by `POST /v1/datasets`.", examples=[EXAMPLE_ID])
    eval_dataset_id: str | None = Field(
        None,
        description="Optional held-out dataset (same feature and label space): enables P@1 and P@5.",
    )
    config: SlideConfigModel = Field(
        default_factory=SlideConfigModel,
        description="Engine settings; omitted fields take the engine defaults.",
        examples=[JOB_CONFIG_EXAMPLE],
    )
    backend: JobBackend = Field(
        default_factory=JobBackend,
        description="Where the job trains: this machine (default) or label shards on a Ray cluster.",
        examples=[{"kind": "ray", "shards": 4}],
    )
    init_from: InitFrom | None = Field(
        None,
        description="Fine-tune: start from this model's weights, hash tables, optimizer state and featurizer "
        "instead of random ones. Its structure settings (hidden, hashing, dtypes) are kept; labels of a dataset "
        "with names are matched by name, new labels and features get new rows. The source is not modified.",
    )


def _metric_point_model() -> type[BaseModel]:
    """engine.TrainingMetrics as the API returns it: the fields the service stores (app.db.METRIC_FIELDS) in the
    same order, documented by its docstrings. `epoch` is a number (the metrics table stores it as a float); a
    field that may be None defaults to None."""
    hints = typing.get_type_hints(TrainingMetrics)
    docs = _attribute_docstrings(TrainingMetrics)
    fields: dict[str, Any] = {}
    for name in METRIC_FIELDS:
        tp = float if name == "epoch" else hints[name]
        default = None if type(None) in typing.get_args(tp) else ...
        fields[name] = (tp, Field(default, description=docs.get(name)))
    return create_model("MetricPoint", **fields)


if typing.TYPE_CHECKING:  # built at import time from engine.TrainingMetrics; a BaseModel to the type checker
    MetricPoint = BaseModel
else:
    MetricPoint = _metric_point_model()


class JobProgress(BaseModel):
    epoch: int = Field(description="Epochs completed (while training, the index of the epoch in progress).")
    epochs: int = Field(description="Epochs the job trains in total.")
    step: int
    samples: int = Field(description="Training points processed so far.")
    samples_per_s: float | None = None


class JobPublic(BaseModel):
    id: str = Field(examples=[EXAMPLE_ID])
    state: JobState
    train_dataset_id: str
    eval_dataset_id: str | None
    config: SlideConfigModel
    backend: JobBackend = Field(default_factory=JobBackend, description="Where the job trains.")
    progress: JobProgress
    latest_metrics: MetricPoint | None = None
    model_version: int | None = Field(None, description="Newest published snapshot; predictions use it.")
    queue_position: int | None = Field(
        None,
        description="For a queued job: 1 = the next to start once a training slot (SLIDE_MAX_CONCURRENT_JOBS) is "
        "free and it fits beside the running jobs in SLIDE_MAX_JOB_MEMORY; null in any other state.",
    )
    error: str | None = None
    estimated_memory_bytes: int | None = Field(
        None,
        description="Memory the job needs by the engine's estimate (its trainer at peak, plus the model served while "
        "it trains); admission counts it against SLIDE_MAX_JOB_MEMORY. None when its dataset is gone.",
        examples=[412_000_000],
    )
    memory_breakdown: dict[str, int] | None = Field(
        None,
        description="The estimate's parts in bytes: weights, optimizer, tables, step_buffers, evaluation, data, "
        "transient, baseline (the trainer process before its model) and serving.",
    )
    queue_reason: str | None = Field(
        None,
        description="Queued jobs: why it waits (a free slot, memory beside the running jobs, an earlier job).",
        examples=["waiting for memory: needs an estimated 3.10 GB, 1.20 GB of SLIDE_MAX_JOB_MEMORY = 8.00 GB is free"],
    )
    deprecations: list[str] = Field(
        default_factory=list,
        description="In the answer to POST /v1/jobs: each config setting the request gave by its former flat name, "
        "and each value it gave in a deprecated form, with what to send instead (the job runs with what it means).",
        examples=[
            [
                "hard_negatives is deprecated and will be refused in a later release; use sampling.hard_negatives",
                'sampling.hard_negatives: -1 is deprecated and will be refused in a later release; use "all"',
            ]
        ],
    )
    runs: int = Field(description="Trainer processes this job has had (1 + resumes).")
    interruptions: int = Field(description="Times the service went down while this job was training.")
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None


class JobList(BaseModel):
    data: list[JobPublic]
    count: int = Field(description="Items in this page.")
    next_cursor: str | None = NEXT_CURSOR


class MetricSeries(BaseModel):
    job_id: str
    data: list[MetricPoint]
    count: int


# --------------------------------------------------------------------------------------------------- models


class ModelVersionPublic(BaseModel):
    version: int
    step: int | None = None
    epoch: int | None = None
    samples: int | None = None
    created_at: dt.datetime | None = None
    available: bool = Field(description="Still on disk (the trainer keeps the newest few).")


class ModelPublic(BaseModel):
    id: str = Field(description="Same as the job id.", examples=[EXAMPLE_ID])
    job_state: JobState
    ready: bool = Field(description="A snapshot exists, so predict answers.")
    latest_version: int | None = None
    num_features: int | None = None
    num_labels: int | None = None
    train_dataset_id: str
    versions: list[ModelVersionPublic]
    resolved: dict[str, Any] | None = Field(
        None,
        description="What the job's settings resolve to for its data, from the newest snapshot: which layers are "
        "LSH-sampled and, per layer (`layers`, by layer number), its neurons, hash K and L, buckets per table, "
        "retrieval caps in training and serving, hubs and negatives; the training and validation points, steps "
        "per epoch and warm-up steps. Null before the first snapshot, and in the model list.",
    )


class ModelList(BaseModel):
    data: list[ModelPublic]
    count: int = Field(description="Items in this page.")
    next_cursor: str | None = NEXT_CURSOR


class EvaluationPublic(BaseModel):
    id: str
    model_id: str
    dataset_id: str
    model_version: int | None = None
    mode: str
    k: int
    state: Literal["running", "succeeded", "failed"]
    p_at_1: float | None = None
    p_at_3: float | None = None
    p_at_5: float | None = None
    ndcg_at_5: float | None = None
    psp_at_5: float | None = Field(
        None, description="Propensity-scored P@5 (the training set's label frequencies); null when that set is gone."
    )
    points: int | None = None
    recall_vs_exact: float | None = Field(
        None, description="lsh / auto: the share of the exact top-k labels this mode also returns."
    )
    seconds: float | None = Field(None, description="Time spent predicting and scoring.")
    error: str | None = None
    created_at: dt.datetime
    finished_at: dt.datetime | None = None
    status_url: str = Field(description="GET it for the state and result.")


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    dataset_id: str = Field(description="A dataset in the model's feature and label space (e.g. a `like` set).")
    k: int = Field(5, ge=1, le=100, description="Labels retrieved per point (P@1/3/5 and nDCG@5 use the top 5).")
    mode: Literal["lsh", "exact", "auto"] = "lsh"
    version: int | None = Field(None, ge=1, description="A retained version; null = the newest.")


class VersionPublic(BaseModel):
    version: int
    step: int | None = None
    epoch: int | None = None
    samples: int | None = None
    created_at: dt.datetime | None = None
    aliases: list[str] = Field(description="Aliases pinned to this version (it is kept while they point at it).")
    metrics: MetricPoint | None = Field(
        None, description="The training-time evaluation nearest before this version (held-out P@1, P@5, loss)."
    )
    evaluations: list[EvaluationPublic] = Field(
        description="Finished `POST /v1/models/{id}/evaluate` runs of this version, newest first."
    )


class VersionList(BaseModel):
    model_id: str
    data: list[VersionPublic]
    count: int = Field(description="Items in this page.")
    next_cursor: str | None = NEXT_CURSOR


ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class AliasPut(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model_id: str = Field(description="The job id whose model the alias serves.", examples=[EXAMPLE_ID])
    version: int | None = Field(
        None, ge=1, description="A retained version (kept while the alias points at it); null = always the newest."
    )


class AliasPublic(BaseModel):
    alias: str = Field(examples=["production"])
    model_id: str
    version: int | None = Field(description="The pinned version, or null for the newest.")
    model_version: int | None = Field(
        description="The version that answers now (the pinned one, or the newest); null before the first snapshot."
    )
    created_at: dt.datetime
    updated_at: dt.datetime


class AliasList(BaseModel):
    data: list[AliasPublic]
    count: int = Field(description="Items in this page.")
    next_cursor: str | None = NEXT_CURSOR


FLOAT32_MAX = float(np.finfo(np.float32).max)
# The model computes in float32: a larger value (JSON allows 1e300) would become infinity there.
Float32 = Annotated[float, Field(allow_inf_nan=False, ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


MAX_TEXT_CHARS = 10_000


class Instance(BaseModel):
    """One query: feature ids and their values (same length), or `text` for a model trained on a text dataset."""

    model_config = ConfigDict(extra="forbid", strict=True)

    indices: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(
        None,
        examples=[[0, 2, 5]],
        json_schema_extra={"uniqueItems": True},
        description="Feature ids, each below the model's `num_features`, none repeated.",
    )
    values: list[Float32] | None = Field(None, examples=[[1.0, 0.5, 0.25]])
    text: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT_CHARS,
        description="Query text (instead of indices/values), featurized with the model's own featurizer.",
        examples=["red running shoes"],
    )

    @model_validator(mode="after")
    def _same_length(self) -> Instance:
        if self.text is not None:
            if self.indices is not None or self.values is not None:
                raise ValueError("an instance has either `text` or `indices` and `values`, not both")
            if not self.text.strip():
                raise ValueError("`text` is blank")
            return self
        if self.indices is None or self.values is None:
            raise ValueError("an instance needs `indices` and `values` (or `text`)")
        if len(self.indices) != len(self.values):
            raise ValueError(
                f"indices has {len(self.indices)} entries but values has {len(self.values)}; they must pair up"
            )
        if len(set(self.indices)) != len(self.indices):
            raise ValueError("indices must not repeat a feature id")
        return self


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    instances: list[Instance] = Field(min_length=1, examples=[[{"indices": [0, 2, 5], "values": [1.0, 0.5, 0.25]}]])
    k: int = Field(5, ge=1, description="Labels returned per instance.", examples=[5])
    mode: Literal["auto", "lsh", "exact"] = Field(
        "auto",
        description="`auto`: the hash tables where the model's calibration found they recall the exact top-5 "
        "(wide output layers), every label elsewhere; `lsh`: score only the labels the hash tables retrieve "
        "(sub-linear); `exact`: score all. The response's `mode` says which answered.",
    )
    probabilities: bool = Field(
        False,
        description="Also return `probabilities`: a softmax of the returned scores, normalised over the labels "
        "returned for that instance (they sum to 1 over its top-k, not over every label).",
    )


class Prediction(BaseModel):
    labels: list[int] = Field(description="Best first; fewer than k when the hash tables retrieved fewer labels.")
    names: list[str | None] | None = Field(
        None, description="The labels' names; null when the model has none (an XMC dataset without label names)."
    )
    scores: list[float] = Field(
        description="The output layer's raw logits for those labels (before the softmax), best first: they rank "
        "labels within one answer of one model version; they are not probabilities (ask `probabilities: true`)."
    )
    probabilities: list[float] | None = Field(
        None, description="With `probabilities: true`: softmax of `scores` over the labels returned (sums to 1)."
    )
    note: str | None = Field(
        None,
        description="Why fewer than k labels came back, or that no word of the text is in the model's vocabulary.",
    )


class PredictResponse(BaseModel):
    model_id: str
    model_version: int = Field(description="The snapshot that answered (models publish newer ones as they train).")
    mode: Literal["lsh", "exact"] = Field(
        description="How the labels were scored: `lsh` (hash-table candidates) or `exact` (every label)."
    )
    alias: str | None = Field(None, description="The alias that routed the request (alias predict only).")
    predictions: list[Prediction]
    warnings: list[str] = Field(
        default_factory=list,
        description="Why some predictions have fewer than k labels: k above the model's number of labels, or hash "
        "tables that retrieved fewer candidates than k (use mode `exact` to score every label).",
    )


# --------------------------------------------------------------------------------------------------- health


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(examples=[{"database": "ok", "data_dir": "ok", "supervisor": "ok"}])


# ---- labels added and retired online --------------------------------------------------------------------------
class NewLabel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=1024, examples=["trail-running-shoes"])
    examples: list[Instance] = Field(
        min_length=1,
        max_length=1000,
        description="Points that carry the label (as predict takes them: `text`, or `indices` and `values`); the "
        "label's output row is imprinted from them (a mix of the rows of the labels the model scores highest on "
        "them).",
        examples=[[{"text": "trail running shoes"}, {"text": "waterproof trail runners"}]],
    )


class LabelsAdd(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    labels: list[NewLabel] = Field(min_length=1, max_length=1000)


class LabelsAdded(BaseModel):
    label_ids: list[int] | None = Field(
        description="Ids of the new labels, in the order of the request (null while a training job has them "
        "pending: its events report them)."
    )
    model_version: int | None = Field(description="The version that serves them (null while pending).")
    state: Literal["applied", "pending"] = Field(
        description="`applied`: served from the next request; `pending`: handed to the training job, applied at "
        "its next step and published as a snapshot (a `labels` event on the job's events stream)."
    )
    request_id: str | None = Field(None, description="For a pending request: the id its `labels` event carries.")


class LabelPublic(BaseModel):
    id: int
    name: str | None = Field(description="The label's name (null for an unnamed label of an XMC dataset).")
    status: Literal["live", "retired"]


class PendingLabelRequest(BaseModel):
    request_id: str = Field(description="The id the 202 answer gave and the request's `labels` event will carry.")
    op: Literal["add", "retire"]
    names: list[str] | None = Field(None, description="The labels it adds (`add`).")
    label_ids: list[int] | None = Field(None, description="The labels it retires (`retire`).")


class LabelList(BaseModel):
    model_id: str
    model_version: int
    data: list[LabelPublic]
    count: int = Field(description="Items in this page.")
    next_cursor: str | None = NEXT_CURSOR
    pending: list[PendingLabelRequest] = Field(
        default_factory=list,
        description="Changes handed to the job's trainer (202) that no version serves yet, oldest first: its trainer "
        "applies them at its next step; those of a trainer that exits without seeing them (killed, failed) are "
        "applied by the service to the newest version.",
    )
