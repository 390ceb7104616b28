"""The tables of a service that trains models: its jobs and its registry of versions."""

from __future__ import annotations

from sqlalchemy import Engine

from rlhf.runtime.jobs import JobStore
from rlhf.runtime.migrations import prepare_database
from rlhf.runtime.registry import SEQUENTIAL, Registry
from rlhf.runtime.training_migrations import training_schema


class TrainingStore:
    def __init__(
        self, engine: Engine, registry_name: str, noun: str, naming: str = SEQUENTIAL, migrate: str = ""
    ) -> None:
        """`registry_name` names the versions table ("policies"); `noun` names a version in errors ("policy");
        `naming` is how versions are named (rlhf.runtime.registry). The database is created, or upgraded to
        the schema this code needs as `migrate` allows (ServerConfig.database_migrate, rlhf.runtime.migrations)."""
        schema = training_schema(registry_name)
        self.jobs = JobStore(engine, schema.metadata.tables["jobs"])
        self.registry = Registry(engine, schema.metadata.tables[registry_name], noun, naming)
        prepare_database(engine, schema, migrate)
