"""The reward service's logic: training jobs, the registry and scoring, independent of gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import grpc

from reward_service.config import RewardServiceConfig
from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from rlhf.runtime import checks, validation
from rlhf.runtime.errors import FailedPrecondition, InvalidArgument, from_rpc_error
from rlhf.runtime.jobs import Job, JobManager
from rlhf.runtime.model_checks import ModelAccess, ModelChecker
from rlhf.runtime.registry import Catalog
from rlhf.runtime.tls import client_environment, open_aio_channel
from rlhf.runtime.training_store import TrainingStore
from rlhf.training.config import RewardModelConfig
from rlhf.training.reward_functions import (
    InvalidRewardFunction,
    RewardCombination,
    RewardFunctionRegistry,
    RewardFunctionSpec,
)
from rlhf.training.scoring import Scored, Scorer, apply_reward_functions

log = logging.getLogger(__name__)


def validate_config(config: RewardModelConfig) -> RewardModelConfig:
    checks.reward_model_config(config, "config")
    return config


class RewardDomain:
    def __init__(self, config: RewardServiceConfig, store: TrainingStore) -> None:
        self.config = config
        self.store = store
        self.root = config.server.artifact_root / "reward_models"
        self.models = Catalog(store.registry)
        self.base_models = ModelChecker(
            config.server.data_dir, config.model_check_timeout_seconds, ModelAccess.of(config.server)
        )
        # The worker reads the agent's feedback (ExportFeedback) with the service's own token and TLS.
        self.jobs = JobManager(
            store.jobs,
            self.root / ".jobs",
            "reward_service.worker",
            self._register,
            worker_env=client_environment(config.server.security),
            owner=config.server.resolved_replica_id(),
            lease_seconds=config.server.job_lease_seconds,
        )
        self.scorer = Scorer(config.device, config.score_micro_batch, config.model_cache_size)
        # Imported now: a registration that does not import stops the service at start, saying which.
        self.reward_functions = RewardFunctionRegistry.of(config.reward_functions)
        self._feedback_channel = open_aio_channel(config.feedback_address, [], config.server.security, request_ids=True)
        self.feedback = fb_grpc.FeedbackServiceStub(self._feedback_channel)

    async def start(self) -> None:
        await self.jobs.recover()

    async def close(self) -> None:
        await self.jobs.close()
        await self._feedback_channel.close()

    # --- training jobs -------------------------------------------------------------------------------
    async def create_job(self, agent_id: str, config: RewardModelConfig) -> Job:
        validation.agent_id(agent_id)
        validate_config(config)
        shape = await self.base_models.shape(
            config.base_model, "config.base_model", agent_id
        )  # loadable, before anything
        checks.within_context(config.max_length, shape.context, "config.max_length")
        try:
            stats = await self.feedback.GetFeedbackStats(fb.GetFeedbackStatsRequest(agent_id=agent_id), timeout=10)
        except grpc.RpcError as error:
            raise from_rpc_error(error, "feedback service") from error
        count = stats.stats.feedback_count
        if count < self.config.min_feedback:
            raise FailedPrecondition(
                f"agent '{agent_id}' has {count} feedback items; at least {self.config.min_feedback} are "
                f"needed to train a reward model",
                subject=agent_id,
                kind="FEEDBACK_COUNT",
            )
        spec = {
            "config": dataclasses.asdict(config),
            "feedback_address": self.config.feedback_address,
            "data_dir": str(self.config.server.data_dir),
        }
        job = await self.jobs.submit(agent_id, spec)
        return job

    async def _register(self, job: Job, result: dict[str, Any]) -> str:
        info = {
            k: result[k]
            for k in (
                "feedback_watermark",
                "feedback_count",
                "rating_count",
                "comparison_count",
                "metrics",
                "normalization",
            )
        }
        info["config"] = job.spec["config"]
        record = await asyncio.to_thread(
            self.store.registry.register_folder,
            job.agent_id,
            pathlib.Path(result["model_path"]),
            self.root,
            job.job_id,
            info,
        )
        return record.version

    # --- scoring -------------------------------------------------------------------------------------
    async def score(
        self,
        agent_id: str,
        version: str,
        pairs: list[tuple[str, str]],
        time_remaining: float | None,
        functions: Sequence[RewardFunctionSpec | dict[str, Any]] = (),
        validate_only: bool = False,
    ) -> tuple[list[Scored], str]:
        """The reward model's scores of `pairs`, combined by the registered reward `functions` when named.
        `validate_only`: the request's checks alone (no items, no model needed); nothing is scored."""
        validation.agent_id(agent_id)
        validation.version(version)
        combination = self.combination(functions, "functions")
        if validate_only:
            return [], ""
        if not pairs:
            raise InvalidArgument("items", "must hold at least one item")
        if len(pairs) > self.config.score_max_batch:
            raise InvalidArgument(
                "items",
                f"holds {len(pairs)} items; at most {self.config.score_max_batch} per request (split the batch)",
            )
        record = await self.models.get(agent_id, version)
        loaded = await self.scorer.cache.get(record.path)
        deadline = time.monotonic() + time_remaining if time_remaining else None
        scored = await asyncio.to_thread(self.scorer.score, loaded, pairs, deadline)
        if combination:
            scored = await asyncio.to_thread(apply_reward_functions, combination, pairs, scored)
        return scored, record.version

    def combination(self, functions: Sequence[RewardFunctionSpec | dict[str, Any]], field: str) -> RewardCombination:
        """The validated combination; a name that is not registered or a bad parameter is INVALID_ARGUMENT."""
        try:
            return self.reward_functions.combination(functions, field)
        except InvalidRewardFunction as error:
            raise InvalidArgument(error.field, error.description) from error
