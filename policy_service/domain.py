"""The policy service's logic: TrainPolicy (dry run or job), jobs and the policy registry, without gRPC."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any

import grpc
from google.protobuf import json_format

from policy_service.config import PolicyServiceConfig
from policy_service.estimate import Estimate, Run, estimate
from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.reward.v1 import reward_service_pb2_grpc as rw_grpc
from rlhf.runtime import checks, validation
from rlhf.runtime.errors import FailedPrecondition, InvalidArgument, Unimplemented, field_violation, from_rpc_error
from rlhf.runtime.jobs import SUCCEEDED, Job, JobManager
from rlhf.runtime.model_checks import ModelAccess, ModelChecker
from rlhf.runtime.protoconfig import from_message
from rlhf.runtime.registry import Catalog
from rlhf.runtime.tls import client_environment, open_aio_channel
from rlhf.runtime.training_store import TrainingStore
from rlhf.training.config import (
    GROUP_CONFIGS,
    GroupPolicyConfig,
    GRPOTrainingConfig,
    RewardModelConfig,
    TrainingConfig,
    group_config,
)
from rlhf.training.modelshape import ModelShape
from rlhf.training.tinymodel import tiny_model_dir

log = logging.getLogger(__name__)
SUPPORTED_ALGORITHMS = ("ppo", "grpo", "rloo")
# GRPO's loss types a run may ask for (TRL's luspo and vespo need sequence-level importance sampling, not exposed).
GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")
# Most data-parallel processes a PPO job may ask for (ranks on one machine, or across machines through torchrun).
MAX_PROCESSES = 64
# Finished jobs a dry run reads for its calibration (newest first).
HISTORY_JOBS = 200


@functools.cache
def device_kind_of(preference: str) -> str:
    """The device kind a worker on this machine gets for `preference` (imports torch: call from a thread)."""
    from rlhf.training.modeling import pick_device
    from rlhf.training.modelshape import device_kind

    return device_kind(pick_device(preference))


def validate_config(config: TrainingConfig, service: PolicyServiceConfig, algorithm: str = "ppo") -> TrainingConfig:
    """The request's TrainingConfig: the fields every algorithm uses, then PPO's own (only for PPO: GRPO and
    RLOO ignore them, see validate_algorithm_config for theirs)."""
    p = "config"
    v = validation
    checks.model_training(config, p)
    v.int_in(config.max_steps, "max_steps", 1, service.max_steps_cap)
    v.int_in(config.max_new_tokens, f"{p}.max_new_tokens", 1, service.max_new_tokens_cap)
    v.number_in(config.temperature, f"{p}.temperature", 1e-3, 100.0)
    v.int_in(config.top_k, f"{p}.top_k", 0, 1_000_000)
    v.number_in(config.top_p, f"{p}.top_p", 1e-6, 1.0)
    v.number_in(config.max_grad_norm, f"{p}.max_grad_norm", 1e-6, 1e6)
    v.int_in(config.checkpoint_interval, f"{p}.checkpoint_interval", 0, 10**9)
    v.int_in(config.num_processes, f"{p}.num_processes", 1, MAX_PROCESSES)
    if algorithm != "ppo":
        if config.num_processes != 1:
            raise InvalidArgument(
                f"{p}.num_processes",
                f"{algorithm.upper()} runs in one process (data-parallel training is PPO's); use 1 or algorithm ppo",
            )
        return config
    v.int_in(config.mini_batch_size, f"{p}.mini_batch_size", 1, config.batch_size)
    for name in ("batch_size", "mini_batch_size"):
        if getattr(config, name) % config.num_processes:
            raise InvalidArgument(
                f"{p}.{name}",
                f"{getattr(config, name)} does not split evenly over num_processes={config.num_processes} ranks; "
                f"use a multiple of {config.num_processes}",
            )
    v.int_in(config.ppo_epochs, f"{p}.ppo_epochs", 1, 100)
    v.number_in(config.init_kl_coef, f"{p}.init_kl_coef", 0.0, 100.0)
    v.number_in(config.target_kl, f"{p}.target_kl", 0.0, 1e4)
    v.number_in(config.gamma, f"{p}.gamma", 0.0, 1.0)
    v.number_in(config.lam, f"{p}.lam", 0.0, 1.0)
    v.number_in(config.cliprange, f"{p}.cliprange", 1e-6, 10.0)
    v.number_in(config.cliprange_value, f"{p}.cliprange_value", 1e-6, 1e4)
    v.number_in(config.vf_coef, f"{p}.vf_coef", 0.0, 100.0)
    v.int_in(config.kl_horizon, f"{p}.kl_horizon", 0, 10**9)
    if config.missing_eos_penalty < 0:
        raise InvalidArgument(
            f"{p}.missing_eos_penalty",
            f"is subtracted from the score of an answer without EOS (TRL's convention): "
            f"pass {-config.missing_eos_penalty} instead of {config.missing_eos_penalty}",
        )
    v.number_in(config.missing_eos_penalty, f"{p}.missing_eos_penalty", 0.0, 1e3)
    v.number_in(config.reward_clip, f"{p}.reward_clip", 0.0, 1e6)
    return config


def algorithm_config(
    algorithm: str, config: TrainingConfig, knobs: GroupPolicyConfig | None
) -> GroupPolicyConfig | None:
    """GRPO's or RLOO's whole config (rlhf.training.config.group_config); None for PPO."""
    return group_config(algorithm, config, knobs) if algorithm in GROUP_CONFIGS else None


def validate_algorithm_config(group: GroupPolicyConfig, algorithm: str) -> GroupPolicyConfig:
    """GRPO's or RLOO's own fields (the shared ones are validate_config's)."""
    p = f"{algorithm}_config"
    v = validation
    v.int_in(group.num_generations, f"{p}.num_generations", 2, 1024)
    v.number_in(group.beta, f"{p}.beta", 0.0, 100.0)
    v.int_in(group.num_iterations, f"{p}.num_iterations", 1, 100)
    v.number_in(group.epsilon, f"{p}.epsilon", 1e-6, 10.0)
    v.number_in(group.epsilon_high, f"{p}.epsilon_high", 0.0, 100.0)
    if isinstance(group, GRPOTrainingConfig):
        if group.loss_type not in GRPO_LOSS_TYPES:
            raise InvalidArgument(
                f"{p}.loss_type", f"unknown loss type {group.loss_type!r}; use one of {', '.join(GRPO_LOSS_TYPES)}"
            )
        if group.scale_rewards not in GRPO_SCALE_REWARDS:
            raise InvalidArgument(
                f"{p}.scale_rewards",
                f"unknown scaling {group.scale_rewards!r}; use one of {', '.join(GRPO_SCALE_REWARDS)}",
            )
    if group.device.startswith("cuda:") and group.device != "cuda:0":
        raise InvalidArgument(
            "config.device",
            f"{algorithm.upper()} runs through TRL on the first visible GPU; use 'cuda' and choose the GPU with "
            f"CUDA_VISIBLE_DEVICES for the policy service (got {group.device!r})",
        )
    answers = group.batch_size * group.num_generations
    if answers % group.gradient_accumulation_steps:
        raise InvalidArgument(
            "config.gradient_accumulation_steps",
            f"a {algorithm.upper()} step's {answers} answers (batch_size {group.batch_size} x num_generations "
            f"{group.num_generations}) must split evenly into {group.gradient_accumulation_steps} micro-batches",
        )
    return group


@dataclasses.dataclass
class Checked:
    stats: fb.FeedbackStats
    shape: ModelShape
    reward_shape: ModelShape | None
    device_kind: str
    reward_device_kind: str


@dataclasses.dataclass
class DryRun:
    feedback_count: int
    score_mean: float
    score_std: float
    estimate: Estimate
    # The resolved configuration: PPO's TrainingConfig, or GRPO's / RLOO's whole config.
    config: TrainingConfig | GroupPolicyConfig


class PolicyDomain:
    def __init__(self, config: PolicyServiceConfig, store: TrainingStore) -> None:
        self.config = config
        self.store = store
        self.root = config.server.artifact_root / "policies"
        self.policies = Catalog(store.registry)
        # The worker calls the reward service (ScoreBatch) with the service's own token and TLS.
        self.jobs = JobManager(
            store.jobs,
            self.root / ".jobs",
            "policy_service.worker",
            self._register,
            worker_env=client_environment(config.server.security),
            resumable=True,
            owner=config.server.resolved_replica_id(),
            lease_seconds=config.server.job_lease_seconds,
        )
        self._channels = [
            open_aio_channel(config.feedback_address, [], config.server.security, request_ids=True),
            open_aio_channel(config.reward_address, [], config.server.security, request_ids=True),
        ]
        self.feedback = fb_grpc.FeedbackServiceStub(self._channels[0])
        self.reward = rw_grpc.RewardServiceStub(self._channels[1])
        # Shapes of hub ids that answered (a local folder is looked at again each time: it may change).
        self.base_models = ModelChecker(
            config.server.data_dir, config.model_check_timeout_seconds, ModelAccess.of(config.server)
        )

    async def start(self) -> None:
        await self.jobs.recover()

    async def close(self) -> None:
        await self.jobs.close()
        for channel in self._channels:
            await channel.close()

    # --- TrainPolicy ---------------------------------------------------------------------------------
    async def _checks(
        self,
        agent_id: str,
        config: TrainingConfig,
        algorithm: str,
        reward_model_version: str,
        reward_config: RewardModelConfig | None,
        group: GroupPolicyConfig | None = None,
    ) -> Checked:
        """Every check a real run makes, shared by dry runs. `reward_config`: the reward model the job trains
        first (None when reward_model_version names one); `group`: GRPO's or RLOO's config (algorithm_config)."""
        validation.agent_id(agent_id)
        validate_config(config, self.config, algorithm)
        if algorithm not in SUPPORTED_ALGORITHMS:
            raise Unimplemented(f"algorithm {algorithm.upper()} is not available yet; use PPO")
        if group is not None:
            validate_algorithm_config(group, algorithm)
        validation.version(reward_model_version, "reward_model_version")
        if reward_config is not None:
            checks.reward_model_config(reward_config, "reward_model_config")
        # Models and devices a run cannot have fail here, in a moment, not in the worker a minute later.
        shape = await self.base_models.shape(config.base_model, "config.base_model", agent_id)
        checks.leaves_room_for_a_prompt(config.max_new_tokens, shape.context, "config.max_new_tokens")
        kind = await self._device_kind(config.device, "config.device")
        reward_shape, reward_kind = None, ""
        if reward_config is not None:
            reward_shape = await self.base_models.shape(
                reward_config.base_model, "reward_model_config.base_model", agent_id
            )
            checks.within_context(reward_config.max_length, reward_shape.context, "reward_model_config.max_length")
            # The reward service may run elsewhere: its device is its business (here it only labels timings).
            reward_kind = await self._device_kind(reward_config.device, "", required=False)
        if config.reward_functions:
            await self._check_reward_functions(agent_id, config.reward_functions)
        try:
            stats = (
                await self.feedback.GetFeedbackStats(fb.GetFeedbackStatsRequest(agent_id=agent_id), timeout=10)
            ).stats
        except grpc.RpcError as error:
            raise from_rpc_error(error, "feedback service") from error
        if stats.feedback_count < self.config.min_feedback:
            raise FailedPrecondition(
                f"agent '{agent_id}' has {stats.feedback_count} feedback items; at least "
                f"{self.config.min_feedback} are needed to train a policy",
                subject=agent_id,
                kind="FEEDBACK_COUNT",
            )
        if reward_model_version:
            try:
                await self.reward.GetRewardModel(
                    rw.GetRewardModelRequest(agent_id=agent_id, version=reward_model_version), timeout=10
                )
            except grpc.RpcError as error:
                raise from_rpc_error(error, "reward service") from error
        return Checked(stats, shape, reward_shape, kind, reward_kind)

    async def _check_reward_functions(self, agent_id: str, functions: list[dict[str, Any]]) -> None:
        """The reward service checks the run's reward functions (registered names, parameters) now, so a bad
        one is INVALID_ARGUMENT naming config.reward_functions[i]..., not a job failing later."""
        request = rw.ScoreBatchRequest(
            agent_id=agent_id,
            validate_only=True,
            functions=[json_format.ParseDict(f, rw.RewardFunctionSpec()) for f in functions],
        )
        try:
            await self.reward.ScoreBatch(request, timeout=10)
        except grpc.RpcError as error:
            violation = field_violation(error)
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT and violation:
                field, description = violation
                raise InvalidArgument(field.replace("functions", "config.reward_functions", 1), description) from error
            raise from_rpc_error(error, "reward service") from error

    @staticmethod
    async def _device_kind(preference: str, field: str, required: bool = True) -> str:
        """The kind of device a worker here gets for `preference`; one this machine lacks is
        FAILED_PRECONDITION (or, not `required`, labelled as asked)."""
        try:
            return await asyncio.to_thread(device_kind_of, preference)
        except ValueError as error:
            if not required:
                return preference
            raise FailedPrecondition(f"{field}: {error}", subject=preference, kind="DEVICE") from error

    async def dry_run(
        self,
        agent_id: str,
        config: TrainingConfig,
        algorithm: str,
        reward_model_version: str,
        reward_model_config: rw.RewardModelConfig | None = None,
        knobs: GroupPolicyConfig | None = None,
    ) -> DryRun:
        """The estimate of a run; `knobs`: GRPO's or RLOO's own fields (algorithm_config)."""
        reward_config = None
        if not reward_model_version:
            reward_config = from_message(reward_model_config, RewardModelConfig)
        group = algorithm_config(algorithm, config, knobs)
        checked = await self._checks(agent_id, config, algorithm, reward_model_version, reward_config, group)
        runs = [
            run
            for job in await self.jobs.list(state=SUCCEEDED, limit=HISTORY_JOBS)
            if job.result and job.started_at and job.finished_at
            for run in [Run.of(job.job_id, job.result, (job.finished_at - job.started_at).total_seconds())]
            if run is not None
        ]
        cached = (tiny_model_dir(self.config.server.data_dir) / "build_info.json").is_file()
        guess = estimate(
            config,
            runs,
            checked.shape,
            checked.device_kind,
            reward_config=reward_config,
            reward_shape=checked.reward_shape,
            reward_device_kind=checked.reward_device_kind,
            feedback_count=checked.stats.feedback_count,
            tiny_model_cached=cached,
            algorithm=algorithm,
            group=group,
        )
        log.info("dry run for %s: %d steps, %.2f min (%s)", agent_id, guess.steps, guess.minutes, guess.basis)
        stats = checked.stats
        return DryRun(stats.feedback_count, stats.score_mean, stats.score_std, guess, group or config)

    async def start_job(
        self,
        agent_id: str,
        config: TrainingConfig,
        algorithm: str,
        reward_model_version: str,
        reward_model_config: rw.RewardModelConfig,
        knobs: GroupPolicyConfig | None = None,
    ) -> Job:
        reward_config = None if reward_model_version else from_message(reward_model_config, RewardModelConfig)
        group = algorithm_config(algorithm, config, knobs)
        await self._checks(agent_id, config, algorithm, reward_model_version, reward_config, group)
        spec = {
            "config": dataclasses.asdict(config),
            "algorithm": algorithm,
            # GRPO's or RLOO's whole config (shared fields included), what their worker runs.
            **({"algorithm_config": dataclasses.asdict(group)} if group is not None else {}),
            "reward_model_version": reward_model_version,
            "reward_model_config": reward_model_config.SerializeToString().hex(),
            "feedback_address": self.config.feedback_address,
            "reward_address": self.config.reward_address,
            "data_dir": str(self.config.server.data_dir),
            "score_timeout_seconds": self.config.score_timeout_seconds,
            "score_retries": self.config.score_retries,
        }
        return await self.jobs.submit(agent_id, spec)

    async def resume_job(self, job_id: str) -> Job:
        """Run an ended job again; its worker continues from the job's last checkpoint."""
        job = await self.jobs.get(job_id)  # validates job_id
        # The world may have changed since: the same checks as a new run (feedback, reward model).
        reward_config = None
        if not job.spec["reward_model_version"]:
            message = rw.RewardModelConfig()
            message.ParseFromString(bytes.fromhex(job.spec.get("reward_model_config", "")))
            reward_config = from_message(message, RewardModelConfig)
        algorithm = job.spec["algorithm"]
        group = GROUP_CONFIGS[algorithm](**job.spec["algorithm_config"]) if "algorithm_config" in job.spec else None
        await self._checks(
            job.agent_id,
            TrainingConfig(**job.spec["config"]),
            algorithm,
            job.spec["reward_model_version"],
            reward_config,
            group,
        )
        return await self.jobs.resume(job_id)

    async def _register(self, job: Job, result: dict[str, Any]) -> str:
        def name_final_place(staging: pathlib.Path, number: int, target: pathlib.Path) -> None:
            results_file = staging / "training_results.json"
            results = json.loads(results_file.read_text())
            results["model_path"] = str(target / "policy")
            results["version"] = target.name  # the folder is named after the version ("v3", "v15.2")
            results_file.write_text(json.dumps(results, indent=2))

        info = {k: v for k, v in result.items() if k != "output_dir"}
        record = await asyncio.to_thread(
            self.store.registry.register_folder,
            job.agent_id,
            pathlib.Path(result["output_dir"]),
            self.root,
            job.job_id,
            info,
            name_final_place,
        )
        return record.version
