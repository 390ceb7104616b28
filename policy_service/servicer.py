"""gRPC transport of the policy service: protobuf in, domain call, protobuf out."""

from __future__ import annotations

import dataclasses

from google.protobuf import struct_pb2

from policy_service.domain import PolicyDomain
from rlhf.policy.v1 import policy_service_pb2 as pb
from rlhf.policy.v1 import policy_service_pb2_grpc as pb_grpc
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.runtime.errors import InvalidArgument, translate_errors
from rlhf.runtime.job_rpcs import JobRpcs, job_message_fields
from rlhf.runtime.jobs import Job
from rlhf.runtime.protoconfig import from_message, to_message
from rlhf.runtime.registry import Version
from rlhf.runtime.timestamps import to_proto
from rlhf.training.config import GROUP_CONFIGS, GroupPolicyConfig, TrainingConfig

ALGORITHMS = {
    pb.ALGORITHM_UNSPECIFIED: "ppo",
    pb.ALGORITHM_PPO: "ppo",
    pb.ALGORITHM_GRPO: "grpo",
    pb.ALGORITHM_RLOO: "rloo",
}
STATUS_AFTER_WAIT = {"SUCCEEDED": "trained", "FAILED": "failed", "CANCELLED": "cancelled", "INTERRUPTED": "interrupted"}


# The request field that carries each algorithm's own knobs.
KNOB_FIELDS = {"grpo": ("grpo_config", pb.GRPOConfig), "rloo": ("rloo_config", pb.RLOOConfig)}


def algorithm_knobs(request: pb.TrainPolicyRequest, algorithm: str) -> GroupPolicyConfig | None:
    """GRPO's or RLOO's own fields from the request (unset ones: TRL's defaults); another algorithm's
    knobs are INVALID_ARGUMENT."""
    for name, (field, _) in KNOB_FIELDS.items():
        if request.HasField(field) and name != algorithm:
            raise InvalidArgument(
                field, f"applies to ALGORITHM_{name.upper()} only; this request's algorithm is {algorithm.upper()}"
            )
    if algorithm not in KNOB_FIELDS:
        return None
    field = KNOB_FIELDS[algorithm][0]
    return from_message(getattr(request, field) if request.HasField(field) else None, GROUP_CONFIGS[algorithm])


def algorithm_fields(algorithm: str, config: dict | None) -> dict:
    """{grpo_config: ...} or {rloo_config: ...} for a job's or a version's resolved config (nothing for PPO)."""
    if config is None or algorithm not in KNOB_FIELDS:
        return {}
    field, message = KNOB_FIELDS[algorithm]
    return {field: to_message(GROUP_CONFIGS[algorithm](**config), message)}


def job_to_proto(job: Job) -> pb.TrainingJob:
    progress = job.progress
    return pb.TrainingJob(
        **algorithm_fields(job.spec["algorithm"], job.spec.get("algorithm_config")),
        **job_message_fields(job, pb),
        algorithm=pb.Algorithm.Value(f"ALGORITHM_{job.spec['algorithm'].upper()}"),
        config=to_message(TrainingConfig(**job.spec["config"]), pb.TrainingConfig),
        reward_model_version=progress.get("reward_model_version", job.spec.get("reward_model_version", "")),
        policy_version=job.version,
        reward_job_id=progress.get("reward_job_id", ""),
        resumed_from_step=progress.get("resumed_from_step", 0),
    )


def policy_to_proto(record: Version) -> pb.Policy:
    info = record.info
    lineage = info["lineage"]
    return pb.Policy(
        id=record.id,
        agent_id=record.agent_id,
        version=record.version,
        created_at=to_proto(record.created_at),
        metrics=pb.PolicyMetrics(
            feedback_count=info["feedback_count"],
            reward_mean=info["final_reward_mean"],
            reward_std=info["final_reward_std"],
            training_steps=info["training_steps"],
            kl=info["final_kl"],
            entropy=info["entropy"],
            value_error=info["value_error"],
            initial_reward_mean=info.get("initial_reward_mean", 0.0),
            score_mean=info.get("final_score_mean", 0.0),
            score_std=info.get("final_score_std", 0.0),
            initial_score_mean=info.get("initial_score_mean", 0.0),
        ),
        model_path=f"{record.path}/policy",
        reward_model_path=lineage["reward_model_path"],
        reward_model_version=lineage["reward_model_version"],
        base_model=lineage["base_model"],
        feedback_watermark=lineage["feedback_watermark"],
        algorithm=pb.Algorithm.Value(f"ALGORITHM_{info['algorithm'].upper()}"),
        config=to_message(TrainingConfig(**info["config"]), pb.TrainingConfig),
        **algorithm_fields(info["algorithm"], info.get("algorithm_config")),
        job_id=record.job_id,
        artifact_path=record.path,
    )


@translate_errors
class PolicyServicer(JobRpcs, pb_grpc.PolicyServiceServicer):
    messages = pb
    job_message = staticmethod(job_to_proto)
    domain: PolicyDomain

    async def TrainPolicy(self, request, context):
        config = from_message(
            request.config if request.HasField("config") else None,
            TrainingConfig,
            max_steps=request.max_steps if request.HasField("max_steps") else None,
            learning_rate=request.learning_rate if request.HasField("learning_rate") else None,
        )
        if request.algorithm not in ALGORITHMS:  # proto3 enums are open: any number arrives
            raise InvalidArgument(
                "algorithm",
                f"unknown algorithm {request.algorithm}; use ALGORITHM_PPO, ALGORITHM_GRPO or ALGORITHM_RLOO",
            )
        algorithm = ALGORITHMS[request.algorithm]
        knobs = algorithm_knobs(request, algorithm)
        reward_config = (
            request.reward_model_config if request.HasField("reward_model_config") else rw.RewardModelConfig()
        )
        if request.dry_run:
            result = await self.domain.dry_run(
                request.agent_id, config, algorithm, request.reward_model_version, reward_config, knobs
            )
            model_config = struct_pb2.Struct()
            model_config.update(dataclasses.asdict(result.config))
            guess = result.estimate
            return pb.TrainPolicyResponse(
                status="dry_run",
                feedback_count=result.feedback_count,
                estimated_steps=guess.steps,
                estimated_time_minutes=guess.minutes,
                score_mean=result.score_mean,
                score_std=result.score_std,
                model_config=model_config,
                estimate_basis=guess.basis,
                estimated_reward_model_minutes=guess.reward_model_minutes,
                estimated_loading_minutes=guess.loading_minutes,
                estimated_training_minutes=guess.training_minutes,
                estimated_saving_minutes=guess.saving_minutes,
                estimated_peak_memory_bytes=guess.peak_memory_bytes,
                estimated_response_tokens=guess.response_tokens,
                algorithm=request.algorithm,
                **algorithm_fields(algorithm, dataclasses.asdict(knobs) if knobs is not None else None),
            )
        job = await self.domain.start_job(
            request.agent_id, config, algorithm, request.reward_model_version, reward_config, knobs
        )
        if not request.wait:
            return pb.TrainPolicyResponse(status="queued", job=job_to_proto(job))
        job = await self.domain.jobs.wait(job.job_id)
        response = pb.TrainPolicyResponse(status=STATUS_AFTER_WAIT[job.state], job=job_to_proto(job))
        if job.state == "SUCCEEDED":
            policy = policy_to_proto(await self.domain.policies.get(job.agent_id, job.version))
            response.policy_id = policy.id
            response.version = policy.version
            response.model_path = policy.model_path
            response.reward_model_path = policy.reward_model_path
            response.feedback_count = policy.metrics.feedback_count
            response.training_steps = policy.metrics.training_steps
            response.reward_mean = policy.metrics.reward_mean
            response.reward_std = policy.metrics.reward_std
        return response

    async def ResumeTrainingJob(self, request, context):
        return pb.ResumeTrainingJobResponse(job=job_to_proto(await self.domain.resume_job(request.job_id)))

    async def ListPolicies(self, request, context):
        records, token = await self.domain.policies.page(request.agent_id, request.page_size, request.page_token)
        return pb.ListPoliciesResponse(policies=[policy_to_proto(r) for r in records], next_page_token=token)

    async def GetPolicy(self, request, context):
        return pb.GetPolicyResponse(
            policy=policy_to_proto(await self.domain.policies.get(request.agent_id, request.version))
        )
