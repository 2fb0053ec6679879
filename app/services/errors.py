"""Domain errors raised by the services. They know nothing of HTTP: `app.errors` maps them to status codes in one table."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class. `extra` holds machine-readable details (the field, line or limit at fault)."""

    def __init__(self, detail: str, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.extra = {k: v for k, v in extra.items() if v is not None}


class NotFound(ServiceError):
    def __init__(self, kind: str, ident: str):
        super().__init__(f"no {kind} with id {ident!r}", resource=kind, id=ident)


class Conflict(ServiceError):
    """The request is valid but the resource's current state does not allow it."""


class PayloadTooLarge(ServiceError):
    def __init__(self, limit: int, what: str = "dataset"):
        super().__init__(
            f"the {what} is larger than the limit of {limit} bytes (SLIDE_MAX_UPLOAD_BYTES); "
            "split it or raise the limit",
            limit_bytes=limit,
        )


class InvalidContent(ServiceError):
    """The request is well-formed but its content is not acceptable (bad dataset line, feature id out of range...).

    `loc` is the path to the value at fault, e.g. ("body", "instances", 3, "indices", 2).
    """

    def __init__(self, detail: str, *, loc: tuple[str | int, ...] | None = None, **extra: Any):
        super().__init__(detail, **extra)
        self.loc = loc


class UnsupportedMediaType(ServiceError):
    pass


class NotReady(ServiceError):
    """The resource exists but cannot serve yet (e.g. a model before its first snapshot)."""

    def __init__(self, detail: str, retry_after_s: int | None = None, **extra: Any):
        super().__init__(detail, **extra)
        self.retry_after_s = retry_after_s
