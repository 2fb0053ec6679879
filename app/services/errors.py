"""Domain errors raised by the services.

They know nothing of HTTP: `app.errors` maps them to status codes in one table.
"""

from __future__ import annotations

import errno
import re
import resource
from typing import Any


class ServiceError(Exception):
    """Base class. `extra` holds machine-readable details (the field, line or limit at fault)."""

    def __init__(self, detail: str, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.extra = {k: v for k, v in extra.items() if v is not None}


class NotFound(ServiceError):
    def __init__(self, kind: str, ident: str):
        shown = ident if len(ident) <= 64 else ident[:64] + "..."
        super().__init__(f"no {kind} with id {shown!r}", resource=kind, id=shown)


ID_FORMAT = re.compile(r"[0-9a-f]{32}")
"""Ids the service hands out: uuid4().hex."""


def require_id(kind: str, ident: str) -> str:
    """`ident` if it has the format of an id; else NotFound, the same answer on every database backend (a NUL or
    a megabyte-long string never reaches the driver)."""
    if not isinstance(ident, str) or ID_FORMAT.fullmatch(ident) is None:
        raise NotFound(kind, str(ident))
    return ident


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


class MemoryLimitExceeded(InvalidContent):
    """A job needs more memory, by its estimate, than the service allows (SLIDE_MAX_JOB_MEMORY)."""


class UnsupportedMediaType(ServiceError):
    pass


class NotReady(ServiceError):
    """The resource exists but cannot serve yet (e.g. a model before its first snapshot)."""

    def __init__(self, detail: str, retry_after_s: int | None = None, **extra: Any):
        super().__init__(detail, **extra)
        self.retry_after_s = retry_after_s


class InsufficientStorage(ServiceError):
    """The data dir (or the database) could not be written: full, over a size limit, read-only or not permitted.
    Whatever was being written has been removed; `reason` is the errno name (ENOSPC, EFBIG, EROFS, ...)."""


# errno -> what it means for the service's data dir. Anything else is a bug, not a storage fault.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the process's file size limit (RLIMIT_FSIZE)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# SQLite result codes (sqlite3 errors carry `sqlite_errorname`) that mean the database file could not be written.
SQLITE_STORAGE_CODES = ("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CANTOPEN")


# numpy's ndarray.tofile (what np.save uses for the data) reports a short write without an errno.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def storage_cause(exc: BaseException | None) -> tuple[str, str] | None:
    """(reason, explanation) when `exc`, or an exception it was raised from, is a storage fault, e.g.
    ("ENOSPC", "no space left on the device"); None for anything else."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return errno.errorcode[exc.errno], STORAGE_ERRNOS[exc.errno]
        if isinstance(exc, OSError) and exc.errno is None and _SHORT_WRITE.search(str(exc)):
            # A regular file takes fewer bytes than written only when it cannot grow: a file size limit when
            # this process has one, else a full device (or quota).
            soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
            code = errno.EFBIG if soft != resource.RLIM_INFINITY else errno.ENOSPC
            return errno.errorcode[code], f"{STORAGE_ERRNOS[code]} (a write came up short: {exc})"
        name = getattr(exc, "sqlite_errorname", None)
        if isinstance(name, str) and name.startswith(SQLITE_STORAGE_CODES):
            return name, f"the database could not be written ({exc})"
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return None
