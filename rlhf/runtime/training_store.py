"""The tables of a service that trains models: its jobs and its registry of versions."""

from __future__ import annotations

from sqlalchemy import Engine, MetaData

from rlhf.runtime.jobs import JobStore, jobs_table
from rlhf.runtime.registry import SEQUENTIAL, Registry, ensure_names, registry_table


class TrainingStore:
    def __init__(self, engine: Engine, registry_name: str, noun: str, naming: str = SEQUENTIAL) -> None:
        """`registry_name` names the versions table ("policies"); `noun` names a version in errors ("policy");
        `naming` is how versions are named (rlhf.runtime.registry)."""
        metadata = MetaData()
        self.jobs = JobStore(engine, jobs_table(metadata))
        self.registry = Registry(engine, registry_table(metadata, registry_name), noun, naming)
        metadata.create_all(engine)
        self.jobs.ensure_constraints()
        ensure_names(engine, self.registry.table)
