"""Persistence of deployments and the generation log (SQLAlchemy; SQLite by default, any URL works).

Methods are blocking; the domain calls them through asyncio.to_thread so the event loop never waits on I/O.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from inference_service.records import Deployment, FinishReason, GenerationRecord, Target

metadata = MetaData()

deployments = Table(
    "deployments",
    metadata,
    Column("agent_id", String(64), primary_key=True),
    # [{"version": "v3", "weight": 0.5}, ...] in the order given.
    Column("targets", JSON, nullable=False),
    Column("revision", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

generations = Table(
    "generations",
    metadata,
    Column("generation_id", String(36), primary_key=True),
    Column("agent_id", String(64), nullable=False, index=True),
    Column("policy_version", String(32), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("text", Text, nullable=False),
    Column("routing_key", String(256), nullable=False, default=""),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("finish_reason", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)


def _utc(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class InferenceStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create_schema(self) -> None:
        metadata.create_all(self._engine)

    # --- deployments -------------------------------------------------------------------------------

    def get_deployment(self, agent_id: str) -> Deployment | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(deployments).where(deployments.c.agent_id == agent_id)).first()
        return None if row is None else self._deployment(row)

    def set_deployment(self, agent_id: str, targets: list[Target]) -> Deployment:
        """Replace the agent's deployment; the revision goes up by one atomically (1 for the first)."""
        payload = [{"version": t.version, "weight": t.weight} for t in targets]
        for _ in range(3):  # an insert that loses a race with another insert retries as an update
            try:
                with self._engine.begin() as conn:
                    changed = conn.execute(
                        update(deployments)
                        .where(deployments.c.agent_id == agent_id)
                        .values(targets=payload, revision=deployments.c.revision + 1, updated_at=now())
                    ).rowcount
                    if not changed:
                        conn.execute(
                            insert(deployments).values(agent_id=agent_id, targets=payload, revision=1, updated_at=now())
                        )
                    row = conn.execute(select(deployments).where(deployments.c.agent_id == agent_id)).one()
                    return self._deployment(row)
            except IntegrityError:
                continue
        raise RuntimeError(f"could not store the deployment of {agent_id}")

    @staticmethod
    def _deployment(row) -> Deployment:
        targets = tuple(Target(version=t["version"], weight=float(t["weight"])) for t in row.targets)
        return Deployment(
            agent_id=row.agent_id, targets=targets, revision=int(row.revision), updated_at=_utc(row.updated_at)
        )

    # --- generation log ----------------------------------------------------------------------------

    def add_generation(self, record: GenerationRecord) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                insert(generations).values(
                    generation_id=record.generation_id,
                    agent_id=record.agent_id,
                    policy_version=record.policy_version,
                    prompt=record.prompt,
                    text=record.text,
                    routing_key=record.routing_key,
                    prompt_tokens=record.prompt_tokens,
                    completion_tokens=record.completion_tokens,
                    finish_reason=record.finish_reason.value,
                    created_at=record.created_at,
                )
            )

    def get_generation(self, generation_id: str) -> GenerationRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(select(generations).where(generations.c.generation_id == generation_id)).first()
        if row is None:
            return None
        return GenerationRecord(
            generation_id=row.generation_id,
            agent_id=row.agent_id,
            policy_version=row.policy_version,
            prompt=row.prompt,
            text=row.text,
            routing_key=row.routing_key,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            finish_reason=FinishReason(row.finish_reason),
            created_at=_utc(row.created_at),
        )
