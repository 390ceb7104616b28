"""A versioned, immutable registry of model artifacts per agent (reward models, policies).

Each row has a number, 1, 2, ... per agent in registration order (ordering and paging), and a name, what users
see and pass: with SEQUENTIAL naming the name is "v<number>" ("v1", "v2", ...); with FEEDBACK_COUNT naming it is
the feedback count the version was trained on, as in the seed ("v15", then "v25" after ten more items). A name is
never reused: when the natural name is taken (a second run on the same count, or a sequential number that an
earlier count-named version already holds) the version gets the first free suffix ".2", ".3", ... ("v15.2").
Both are allocated in the transaction that records the row, which renames the artifact folder into place
before it commits (the folder is named after the version): a registered version's folder is always complete.
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

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from rlhf.runtime import validation
from rlhf.runtime.errors import NotFound, Unavailable
from rlhf.runtime.jobs import utcnow

# How versions are named (see the module docstring).
SEQUENTIAL = "sequential"
FEEDBACK_COUNT = "feedback_count"
NAMINGS = (SEQUENTIAL, FEEDBACK_COUNT)
_REGISTER_ATTEMPTS = 20  # a registration loses a race for a number or name only to another registration


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
        # "v3", "v15", "v15.2"; empty only in rows written before names existed (named by migration t0002).
        Column("version_name", String(32)),
        UniqueConstraint("agent_id", "version_number", name=f"uq_{name}_version"),
        Index(f"uq_{name}_version_name", "agent_id", "version_name", unique=True),
    )


def natural_name(naming: str, number: int, info: dict[str, Any]) -> str:
    """The name a version gets unless it is taken: "v<number>", or "v<feedback count>"."""
    if naming == FEEDBACK_COUNT:
        return f"v{int(info['feedback_count'])}"
    return f"v{number}"


def free_name(base: str, taken: set[str]) -> str:
    """`base`, or `base` with the first free suffix ".2", ".3", ... when it is taken."""
    if base not in taken:
        return base
    suffix = 2
    while f"{base}.{suffix}" in taken:
        suffix += 1
    return f"{base}.{suffix}"


@dataclasses.dataclass
class Version:
    id: str
    agent_id: str
    version_number: int
    path: str
    job_id: str
    info: dict[str, Any]
    created_at: dt.datetime
    # "v3", "v15.2": what users see and pass (empty: "v<version_number>").
    name: str = ""

    @property
    def version(self) -> str:
        return self.name or f"v{self.version_number}"


class Registry:
    """Blocking access to one registry table; `noun` names the thing in errors ("reward model"); `naming` is
    SEQUENTIAL or FEEDBACK_COUNT (which needs info["feedback_count"] at registration)."""

    def __init__(self, engine: Engine, table: Table, noun: str, naming: str = SEQUENTIAL) -> None:
        if naming not in NAMINGS:
            raise ValueError(f"version naming must be one of {list(NAMINGS)}, got {naming!r}")
        self.engine = engine
        self.table = table
        self.noun = noun
        self.naming = naming

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
            name=row.version_name or "",
        )

    def register(self, agent_id: str, place: Callable[[int], str], job_id: str, info: dict[str, Any]) -> Version:
        """Allocate the next version; `place(number)` moves the artifact into place and returns its folder."""
        return self.register_named(agent_id, lambda number, _name: place(number), job_id, info)

    def register_named(
        self, agent_id: str, place: Callable[[int, str], str], job_id: str, info: dict[str, Any]
    ) -> Version:
        """Allocate the next version; `place(number, name)` moves the artifact into place and returns its
        folder. The row goes in first, inside the transaction: of concurrent registrations of one agent (threads,
        or replicas over one database) that pick the same number or name, the database's unique keys refuse all
        but one before anything is placed, and the others try again with the next free number and name. The
        row and its folder appear together when the transaction commits."""
        t = self.table
        for _ in range(_REGISTER_ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    last = conn.execute(select(func.max(t.c.version_number)).where(t.c.agent_id == agent_id)).scalar()
                    number = (last or 0) + 1
                    base = natural_name(self.naming, number, info)
                    same = or_(t.c.version_name == base, t.c.version_name.like(f"{base}.%"))
                    taken = set(conn.execute(select(t.c.version_name).where(t.c.agent_id == agent_id, same)).scalars())
                    name = free_name(base, taken)
                    row_id = uuid.uuid4().hex
                    conn.execute(
                        t.insert().values(
                            id=row_id,
                            agent_id=agent_id,
                            version_number=number,
                            version_name=name,
                            path="",
                            job_id=job_id,
                            info=json.dumps(info),
                            created_at=utcnow(),
                        )
                    )
                    conn.execute(update(t).where(t.c.id == row_id).values(path=place(number, name)))
            except IntegrityError:
                continue  # another registration took the number or the name
            return self.get(agent_id, name)
        raise Unavailable(f"too many {self.noun} versions of agent '{agent_id}' are being registered at once; retry")

    def register_folder(
        self,
        agent_id: str,
        staging: pathlib.Path,
        root: pathlib.Path,
        job_id: str,
        info: dict[str, Any],
        prepare: Callable[[pathlib.Path, int, pathlib.Path], None] | None = None,
    ) -> Version:
        """Register a finished job's staged folder as root/<agent>/<version name>; `prepare(staging, N, target)`
        may rewrite files in it first (e.g. paths that name the final place; target.name is the version)."""

        def place(number: int, name: str) -> str:
            target = root / agent_id / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if prepare is not None:
                prepare(staging, number, target)
            os.rename(staging, target)  # atomic on one filesystem: a version folder is complete or absent
            return str(target)

        return self.register_named(agent_id, place, job_id, info)

    def get(self, agent_id: str, version: str = "") -> Version:
        t = self.table
        query = select(t).where(t.c.agent_id == agent_id)
        if version in ("", "latest"):
            query = query.order_by(t.c.version_number.desc()).limit(1)
        else:
            query = query.where(t.c.version_name == version)
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
