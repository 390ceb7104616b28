"""gRPC transport of the reward service: protobuf in, domain call, protobuf out."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from reward_service.domain import RewardDomain
from rlhf.reward.v1 import reward_service_pb2 as pb
from rlhf.reward.v1 import reward_service_pb2_grpc as pb_grpc
from rlhf.runtime.errors import InvalidArgument, translate_errors
from rlhf.runtime.job_rpcs import JobRpcs, job_message_fields
from rlhf.runtime.jobs import Job
from rlhf.runtime.protoconfig import from_message, to_message
from rlhf.runtime.registry import Version
from rlhf.runtime.timestamps import to_proto
from rlhf.training.config import RewardModelConfig
from rlhf.training.reward_functions import RewardFunction


def job_to_proto(job: Job) -> pb.TrainingJob:
    message = pb.TrainingJob(
        **job_message_fields(job, pb),
        config=to_message(RewardModelConfig(**job.spec["config"]), pb.RewardModelConfig),
        reward_model_version=job.version,
        feedback_watermark=job.result.get("feedback_watermark", 0),
    )
    message.metrics.update(job.result.get("metrics", {}))
    return message


def model_to_proto(record: Version) -> pb.RewardModel:
    info = record.info
    message = pb.RewardModel(
        agent_id=record.agent_id,
        version=record.version,
        model_path=record.path,
        base_model=info["config"]["base_model"],
        created_at=to_proto(record.created_at),
        feedback_watermark=info["feedback_watermark"],
        feedback_count=info["feedback_count"],
        rating_count=info["rating_count"],
        comparison_count=info["comparison_count"],
        config=to_message(RewardModelConfig(**info["config"]), pb.RewardModelConfig),
        job_id=record.job_id,
        normalization=pb.ScoreNormalization(mean=info["normalization"]["mean"], std=info["normalization"]["std"]),
    )
    message.metrics.update(info["metrics"])
    return message


@translate_errors
class RewardServicer(JobRpcs, pb_grpc.RewardServiceServicer):
    messages = pb
    job_message = staticmethod(job_to_proto)
    domain: RewardDomain

    async def CreateTrainingJob(self, request, context):
        config = from_message(request.config if request.HasField("config") else None, RewardModelConfig)
        return pb.CreateTrainingJobResponse(job=job_to_proto(await self.domain.create_job(request.agent_id, config)))

    async def ListRewardModels(self, request, context):
        records, token = await self.domain.models.page(request.agent_id, request.page_size, request.page_token)
        return pb.ListRewardModelsResponse(reward_models=[model_to_proto(r) for r in records], next_page_token=token)

    async def GetRewardModel(self, request, context):
        record = await self.domain.models.get(request.agent_id, request.version)
        return pb.GetRewardModelResponse(reward_model=model_to_proto(record))

    async def ScoreBatch(self, request, context):
        pairs = [(item.prompt, item.response) for item in request.items]
        functions = [spec_from_proto(f, f"functions[{i}].params") for i, f in enumerate(request.functions)]
        scored, version = await self.domain.score(
            request.agent_id, request.version, pairs, context.time_remaining(), functions, request.validate_only
        )
        return pb.ScoreBatchResponse(
            version=version,
            scores=[
                pb.ItemScore(score=s.score, rating=s.rating, ok=s.ok, error=s.error, model_score=s.model_score)
                for s in scored
            ],
        )

    async def ListRewardFunctions(self, request, context):
        return pb.ListRewardFunctionsResponse(
            functions=[function_to_proto(f) for f in self.domain.reward_functions.listed()]
        )


def spec_from_proto(message: pb.RewardFunctionSpec, field: str = "params") -> dict[str, Any]:
    """{"name", "weight", "params"} as the library reads it (an unset weight is 1)."""
    try:
        params = json_format.MessageToDict(message.params)
    except ValueError as error:  # a Struct that is no JSON: NaN or infinite numbers, a Value with no kind set
        raise InvalidArgument(field, f"is not JSON: {error}") from None
    return {
        "name": message.name,
        "weight": message.weight if message.HasField("weight") else 1.0,
        "params": params,
    }


def function_to_proto(function: RewardFunction) -> pb.RewardFunction:
    message = pb.RewardFunction(
        name=function.name, description=function.description, builtin=function.builtin, source=function.source
    )
    for param in function.describe_params():
        described = message.params.add(
            name=param["name"], type=param["type"], required=param["required"], description=param["description"]
        )
        if not param["required"]:
            json_format.ParseDict(param["default"], described.default_value)
    return message
