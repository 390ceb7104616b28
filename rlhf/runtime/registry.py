"""A versioned, immutable registry of model artifacts per agent (reward models, policies).

Versions are "v1", "v2", ... per agent, allocated in the same transaction that records the row, after the
artifact folder has been renamed into place: a registered version's folder is always complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import pathlib
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Column, DateTime, Engine, Integer, MetaData, String, Table, Text, UniqueConstraint, func, select

from rlhf.runtime import validation
from rlhf.runtime.errors import NotFound
from rlhf.runtime.jobs import utcnow


def registry_table(metadata: MetaData, name: str) -> Table:
    return Table(
        name,
        metadata,
        Column("id", String(64), primary_key=True),
        Column("agent_id", String(64), nullable=False),
        Column("version_number", Integer, nullable=False),
        Column("path", Text, nullable=False),  # the version's folder
        Column("job_id", String(64), nullable=False),
        Column("info", Text, nullable=False),  # JSON: lineage, config, metrics
        Column("created_at", DateTime(timezone=True), nullable=False),
        UniqueConstraint("agent_id", "version_number", name=f"uq_{name}_version"),
    )


@dataclasses.dataclass
class Version:
    id: str
    agent_id: str
    version_number: int
    path: str
    job_id: str
    info: dict[str, Any]
    created_at: dt.datetime

    @property
    def version(self) -> str:
        return f"v{self.version_number}"


class Registry:
    """Blocking access to one registry table; `noun` names the thing in errors ("reward model")."""

    def __init__(self, engine: Engine, table: Table, noun: str) -> None:
        self.engine = engine
        self.table = table
        self.noun = noun

    def _version(self, row: Any) -> Version:
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=dt.timezone.utc)
        return Version(
            id=row.id,
            agent_id=row.agent_id,
            version_number=row.version_number,
            path=row.path,
            job_id=row.job_id,
            info=json.loads(row.info),
            created_at=created,
        )

    def register(self, agent_id: str, place: Callable[[int], str], job_id: str, info: dict[str, Any]) -> Version:
        """Allocate the next version; `place(number)` moves the artifact into place and returns its folder."""
        t = self.table
        with self.engine.begin() as conn:
            last = conn.execute(select(func.max(t.c.version_number)).where(t.c.agent_id == agent_id)).scalar()
            number = (last or 0) + 1
            path = place(number)
            conn.execute(
                t.insert().values(
                    id=uuid.uuid4().hex,
                    agent_id=agent_id,
                    version_number=number,
                    path=path,
                    job_id=job_id,
                    info=json.dumps(info),
                    created_at=utcnow(),
                )
            )
        return self.get(agent_id, f"v{number}")

    def register_folder(
        self,
        agent_id: str,
        staging: pathlib.Path,
        root: pathlib.Path,
        job_id: str,
        info: dict[str, Any],
        prepare: Callable[[pathlib.Path, int, pathlib.Path], None] | None = None,
    ) -> Version:
        """Register a finished job's staged folder as root/<agent>/v<N>; `prepare(staging, N, target)` may
        rewrite files in it first (e.g. paths that name the final place)."""

        def place(number: int) -> str:
            target = root / agent_id / f"v{number}"
            target.parent.mkdir(parents=True, exist_ok=True)
            if prepare is not None:
                prepare(staging, number, target)
            os.rename(staging, target)  # atomic on one filesystem: a version folder is complete or absent
            return str(target)

        return self.register(agent_id, place, job_id, info)

    def get(self, agent_id: str, version: str = "") -> Version:
        t = self.table
        query = select(t).where(t.c.agent_id == agent_id)
        if version in ("", "latest"):
            query = query.order_by(t.c.version_number.desc()).limit(1)
        else:
            query = query.where(t.c.version_number == int(version[1:]))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            what = (
                f"has no {self.noun} yet; train one first"
                if version in ("", "latest")
                else f"has no {self.noun} {version}"
            )
            raise NotFound(f"agent '{agent_id}' {what}")
        return self._version(row)

    def list(self, agent_id: str, before_number: int = 0, limit: int = 50) -> list[Version]:
        t = self.table
        query = select(t).where(t.c.agent_id == agent_id).order_by(t.c.version_number.desc()).limit(limit)
        if before_number:
            query = query.where(t.c.version_number < before_number)
        with self.engine.connect() as conn:
            return [self._version(row) for row in conn.execute(query)]

    def page(self, agent_id: str, page_size: int, page_token: str) -> tuple[list[Version], str]:
        """Newest first; the token is the last version number of the page."""
        size = validation.page_size(page_size)
        records = self.list(agent_id, validation.page_token(page_token, "versions"), size + 1)
        more = len(records) > size
        records = records[:size]
        return records, (validation.next_page_token(records[-1].version_number, "versions") if more else "")


class Catalog:
    """What a service's domain offers of one registry: validated, non-blocking get and list."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def get(self, agent_id: str, version: str) -> Version:
        """Version 'vN', or the newest for '' / 'latest'."""
        validation.agent_id(agent_id)
        validation.version(version)
        return await asyncio.to_thread(self.registry.get, agent_id, version)

    async def page(self, agent_id: str, page_size: int, page_token: str) -> tuple[list[Version], str]:
        validation.agent_id(agent_id)
        return await asyncio.to_thread(self.registry.page, agent_id, page_size, page_token)
