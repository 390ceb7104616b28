"""Schema migrations of the training tables (jobs and a registry of versions) that the reward and policy services
each keep in their own database; the revisions read the registry table's name from the configuration."""

from __future__ import annotations

import pathlib

from sqlalchemy import MetaData

from rlhf.runtime.jobs import jobs_table
from rlhf.runtime.migrations import Schema
from rlhf.runtime.registry import registry_table

# The service whose database holds each registry table.
SERVICES = {"reward_models": "reward", "policies": "policy"}


def training_schema(registry_name: str) -> Schema:
    """The schema of a training service's database whose versions table is `registry_name`."""
    metadata = MetaData()
    jobs_table(metadata)
    registry_table(metadata, registry_name)
    return Schema(
        SERVICES.get(registry_name, registry_name),
        pathlib.Path(__file__).parent,
        metadata,
        legacy_revision="t0001",
        attributes={"registry_table": registry_name},
    )


def reward_schema() -> Schema:
    return training_schema("reward_models")


def policy_schema() -> Schema:
    return training_schema("policies")
