"""Keyset pagination for the lists: newest first by (created_at, id), an opaque cursor naming the last item seen.

A cursor stays valid while items are added or deleted (a page never repeats or skips an item that existed
throughout), unlike an offset.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.services.errors import InvalidContent

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def encode_cursor(*parts: Any) -> str:
    raw = json.dumps([p.isoformat() if isinstance(p, dt.datetime) else p for p in parts], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kinds: tuple[type, ...]) -> list[Any]:
    """The parts of a cursor, checked against `kinds` (dt.datetime, str, int); 422 naming `cursor` otherwise."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        parts = json.loads(raw)
        if not isinstance(parts, list) or len(parts) != len(kinds):
            raise ValueError("wrong shape")
        out: list[Any] = []
        for kind, part in zip(kinds, parts, strict=True):
            if kind is dt.datetime:
                value = dt.datetime.fromisoformat(part)
                out.append(value if value.tzinfo else value.replace(tzinfo=dt.UTC))
            elif kind is int:
                if not isinstance(part, int) or isinstance(part, bool):
                    raise ValueError("not an integer")
                out.append(part)
            else:
                if not isinstance(part, str):
                    raise ValueError("not a string")
                out.append(part)
        return out
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidContent(
            f"cursor: not a cursor this list returned ({exc}); pass the `next_cursor` of the previous page",
            loc=("query", "cursor"),
        ) from None


def page_by_created(
    s: Session, model: Any, limit: int, cursor: str | None, where: Any = None
) -> tuple[list[Any], str | None]:
    """One page of `model` rows, newest first; returns (rows, next_cursor or None)."""
    q = select(model).order_by(model.created_at.desc(), model.id.desc())
    if where is not None:
        q = q.where(where)
    if cursor:
        t, ident = decode_cursor(cursor, (dt.datetime, str))
        q = q.where(or_(model.created_at < t, and_(model.created_at == t, model.id < ident)))
    rows = list(s.scalars(q.limit(limit + 1)))
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1].created_at, rows[-1].id)
    return rows, None
