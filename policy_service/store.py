"""The policy service's database: training jobs and the policy registry."""

from __future__ import annotations

from sqlalchemy import Engine, MetaData

from rlhf.jobs import JobStore, jobs_table
from rlhf.registry import Registry, registry_table

metadata = MetaData()
jobs = jobs_table(metadata)
policies = registry_table(metadata, "policies")


class PolicyStore:
    def __init__(self, engine: Engine) -> None:
        metadata.create_all(engine)
        self.jobs = JobStore(engine, jobs)
        self.policies = Registry(engine, policies, "policy")
