"""Every RPC of the four servicers, in process and without a network: validation and error mapping.

Each servicer is built as its service's app.py builds it (real domain, real SQLite database in a temporary
folder); the reward, policy and inference domains point at services that are not there (a unix socket
nobody listens on), so calls that need another service must map to UNAVAILABLE, never UNKNOWN/INTERNAL.

Why not grpc_testing (grpcio-testing): its server calls a handler synchronously and takes the return value
as the response, so for our grpc.aio servicers (async methods) the "response" is an un-awaited coroutine
with status OK, and its ServicerContext.abort_with_status raises NotImplementedError (our errors are
rich google.rpc.Status details sent with abort_with_status). `test_grpc_testing_cannot_drive_aio_servicers`
shows the first; if a grpc_testing release learns grpc.aio, that test fails and this file should move to it.
Until then the servicer methods are called directly with `RecordingContext`, a ServicerContext that records
abort/abort_with_status and raises grpc.aio.AbortError like the real one.

Real-server tests (tests/test_*_service.py) cover everything else: transport, streaming, happy paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from feedback_service.config import FeedbackServiceConfig
from feedback_service.domain import FeedbackDomain
from feedback_service.servicer import FeedbackServicer
from feedback_service.store import FeedbackStore
from inference_service.config import InferenceServiceConfig
from inference_service.domain import InferenceDomain
from inference_service.models import ModelCache
from inference_service.policy_client import PolicyClient
from inference_service.servicer import InferenceServicer
from inference_service.store import InferenceStore
from policy_service.config import PolicyServiceConfig
from policy_service.domain import PolicyDomain
from policy_service.servicer import PolicyServicer
from reward_service.config import RewardServiceConfig
from reward_service.domain import RewardDomain
from reward_service.servicer import RewardServicer
from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.inference.v1 import inference_service_pb2 as inf
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.runtime.config import ServerConfig
from rlhf.runtime.db import make_engine
from rlhf.runtime.training_store import TrainingStore

StatusCode = grpc.StatusCode
SERVICES = {
    "feedback": fb.DESCRIPTOR.services_by_name["FeedbackService"],
    "reward": rw.DESCRIPTOR.services_by_name["RewardService"],
    "policy": pol.DESCRIPTOR.services_by_name["PolicyService"],
    "inference": inf.DESCRIPTOR.services_by_name["InferenceService"],
}
JOB_ID = "0123456789abcdef0123456789abcdef"


# --- the context and the driver --------------------------------------------------------------------------


class RecordingContext:
    """The parts of grpc.aio.ServicerContext our servicers use; abort* record the status and raise AbortError."""

    def __init__(self, time_remaining: float | None = 30.0) -> None:
        self._time_remaining = time_remaining
        self.code: StatusCode | None = None
        self.details = ""
        self.trailing_metadata: tuple = ()
        self.aborts = 0

    async def abort(self, code: StatusCode, details: str = "", trailing_metadata: tuple = ()) -> None:
        self.aborts += 1
        self.code, self.details, self.trailing_metadata = code, details, tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    async def abort_with_status(self, status: grpc.Status) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    def time_remaining(self) -> float | None:
        return self._time_remaining

    def invocation_metadata(self) -> tuple:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False


@dataclasses.dataclass
class Outcome:
    code: StatusCode
    details: str
    responses: list[Message]
    rich: status_pb2.Status | None  # the google.rpc.Status sent in the trailers, if any

    def detail(self, kind: type[Message]) -> Message | None:
        for packed in self.rich.details if self.rich else []:
            if packed.Is(kind.DESCRIPTOR):
                message = kind()
                packed.Unpack(message)
                return message
        return None

    def violated_field(self) -> str:
        bad_request = self.detail(error_details_pb2.BadRequest)
        assert bad_request is not None, f"INVALID_ARGUMENT without a BadRequest detail: {self}"
        assert len(bad_request.field_violations) == 1, bad_request
        return bad_request.field_violations[0].field


async def _requests(items: Iterable[Message]) -> AsyncIterator[Message]:
    for item in items:
        yield item


async def invoke(servicer: Any, service: str, method: str, request: Any, context: RecordingContext) -> Outcome:
    """Call one RPC the way grpc.aio would (by its descriptor: unary or streaming, either side)."""
    descriptor = SERVICES[service].methods_by_name[method]
    handler = getattr(servicer, method)
    if descriptor.client_streaming:
        request = _requests(request)
    responses: list[Message] = []
    try:
        if descriptor.server_streaming:
            async for response in handler(request, context):
                responses.append(response)
        else:
            responses.append(await handler(request, context))
    except grpc.aio.AbortError:
        assert context.aborts == 1, "a servicer aborted more than once"
        rich = None
        for key, value in context.trailing_metadata:
            if key == "grpc-status-details-bin":
                rich = status_pb2.Status.FromString(value)
        if rich is not None:  # the rich status must agree with the plain one
            assert (rich.code, rich.message) == (context.code.value[0], context.details)
        return Outcome(context.code, context.details, responses, rich)
    except Exception as error:  # what grpc.aio would send for an exception that escapes a handler
        return Outcome(StatusCode.UNKNOWN, f"{type(error).__name__}: {error}", responses, None)
    assert context.code is None
    return Outcome(StatusCode.OK, "", responses, None)


# --- the servicers, built like each service's app.start ----------------------------------------------------


def nobody_listens(folder: pathlib.Path) -> str:
    """An address that refuses connections at once (no port: nothing can take it in between)."""
    return f"unix:{folder / 'nobody-listens-here.sock'}"


def server_config(service: str, folder: pathlib.Path) -> ServerConfig:
    return ServerConfig(service=service, port=0, data_dir=folder, database_url=f"sqlite:///{folder / service}.db")


@dataclasses.dataclass
class Built:
    servicer: Any
    domain: Any
    store: Any
    folder: pathlib.Path


@contextlib.asynccontextmanager
async def feedback_servicer(folder: pathlib.Path) -> AsyncIterator[Built]:
    config = FeedbackServiceConfig.from_env(server=server_config("feedback", folder), export_chunk_size=4)
    engine = make_engine(config.server.resolved_database_url())
    store = FeedbackStore(engine)
    store.create_tables()
    domain = FeedbackDomain(store, config)
    try:
        yield Built(FeedbackServicer(domain), domain, store, folder)
    finally:
        await domain.close()
        engine.dispose()


@contextlib.asynccontextmanager
async def reward_servicer(folder: pathlib.Path) -> AsyncIterator[Built]:
    config = RewardServiceConfig(server=server_config("reward", folder), feedback_address=nobody_listens(folder))
    engine = make_engine(config.server.resolved_database_url())
    store = TrainingStore(engine, "reward_models", "reward model")
    domain = RewardDomain(config, store)
    await domain.start()
    try:
        yield Built(RewardServicer(domain), domain, store, folder)
    finally:
        await domain.close()
        engine.dispose()


@contextlib.asynccontextmanager
async def policy_servicer(folder: pathlib.Path) -> AsyncIterator[Built]:
    dead = nobody_listens(folder)
    config = PolicyServiceConfig(server=server_config("policy", folder), feedback_address=dead, reward_address=dead)
    engine = make_engine(config.server.resolved_database_url())
    store = TrainingStore(engine, "policies", "policy")
    domain = PolicyDomain(config, store)
    await domain.start()
    try:
        yield Built(PolicyServicer(domain), domain, store, folder)
    finally:
        await domain.close()
        engine.dispose()


@contextlib.asynccontextmanager
async def inference_servicer(folder: pathlib.Path) -> AsyncIterator[Built]:
    config = InferenceServiceConfig(
        server=server_config("inference", folder),
        policy_addr=nobody_listens(folder),
        base_model=str(folder / "no-model-here"),  # 'base' is a folder that does not exist
        device="cpu",
        policy_timeout_seconds=5,
    )
    engine = make_engine(config.server.resolved_database_url())
    store = InferenceStore(engine)
    store.create_schema()
    policies = PolicyClient(config.policy_addr, config.policy_timeout_seconds, config.server.grpc_options())
    domain = InferenceDomain(config, store, policies, ModelCache(2, "cpu"))
    try:
        yield Built(InferenceServicer(domain), domain, store, folder)
    finally:
        await policies.close()
        engine.dispose()


BUILDERS = {
    "feedback": feedback_servicer,
    "reward": reward_servicer,
    "policy": policy_servicer,
    "inference": inference_servicer,
}


def call(service: str, method: str, request: Any, folder: pathlib.Path, setup: Callable | None = None) -> Outcome:
    """A fresh servicer (own database in `folder`), `setup(built)` if given, then one call."""

    async def scenario() -> Outcome:
        async with BUILDERS[service](folder) as built:
            if setup is not None:
                setup(built)
            return await invoke(built.servicer, service, method, request, RecordingContext())

    return asyncio.run(scenario())


# --- state some cases need -------------------------------------------------------------------------------


def ended_job(state: str, spec: dict[str, Any] | None = None) -> Callable[[Built], None]:
    """Store a job of agent 'ag' that already ended in `state`, with id JOB_ID."""

    def setup(built: Built) -> None:
        jobs = built.store.jobs
        job = jobs.create("ag", spec or {"config": {}, "algorithm": "ppo", "reward_model_version": ""})
        jobs.update(job.job_id, state=state)
        with jobs.engine.begin() as conn:  # a known id, so the case's request can name it
            conn.execute(jobs.table.update().values(job_id=JOB_ID).where(jobs.table.c.job_id == job.job_id))

    return setup


def reward_model_without_files(built: Built) -> None:
    """Register reward model v1 of agent 'ag' whose folder holds no model (deleted, or a bad disk)."""
    built.store.registry.register(
        "ag",
        lambda number: str(built.folder / "missing-model"),
        "job-0",
        {
            "feedback_watermark": 1,
            "feedback_count": 1,
            "rating_count": 1,
            "comparison_count": 0,
            "metrics": {},
            "normalization": {"mean": 0.5, "std": 0.1},
            "config": {"base_model": "rlhf-tiny"},
        },
    )


# --- the cases: at least one per RPC -----------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    service: str
    method: str
    request: Any
    code: StatusCode
    field: str = ""  # INVALID_ARGUMENT: the field its BadRequest detail names
    says: str = ""  # a piece of the status message
    setup: Callable[[Built], None] | None = None
    name: str = ""

    @property
    def id(self) -> str:
        return f"{self.service}.{self.method}-{self.name or self.field or self.code.name.lower()}"


def invalid(service: str, method: str, request: Any, field: str, name: str = "") -> Case:
    return Case(service, method, request, StatusCode.INVALID_ARGUMENT, field=field, name=name)


def stamp(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


RATING = dict(agent_id="ag", prompt="p", response="r", score=0.5)

FEEDBACK_CASES = [
    invalid("feedback", "SubmitFeedback", fb.SubmitFeedbackRequest(**{**RATING, "agent_id": "../x"}), "agent_id"),
    invalid("feedback", "SubmitFeedback", fb.SubmitFeedbackRequest(**{**RATING, "score": 1.5}), "score"),
    invalid("feedback", "SubmitFeedback", fb.SubmitFeedbackRequest(**{**RATING, "kind": 99}), "kind", "kind-unknown"),
    invalid(
        "feedback",
        "SubmitFeedback",
        fb.SubmitFeedbackRequest(agent_id="ag", prompt="p", chosen="same", rejected="same"),
        "rejected",
    ),
    invalid("feedback", "ListFeedback", fb.ListFeedbackRequest(agent_id="ag", page_token="x"), "page_token"),
    invalid(
        "feedback", "ListFeedback", fb.ListFeedbackRequest(agent_id="ag", page_token="9" * 20), "page_token", "long"
    ),
    invalid("feedback", "ListFeedback", fb.ListFeedbackRequest(agent_id="ag", kind=7), "kind"),
    invalid(
        "feedback", "ListFeedback", fb.ListFeedbackRequest(agent_id="ag", start_time=stamp(-(10**12))), "start_time"
    ),
    invalid(
        "feedback", "ListFeedback", fb.ListFeedbackRequest(agent_id="ag", min_score=0.9, max_score=0.1), "max_score"
    ),
    invalid("feedback", "GetFeedbackStats", fb.GetFeedbackStatsRequest(agent_id=""), "agent_id"),
    invalid(
        "feedback",
        "GetFeedbackStats",
        fb.GetFeedbackStatsRequest(agent_id="ag", start_time=stamp(200), end_time=stamp(100)),
        "end_time",
    ),
    invalid(
        "feedback",
        "GetFeedbackStats",
        fb.GetFeedbackStatsRequest(agent_id="ag", end_time=stamp(10**12)),
        "end_time",
        "range",
    ),
    invalid("feedback", "ExportFeedback", fb.ExportFeedbackRequest(agent_id="a b"), "agent_id"),
    invalid("feedback", "ExportFeedback", fb.ExportFeedbackRequest(agent_id="ag", watermark=-1), "watermark"),
    invalid("feedback", "ExportFeedback", fb.ExportFeedbackRequest(agent_id="ag", after_sequence=-1), "after_sequence"),
    invalid("feedback", "ExportFeedback", fb.ExportFeedbackRequest(agent_id="ag", kind=5), "kind"),
    invalid("feedback", "DeleteFeedback", fb.DeleteFeedbackRequest(agent_id="ag"), "ids", "none"),
    invalid("feedback", "DeleteFeedback", fb.DeleteFeedbackRequest(agent_id="ag", ids=["1e3"]), "ids", "not-a-number"),
    invalid("feedback", "DeleteFeedback", fb.DeleteFeedbackRequest(agent_id="ag", ids=["1"], all=True), "all"),
    # StreamFeedback never fails the stream for a bad item: test_stream_feedback_rejects_items_alone.
]


def job_cases(service: str, pb: Any) -> list[Case]:
    """The job RPCs both training services share (rlhf.runtime.job_rpcs)."""
    return [
        Case(service, "GetTrainingJob", pb.GetTrainingJobRequest(job_id=JOB_ID), StatusCode.NOT_FOUND, says=JOB_ID),
        Case(service, "GetTrainingJob", pb.GetTrainingJobRequest(), StatusCode.NOT_FOUND, name="empty-id"),
        invalid(service, "ListTrainingJobs", pb.ListTrainingJobsRequest(agent_id="../x"), "agent_id"),
        invalid(service, "ListTrainingJobs", pb.ListTrainingJobsRequest(page_token="next"), "page_token"),
        invalid(service, "ListTrainingJobs", pb.ListTrainingJobsRequest(page_size=-1), "page_size"),
        # proto3 enums are open: a newer client may send a state this server does not know.
        invalid(service, "ListTrainingJobs", pb.ListTrainingJobsRequest(state=99), "state"),
        Case(service, "CancelTrainingJob", pb.CancelTrainingJobRequest(job_id=JOB_ID), StatusCode.NOT_FOUND),
        Case(
            service,
            "CancelTrainingJob",
            pb.CancelTrainingJobRequest(job_id=JOB_ID),
            StatusCode.FAILED_PRECONDITION,
            says="already ended",
            setup=ended_job("SUCCEEDED"),
            name="ended",
        ),
        Case(service, "WatchTrainingJob", pb.WatchTrainingJobRequest(job_id=JOB_ID), StatusCode.NOT_FOUND),
    ]


REWARD_CASES = [
    invalid("reward", "CreateTrainingJob", rw.CreateTrainingJobRequest(agent_id=""), "agent_id"),
    invalid(
        "reward",
        "CreateTrainingJob",
        rw.CreateTrainingJobRequest(agent_id="ag", config=rw.RewardModelConfig(learning_rate=2.0)),
        "config.learning_rate",
    ),
    invalid(
        "reward",
        "CreateTrainingJob",
        rw.CreateTrainingJobRequest(agent_id="ag", config=rw.RewardModelConfig(num_epochs=0)),
        "config.num_epochs",
    ),
    invalid(
        "reward",
        "CreateTrainingJob",
        rw.CreateTrainingJobRequest(agent_id="ag", config=rw.RewardModelConfig(device="tpu")),
        "config.device",
    ),
    # A valid request needs the feedback service (its stats), which is not there.
    Case(
        "reward",
        "CreateTrainingJob",
        rw.CreateTrainingJobRequest(agent_id="ag"),
        StatusCode.UNAVAILABLE,
        says="feedback service",
        name="feedback-down",
    ),
    *job_cases("reward", rw),
    invalid("reward", "ListRewardModels", rw.ListRewardModelsRequest(agent_id="x/y"), "agent_id"),
    invalid("reward", "ListRewardModels", rw.ListRewardModelsRequest(agent_id="ag", page_token="v1"), "page_token"),
    invalid("reward", "GetRewardModel", rw.GetRewardModelRequest(agent_id="ag", version="1"), "version"),
    Case(
        "reward",
        "GetRewardModel",
        rw.GetRewardModelRequest(agent_id="ag"),
        StatusCode.NOT_FOUND,
        says="train one first",
    ),
    Case(
        "reward",
        "GetRewardModel",
        rw.GetRewardModelRequest(agent_id="ag", version="v2"),
        StatusCode.NOT_FOUND,
        says="v2",
        setup=reward_model_without_files,
        name="no-such-version",
    ),
    invalid("reward", "ScoreBatch", rw.ScoreBatchRequest(agent_id="ag"), "items", "empty"),
    invalid(
        "reward",
        "ScoreBatch",
        rw.ScoreBatchRequest(agent_id="ag", items=[rw.ScoreItem(prompt="p", response="r")] * 4097),
        "items",
        "too-many",
    ),
    invalid(
        "reward",
        "ScoreBatch",
        rw.ScoreBatchRequest(agent_id="ag", version="latest!", items=[rw.ScoreItem()]),
        "version",
    ),
    Case(
        "reward",
        "ScoreBatch",
        rw.ScoreBatchRequest(agent_id="ag", items=[rw.ScoreItem(prompt="p", response="r")]),
        StatusCode.NOT_FOUND,
        name="no-model",
    ),
    # A registered version whose folder cannot be loaded: a training-library error, FAILED_PRECONDITION.
    Case(
        "reward",
        "ScoreBatch",
        rw.ScoreBatchRequest(agent_id="ag", items=[rw.ScoreItem(prompt="p", response="r")]),
        StatusCode.FAILED_PRECONDITION,
        says="could not load",
        setup=reward_model_without_files,
        name="model-unloadable",
    ),
]

POLICY_CASES = [
    invalid("policy", "TrainPolicy", pol.TrainPolicyRequest(agent_id="", dry_run=True), "agent_id"),
    invalid("policy", "TrainPolicy", pol.TrainPolicyRequest(agent_id="ag", max_steps=0), "max_steps"),
    invalid("policy", "TrainPolicy", pol.TrainPolicyRequest(agent_id="ag", learning_rate=0.0), "config.learning_rate"),
    invalid(
        "policy",
        "TrainPolicy",
        pol.TrainPolicyRequest(agent_id="ag", config=pol.TrainingConfig(batch_size=4, mini_batch_size=8)),
        "config.mini_batch_size",
    ),
    invalid(
        "policy",
        "TrainPolicy",
        pol.TrainPolicyRequest(agent_id="ag", config=pol.TrainingConfig(top_p=0.0)),
        "config.top_p",
    ),
    invalid(
        "policy",
        "TrainPolicy",
        pol.TrainPolicyRequest(agent_id="ag", reward_model_version="newest", dry_run=True),
        "reward_model_version",
    ),
    Case(
        "policy",
        "TrainPolicy",
        pol.TrainPolicyRequest(agent_id="ag", algorithm=pol.ALGORITHM_GRPO),
        StatusCode.UNIMPLEMENTED,
        says="GRPO",
    ),
    Case(
        "policy",
        "TrainPolicy",
        pol.TrainPolicyRequest(agent_id="ag", dry_run=True),
        StatusCode.UNAVAILABLE,
        says="feedback service",
        name="feedback-down",
    ),
    *job_cases("policy", pol),
    invalid("policy", "ResumeTrainingJob", pol.ResumeTrainingJobRequest(), "job_id"),
    Case("policy", "ResumeTrainingJob", pol.ResumeTrainingJobRequest(job_id=JOB_ID), StatusCode.NOT_FOUND),
    # The job exists and ended; resuming re-checks the feedback, and the feedback service is not there.
    Case(
        "policy",
        "ResumeTrainingJob",
        pol.ResumeTrainingJobRequest(job_id=JOB_ID),
        StatusCode.UNAVAILABLE,
        says="feedback service",
        setup=ended_job("FAILED"),
        name="feedback-down",
    ),
    invalid("policy", "ListPolicies", pol.ListPoliciesRequest(agent_id=""), "agent_id"),
    invalid("policy", "ListPolicies", pol.ListPoliciesRequest(agent_id="ag", page_size=-5), "page_size"),
    invalid("policy", "GetPolicy", pol.GetPolicyRequest(agent_id="ag", version="v0"), "version"),
    Case("policy", "GetPolicy", pol.GetPolicyRequest(agent_id="ag"), StatusCode.NOT_FOUND, says="train one first"),
]

GENERATE = dict(agent_id="ag", prompt="Hello?", version="base")
INFERENCE_CASES = [
    *(
        invalid("inference", method, message(**{**GENERATE, **fields}), field)
        for method, message in (("Generate", inf.GenerateRequest), ("GenerateStream", inf.GenerateStreamRequest))
        for fields, field in (
            (dict(agent_id="a/b"), "agent_id"),
            (dict(prompt=" "), "prompt"),
            (dict(version="v01"), "version"),
            (dict(routing_key="k" * 257), "routing_key"),
            (dict(params=inf.SamplingParams(max_new_tokens=0)), "params.max_new_tokens"),
            (dict(params=inf.SamplingParams(top_p=0.0)), "params.top_p"),
            (dict(params=inf.SamplingParams(stop=["x"] * 17)), "params.stop"),
        )
    ),
    # A version's folder comes from the policy service, which is not there.
    *(
        Case(
            "inference", method, message(**{**GENERATE, "version": "v1"}), StatusCode.UNAVAILABLE, says="policy service"
        )
        for method, message in (("Generate", inf.GenerateRequest), ("GenerateStream", inf.GenerateStreamRequest))
    ),
    # 'base' is a folder that does not exist: the library's ModelLoadError is FAILED_PRECONDITION.
    *(
        Case(
            "inference",
            method,
            message(**GENERATE),
            StatusCode.FAILED_PRECONDITION,
            says="could not load",
            name="base-unloadable",
        )
        for method, message in (("Generate", inf.GenerateRequest), ("GenerateStream", inf.GenerateStreamRequest))
    ),
    invalid("inference", "SetDeployment", inf.SetDeploymentRequest(agent_id="ag"), "targets"),
    invalid(
        "inference",
        "SetDeployment",
        inf.SetDeploymentRequest(agent_id="ag", targets=[inf.DeploymentTarget(version="base", weight=-1)]),
        "targets[0].weight",
    ),
    invalid(
        "inference",
        "SetDeployment",
        inf.SetDeploymentRequest(
            agent_id="ag",
            targets=[inf.DeploymentTarget(version="base", weight=1), inf.DeploymentTarget(version="latest")],
        ),
        "targets[1].version",
    ),
    Case(
        "inference",
        "SetDeployment",
        inf.SetDeploymentRequest(agent_id="ag", targets=[inf.DeploymentTarget(version="v1", weight=1)]),
        StatusCode.UNAVAILABLE,
        says="policy service",
    ),
    invalid("inference", "GetDeployment", inf.GetDeploymentRequest(agent_id=""), "agent_id"),
    Case("inference", "GetDeployment", inf.GetDeploymentRequest(agent_id="ag"), StatusCode.UNAVAILABLE),
    invalid("inference", "GetGeneration", inf.GetGenerationRequest(), "generation_id"),
    invalid("inference", "GetGeneration", inf.GetGenerationRequest(generation_id="g" * 65), "generation_id", "long"),
    Case(
        "inference",
        "GetGeneration",
        inf.GetGenerationRequest(generation_id=str(uuid.UUID(int=1))),
        StatusCode.NOT_FOUND,
        says=str(uuid.UUID(int=1)),
    ),
]

CASES = FEEDBACK_CASES + REWARD_CASES + POLICY_CASES + INFERENCE_CASES


def test_every_rpc_of_every_service_has_a_case() -> None:
    covered = {(case.service, case.method) for case in CASES} | {("feedback", "StreamFeedback")}
    every = {(service, method.name) for service, descriptor in SERVICES.items() for method in descriptor.methods}
    assert every - covered == set()
    assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_rpc_maps_to_its_status(case: Case, tmp_path: pathlib.Path) -> None:
    outcome = call(case.service, case.method, case.request, tmp_path, case.setup)
    assert outcome.code not in (StatusCode.UNKNOWN, StatusCode.INTERNAL), outcome
    assert outcome.code == case.code, outcome
    if case.code == StatusCode.OK:
        return
    assert outcome.rich is not None, "domain errors carry a google.rpc.Status"
    assert outcome.details and case.says in outcome.details, outcome
    if case.code == StatusCode.INVALID_ARGUMENT:
        assert outcome.violated_field() == case.field
        assert outcome.details.startswith(f"{case.field}: ")
    if case.code == StatusCode.FAILED_PRECONDITION:
        failure = outcome.detail(error_details_pb2.PreconditionFailure)
        assert failure is not None and failure.violations[0].description == outcome.details


# --- what the table cannot express -----------------------------------------------------------------------


def test_stream_feedback_rejects_items_alone(tmp_path: pathlib.Path) -> None:
    """Bad items in a stream are rejected in their own acks, naming the field; the stream goes on."""
    items = [
        fb.SubmitFeedbackRequest(**RATING, request_id="ok-0"),
        fb.SubmitFeedbackRequest(**{**RATING, "score": 7.0}, request_id="bad-score"),
        fb.SubmitFeedbackRequest(**{**RATING, "kind": 42}, request_id="bad-kind"),
        fb.SubmitFeedbackRequest(**{**RATING, "agent_id": ""}, request_id="bad-agent"),
        fb.SubmitFeedbackRequest(**RATING, request_id="ok-1"),
    ]
    outcome = call("feedback", "StreamFeedback", [fb.StreamFeedbackRequest(feedback=i) for i in items], tmp_path)
    assert outcome.code == StatusCode.OK, outcome
    acks = outcome.responses
    assert [(a.index, a.request_id, a.accepted) for a in acks] == [
        (0, "ok-0", True),
        (1, "bad-score", False),
        (2, "bad-kind", False),
        (3, "bad-agent", False),
        (4, "ok-1", True),
    ]
    assert [a.field for a in acks] == ["", "score", "kind", "agent_id", ""]
    assert all(a.reason for a in acks if not a.accepted) and all(a.id == "" for a in acks if not a.accepted)
    assert int(acks[4].id) > int(acks[0].id) > 0


def test_feedback_happy_path_in_process(tmp_path: pathlib.Path) -> None:
    """The harness itself: a call that succeeds is OK with its response (no abort recorded)."""

    async def scenario() -> tuple[Outcome, Outcome, Outcome]:
        async with feedback_servicer(tmp_path) as built:
            submit = fb.SubmitFeedbackRequest(**RATING, request_id="r-1")
            first = await invoke(built.servicer, "feedback", "SubmitFeedback", submit, RecordingContext())
            again = await invoke(built.servicer, "feedback", "SubmitFeedback", submit, RecordingContext())
            export = await invoke(
                built.servicer,
                "feedback",
                "ExportFeedback",
                fb.ExportFeedbackRequest(agent_id="ag"),
                RecordingContext(),
            )
            return first, again, export

    first, again, export = asyncio.run(scenario())
    assert (first.code, again.code, export.code) == (StatusCode.OK,) * 3
    assert not first.responses[0].duplicate and again.responses[0].duplicate
    assert again.responses[0].id == first.responses[0].id
    assert [[row.request_id for row in chunk.feedback] for chunk in export.responses] == [["r-1"]]


def test_unexpected_error_is_internal_with_an_incident_and_no_trace(tmp_path: pathlib.Path, caplog) -> None:
    """Anything that is not a domain error becomes INTERNAL naming an incident id that the server log has."""

    async def scenario() -> Outcome:
        async with feedback_servicer(tmp_path) as built:

            async def broken(*args: object) -> None:
                raise KeyError("secret-internal-detail")

            built.domain.stats = broken
            request = fb.GetFeedbackStatsRequest(agent_id="ag")
            return await invoke(built.servicer, "feedback", "GetFeedbackStats", request, RecordingContext())

    outcome = asyncio.run(scenario())
    assert outcome.code == StatusCode.INTERNAL and outcome.rich is None
    assert "secret-internal-detail" not in outcome.details and "Traceback" not in outcome.details
    incident = outcome.details.rsplit(" ", 1)[1]
    assert "FeedbackServicer.GetFeedbackStats" in outcome.details and len(incident) == 12
    assert any(incident in record.getMessage() and record.exc_info for record in caplog.records)


def test_grpc_testing_cannot_drive_aio_servicers(tmp_path: pathlib.Path) -> None:
    """Why this file calls the servicers itself: grpc_testing treats the coroutine an async method returns as
    the response and reports OK, even for a request that is invalid."""
    grpc_testing = pytest.importorskip("grpc_testing")

    async def build() -> FeedbackServicer:
        async with feedback_servicer(tmp_path) as built:
            return built.servicer

    servicer = asyncio.run(build())
    descriptor = SERVICES["feedback"]
    server = grpc_testing.server_from_dictionary({descriptor: servicer}, grpc_testing.strict_real_time())
    rpc = server.invoke_unary_unary(
        descriptor.methods_by_name["SubmitFeedback"], (), fb.SubmitFeedbackRequest(agent_id="../x"), None
    )
    response, _, code, _ = rpc.termination()
    try:
        assert asyncio.iscoroutine(response) and code == StatusCode.OK
    finally:
        if asyncio.iscoroutine(response):
            response.close()


def test_stored_job_rows_are_real_jobs(tmp_path: pathlib.Path) -> None:
    """The `ended_job` setup really stores a job (so the FAILED_PRECONDITION cases test what they say)."""

    async def scenario() -> Outcome:
        async with policy_servicer(tmp_path) as built:
            ended_job("CANCELLED")(built)
            request = pol.GetTrainingJobRequest(job_id=JOB_ID)
            return await invoke(built.servicer, "policy", "GetTrainingJob", request, RecordingContext())

    outcome = asyncio.run(scenario())
    assert outcome.code == StatusCode.OK, outcome
    job = outcome.responses[0].job
    assert (job.job_id, job.agent_id, job.state) == (JOB_ID, "ag", pol.JOB_STATE_CANCELLED)
