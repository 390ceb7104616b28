"""The reward service's database: training jobs and the reward-model registry."""

from __future__ import annotations

from sqlalchemy import Engine, MetaData

from rlhf.jobs import JobStore, jobs_table
from rlhf.registry import Registry, registry_table

metadata = MetaData()
jobs = jobs_table(metadata)
reward_models = registry_table(metadata, "reward_models")


class RewardStore:
    def __init__(self, engine: Engine) -> None:
        metadata.create_all(engine)
        self.jobs = JobStore(engine, jobs)
        self.models = Registry(engine, reward_models, "reward model")
