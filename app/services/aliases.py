"""Aliases: stable names for a model version (`version` set) or for a model's newest version (`version` null).

An alias is one database row, so moving it is one UPDATE: a request resolves it once, then predicts with the
version it resolved, even if the alias moves meanwhile (the registry keeps that version's maps open). A pinned
version is kept on disk beyond SLIDE_SNAPSHOT_KEEP by a pin file in the job's snapshot store
(`engine.SnapshotStore.pin`), written before the row points at it and released after the row moves away.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import select

import engine
from app.db import AliasRow, Database, JobRow, utcnow
from app.services.errors import InvalidContent, NotFound
from app.services.pagination import decode_cursor, encode_cursor
from app.services.registry import VersionGone
from app.settings import Settings


@dataclass(frozen=True)
class Resolved:
    alias: str
    model_id: str
    version: int | None


class AliasService:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self._lock = threading.Lock()  # one alias change at a time in this process: pins follow rows in order

    def _store(self, model_id: str) -> engine.SnapshotStore:
        return engine.SnapshotStore(self.settings.snapshots_dir(model_id), keep=self.settings.snapshot_keep)

    def put(self, name: str, model_id: str, version: int | None) -> tuple[AliasRow, bool]:
        """Point `name` at a model version (or the newest); returns (row, created). Blocking."""
        with self._lock:
            with self.db.session() as s:
                if s.get(JobRow, model_id) is None:
                    raise NotFound("model", model_id)
                old = s.get(AliasRow, name)
                old_target = (old.model_id, old.version) if old is not None else None
            if version is not None:
                store = self._store(model_id)
                try:
                    store.pin(name, int(version))
                except engine.SnapshotError:
                    raise VersionGone(model_id, int(version), store.versions()) from None
            try:
                with self.db.session() as s:
                    if s.get(JobRow, model_id) is None:  # deleted meanwhile (deleting checks aliases in one step)
                        raise NotFound("model", model_id)
                    row = s.get(AliasRow, name)
                    created = row is None
                    if row is None:
                        row = AliasRow(name=name, model_id=model_id, version=version)
                        s.add(row)
                    else:
                        row.model_id, row.version, row.updated_at = model_id, version, utcnow()
                    s.flush()
                    s.refresh(row)
            except BaseException:
                if version is not None and (old_target is None or old_target[0] != model_id):
                    self._store(model_id).unpin(name)
                raise
            if old_target is not None and old_target[1] is not None and old_target != (model_id, version):
                if old_target[0] != model_id or version is None:
                    self._store(old_target[0]).unpin(name)  # same model, new version: pin() replaced it already
            return row, created

    def get(self, name: str) -> AliasRow:
        with self.db.session() as s:
            row = s.get(AliasRow, name)
        if row is None:
            raise NotFound("alias", name)
        return row

    def resolve(self, name: str) -> Resolved:
        row = self.get(name)
        return Resolved(row.name, row.model_id, row.version)

    def delete(self, name: str) -> None:
        with self._lock:
            with self.db.session() as s:
                row = s.get(AliasRow, name)
                if row is None:
                    raise NotFound("alias", name)
                target = (row.model_id, row.version)
                s.delete(row)
            if target[1] is not None:
                self._store(target[0]).unpin(name)

    def page(self, limit: int, cursor: str | None) -> tuple[list[AliasRow], str | None]:
        """Aliases by name."""
        q = select(AliasRow).order_by(AliasRow.name)
        if cursor:
            (after,) = decode_cursor(cursor, (str,))
            q = q.where(AliasRow.name > after)
        with self.db.session() as s:
            rows = list(s.scalars(q.limit(limit + 1)))
        if len(rows) > limit:
            rows = rows[:limit]
            return rows, encode_cursor(rows[-1].name)
        return rows, None

    def by_model(self, model_id: str) -> list[AliasRow]:
        with self.db.session() as s:
            return list(s.scalars(select(AliasRow).where(AliasRow.model_id == model_id).order_by(AliasRow.name)))


def check_alias_name(name: str) -> None:
    import re

    from app.schemas import ALIAS_PATTERN

    if not re.match(ALIAS_PATTERN, name):
        raise InvalidContent(
            f"alias {name[:80]!r}: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            loc=("path", "alias"),
        )
