"""gRPC servicer: converts protobuf to domain calls and back, nothing else. Errors map in rlhf.errors."""

from __future__ import annotations

import datetime as dt

import grpc
from google.protobuf import timestamp_pb2

from inference_service.domain import InferenceDomain
from inference_service.records import Deployment, GenerateInput, GenerationRecord, ParamsInput, Target
from rlhf.inference.v1 import inference_service_pb2 as pb
from rlhf.inference.v1 import inference_service_pb2_grpc as pb_grpc
from rlhf.runtime.errors import translate_errors


def _timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _params(message: pb.SamplingParams) -> ParamsInput:
    def opt(name: str):
        return getattr(message, name) if message.HasField(name) else None

    return ParamsInput(
        max_new_tokens=opt("max_new_tokens"),
        temperature=opt("temperature"),
        top_k=opt("top_k"),
        top_p=opt("top_p"),
        stop=tuple(message.stop),
        seed=opt("seed"),
    )


def _generate_input(request: pb.GenerateRequest | pb.GenerateStreamRequest) -> GenerateInput:
    return GenerateInput(
        agent_id=request.agent_id,
        prompt=request.prompt,
        version=request.version,
        routing_key=request.routing_key,
        params=_params(request.params),
    )


def _deployment(value: Deployment) -> pb.Deployment:
    return pb.Deployment(
        agent_id=value.agent_id,
        revision=value.revision,
        is_default=value.is_default,
        updated_at=_timestamp(value.updated_at),
        targets=[pb.DeploymentTarget(version=t.version, weight=t.weight) for t in value.targets],
    )


def _generation(record: GenerationRecord) -> pb.Generation:
    return pb.Generation(
        generation_id=record.generation_id,
        agent_id=record.agent_id,
        policy_version=record.policy_version,
        prompt=record.prompt,
        text=record.text,
        created_at=_timestamp(record.created_at),
        routing_key=record.routing_key,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        finish_reason=record.finish_reason.value,
    )


@translate_errors
class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, domain: InferenceDomain) -> None:
        self.domain = domain

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        record = await self.domain.generate(_generate_input(request))
        return pb.GenerateResponse(
            generation_id=record.generation_id,
            text=record.text,
            policy_version=record.policy_version,
            prompt_tokens=record.prompt_tokens,
            completion_tokens=record.completion_tokens,
            finish_reason=record.finish_reason.value,
            created_at=_timestamp(record.created_at),
        )

    async def GenerateStream(self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext):
        async for chunk in self.domain.generate_stream(_generate_input(request)):
            if not chunk.done:
                yield pb.GenerateStreamResponse(
                    text=chunk.text, generation_id=chunk.generation_id, policy_version=chunk.policy_version
                )
                continue
            record = chunk.record
            assert record is not None
            yield pb.GenerateStreamResponse(
                text=chunk.text,
                generation_id=chunk.generation_id,
                policy_version=chunk.policy_version,
                done=True,
                finish_reason=record.finish_reason.value,
                prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens,
            )

    async def SetDeployment(
        self, request: pb.SetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetDeploymentResponse:
        targets = [Target(version=t.version, weight=t.weight) for t in request.targets]
        deployment = await self.domain.set_deployment(request.agent_id, targets)
        return pb.SetDeploymentResponse(deployment=_deployment(deployment))

    async def GetDeployment(
        self, request: pb.GetDeploymentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDeploymentResponse:
        return pb.GetDeploymentResponse(deployment=_deployment(await self.domain.get_deployment(request.agent_id)))

    async def GetGeneration(
        self, request: pb.GetGenerationRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetGenerationResponse:
        record = await self.domain.get_generation(request.generation_id)
        return pb.GetGenerationResponse(generation=_generation(record))
