"""Every RPC of the four servicers, in process and without a network: validation and error mapping.

Each servicer is built as its service's app.py builds it (real domain, real SQLite database in a temporary
folder); the reward, policy and inference domains point at services that are not there (a unix socket
nobody listens on), so calls that need another service must map to UNAVAILABLE, never UNKNOWN/INTERNAL.

Every call goes through a grpc_testing (grpcio-testing) server. What grpc_testing does itself: it hosts a
servicer object per service descriptor, dispatches each `invoke_*` to the method the descriptor names (in a
thread of its own), hands client-streamed requests over as they are sent, collects responses one by one,
applies the deadline (time_remaining, DEADLINE_EXCEEDED), turns an exception that escapes a handler into
UNKNOWN, and ends the RPC with the code, details and trailing metadata set on its context, which `invoke`
reads back from `termination()`: the code, the details, the responses and the google.rpc.Status in
`grpc-status-details-bin`.

What it cannot do is host a grpc.aio servicer: it calls handlers synchronously, so an async method's
"response" is an un-awaited coroutine with status OK (`test_grpc_testing_cannot_drive_aio_servicers`); its
context has no async abort, its abort_with_status raises NotImplementedError, and its abort drops the
trailing metadata (`test_grpc_testing_abort_drops_trailing_metadata`), so a rich status could not get
through. `adapt` bridges that and nothing more: it wraps a servicer, unchanged, in a synchronous one whose
methods run the async method on the test's one event loop (`EventLoopThread`, where the domain was built),
client-streamed requests fed in as an async iterator and a server stream stepped one response at a time,
with an `AioContext` whose abort/abort_with_status record the status and raise grpc.aio.AbortError as
grpc.aio's do (our translate_errors relies on that). When a method ends with AbortError the adapter sets
that status's code, details and trailing metadata on grpc_testing's context, which ends the RPC with them.
If grpc_testing learns grpc.aio, those two tests fail and the adapter can go.

grpc_testing does not serialize messages, so `invoke` checks each response's type against the method's
descriptor, as a serializer would. Real-server tests (tests/test_*_service.py) cover everything else:
transport, serialization, interceptors, happy paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pathlib
import threading
import types
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import grpc
import grpc_testing
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import ServiceDescriptor
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


# --- the adapter: our grpc.aio servicers hosted by grpc_testing --------------------------------------------

RPC_TIMEOUT = 30.0  # each RPC's deadline, as a client would send it (the servicers read time_remaining)
_END = object()


class EventLoopThread:
    """The one asyncio loop of a test, run in a background thread.

    The servicer and its domain are built on it (they hold asyncio state: locks, tasks, grpc.aio channels), and
    every RPC's coroutine runs on it; grpc_testing calls handlers from threads of its own, which hand their
    coroutines over with `run` and block until they finish.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="servicer-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run `coroutine` on the loop from any other thread; its result, or its exception raised here."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=RPC_TIMEOUT)

    def close(self) -> None:
        """What asyncio.run does at the end: cancel what is left, close async generators and the executor."""

        async def drain() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            self.run(drain())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=RPC_TIMEOUT)
            self.loop.close()


class AioContext:
    """What a servicer method sees: the parts of grpc.aio.ServicerContext ours use, over grpc_testing's context.

    abort/abort_with_status record the status and raise grpc.aio.AbortError, as grpc.aio's do (our
    `translate_errors` lets AbortError through and turns every other error into an abort); the adapter then
    hands the recorded status to grpc_testing with `end_rpc`. The rest asks grpc_testing's context.
    """

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context  # grpc_testing's: synchronous, safe to call from any thread
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
        return self._context.time_remaining()  # counts down from the deadline grpc_testing was given

    def invocation_metadata(self) -> tuple:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._context.peer()  # grpc_testing raises NotImplementedError: no servicer of ours asks

    def cancelled(self) -> bool:  # grpc_testing has only is_active: the RPC ended before its handler did
        return not self._context.is_active()

    def done(self) -> bool:
        return not self._context.is_active()

    def end_rpc(self) -> None:
        """In grpc_testing's handler thread, after AbortError: the status grpc_testing ends the RPC with.

        Not grpc_testing's `abort(code, details)`: that ends the RPC with empty trailing metadata, dropping
        what set_trailing_metadata set (test_grpc_testing_abort_drops_trailing_metadata), and with it the
        rich status. Setting code, details and trailers and then returning is how grpc_testing keeps all three.
        """
        assert self.aborts == 1, f"a servicer aborted {self.aborts} times"
        self._context.set_trailing_metadata(self.trailing_metadata)
        self._context.set_code(self.code)
        self._context.set_details(self.details)


def _requests_from(requests: Iterator[Message]) -> AsyncIterator[Message]:
    """grpc_testing's request iterator (sync, blocks until the test sends or closes) as grpc.aio's async one."""

    async def read() -> AsyncIterator[Message]:
        while (request := await asyncio.to_thread(next, requests, _END)) is not _END:
            yield request

    return read()


def _as_is(request: Message) -> Message:
    return request


async def _next_response(responses: AsyncIterator[Message]) -> Any:
    try:
        return await anext(responses)
    except StopAsyncIteration:
        return _END


def adapt(servicer: Any, service: ServiceDescriptor, loop: EventLoopThread) -> Any:
    """A synchronous servicer for grpc_testing whose methods run `servicer`'s async ones on `loop`.

    Per RPC method of `service`, by its descriptor: client-streamed requests go in as an async iterator;
    a unary method's coroutine runs to its response, a server-streaming method's async generator is stepped
    one response at a time (grpc_testing sends each as it is yielded). When a method ends with AbortError,
    the status it recorded becomes the RPC's code, details and trailing metadata (the google.rpc.Status in
    `grpc-status-details-bin`). Any other exception escapes to grpc_testing, which ends the RPC with
    UNKNOWN, as a real server would. The servicer runs unchanged: same methods, same translate_errors.
    """

    def unary(method: Callable, feed: Callable) -> Callable:
        def handle(request: Any, context: grpc.ServicerContext) -> Message | None:
            aio_context = AioContext(context)
            try:
                response = loop.run(method(feed(request), aio_context))
            except grpc.aio.AbortError:
                aio_context.end_rpc()
                return None  # grpc_testing completes the RPC with the code, details and trailers set
            assert aio_context.aborts == 0, "a servicer swallowed its own abort"
            return response

        return handle

    def streaming(method: Callable, feed: Callable) -> Callable:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Message]:
            aio_context = AioContext(context)
            responses = method(feed(request), aio_context)
            try:
                while True:
                    try:
                        response = loop.run(_next_response(responses))
                    except grpc.aio.AbortError:
                        aio_context.end_rpc()
                        return
                    if response is _END:
                        assert aio_context.aborts == 0, "a servicer swallowed its own abort"
                        return
                    yield response
            finally:
                loop.run(responses.aclose())

        return handle

    methods = {}
    for descriptor in service.methods:
        method = getattr(servicer, descriptor.name)
        feed = _requests_from if descriptor.client_streaming else _as_is
        methods[descriptor.name] = (streaming if descriptor.server_streaming else unary)(method, feed)
    return types.SimpleNamespace(**methods)


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


@dataclasses.dataclass
class Host:
    """One servicer hosted by a grpc_testing server."""

    service: str
    server: Any  # grpc_testing.Server
    built: Built


def _take_all(rpc: Any) -> list[Message]:
    """A finished streaming RPC's responses (grpc_testing's take_response raises once none are left)."""
    responses = []
    while True:
        try:
            responses.append(rpc.take_response())
        except ValueError:
            return responses


def invoke(host: Host, method: str, request: Any) -> Outcome:
    """One RPC through the grpc_testing server, as a client would send it: unary or streaming, either side
    (a client-streaming `request` is the list of requests to send), with a deadline of RPC_TIMEOUT."""
    descriptor = SERVICES[host.service].methods_by_name[method]
    server = host.server
    if descriptor.client_streaming:
        invoke_streamed = server.invoke_stream_stream if descriptor.server_streaming else server.invoke_stream_unary
        rpc = invoke_streamed(descriptor, (), RPC_TIMEOUT)
        for item in request:
            rpc.send_request(item)
        rpc.requests_closed()
    elif descriptor.server_streaming:
        rpc = server.invoke_unary_stream(descriptor, (), request, RPC_TIMEOUT)
    else:
        rpc = server.invoke_unary_unary(descriptor, (), request, RPC_TIMEOUT)
    if descriptor.server_streaming:
        trailing_metadata, code, details = rpc.termination()
        responses = _take_all(rpc)
    else:
        response, trailing_metadata, code, details = rpc.termination()
        responses = [] if response is None else [response]
        assert responses or code != StatusCode.OK, f"{method} ended OK without a response"
    # grpc_testing hands responses over as objects, never serialized: check what a serializer would.
    for response in responses:
        assert isinstance(response, Message) and response.DESCRIPTOR is descriptor.output_type, (
            f"{method} sent a {type(response).__name__}, not a {descriptor.output_type.name}"
        )
    rich = None
    for key, value in trailing_metadata or ():
        if key == "grpc-status-details-bin":
            rich = status_pb2.Status.FromString(value)
    if rich is not None:  # the rich status must agree with the plain one
        assert (rich.code, rich.message) == (code.value[0], details), (rich, code, details)
    return Outcome(code, details or "", responses, rich)


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


@contextlib.contextmanager
def hosted(service: str, folder: pathlib.Path, setup: Callable[[Built], None] | None = None) -> Iterator[Host]:
    """A fresh servicer (own database in `folder`) built on a loop of its own, `setup(built)` if given,
    hosted by a grpc_testing server through `adapt`; closed like its app closes it afterwards."""
    loop = EventLoopThread()
    try:
        builder = BUILDERS[service](folder)
        built = loop.run(builder.__aenter__())
        try:
            if setup is not None:
                loop.run(_now(setup, built))  # on the loop's thread, where the servicer's own work runs
            descriptor = SERVICES[service]
            adapted = adapt(built.servicer, descriptor, loop)
            server = grpc_testing.server_from_dictionary({descriptor: adapted}, grpc_testing.strict_real_time())
            yield Host(service, server, built)
        finally:
            loop.run(builder.__aexit__(None, None, None))
    finally:
        loop.close()


async def _now(function: Callable[..., Any], *args: Any) -> Any:
    return function(*args)


def call(service: str, method: str, request: Any, folder: pathlib.Path, setup: Callable | None = None) -> Outcome:
    """A fresh hosted servicer, then one call."""
    with hosted(service, folder, setup) as host:
        return invoke(host, method, request)


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
        invalid(service, "GetTrainingJob", pb.GetTrainingJobRequest(), "job_id", name="empty-id"),
        invalid(service, "ListTrainingJobs", pb.ListTrainingJobsRequest(agent_id="../x"), "agent_id"),
        invalid(service, "ListTrainingJobs", pb.ListTrainingJobsRequest(page_token="next"), "page_token"),
        invalid(service, "ListTrainingJobs", pb.ListTrainingJobsRequest(page_size=-1), "page_size"),
        # proto3 enums are open: a newer client may send a state this server does not know.
        invalid(service, "ListTrainingJobs", pb.ListTrainingJobsRequest(state=99), "state"),
        Case(service, "CancelTrainingJob", pb.CancelTrainingJobRequest(job_id=JOB_ID), StatusCode.NOT_FOUND),
        invalid(service, "CancelTrainingJob", pb.CancelTrainingJobRequest(), "job_id", name="empty-id"),
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
        invalid(service, "WatchTrainingJob", pb.WatchTrainingJobRequest(), "job_id", name="empty-id"),
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
    # A max_length beyond the base model's context (256 tokens for the tiny model) is refused up front.
    Case(
        "reward",
        "CreateTrainingJob",
        rw.CreateTrainingJobRequest(agent_id="ag", config=rw.RewardModelConfig(max_length=1024)),
        StatusCode.INVALID_ARGUMENT,
        field="config.max_length",
        says="context of 256",
    ),
    # A base model that cannot be loaded is refused before anything else is asked or started.
    *(
        Case(
            "reward",
            "CreateTrainingJob",
            rw.CreateTrainingJobRequest(agent_id="ag", config=rw.RewardModelConfig(base_model=name)),
            StatusCode.FAILED_PRECONDITION,
            says="could not load model",
            name=f"base-model-{kind}",
        )
        for kind, name in (("hub-id", "someorg/not-on-this-machine"), ("folder", "/no/such/model/folder"))
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
    invalid(
        "reward",
        "ScoreBatch",
        rw.ScoreBatchRequest(
            agent_id="ag", items=[rw.ScoreItem(prompt="p", response="r")], functions=[rw.RewardFunctionSpec(name="x")]
        ),
        "functions[0].name",
    ),
    Case("reward", "ListRewardFunctions", rw.ListRewardFunctionsRequest(), StatusCode.OK),
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
    invalid(
        "policy",
        "TrainPolicy",
        pol.TrainPolicyRequest(
            agent_id="ag", algorithm=pol.ALGORITHM_GRPO, grpo_config=pol.GRPOConfig(num_generations=1)
        ),
        "grpo_config.num_generations",
    ),
    invalid("policy", "TrainPolicy", pol.TrainPolicyRequest(agent_id="ag", algorithm=42), "algorithm"),
    # Responses as long as the context leave no room for a prompt; a reward model's max_length must fit.
    Case(
        "policy",
        "TrainPolicy",
        pol.TrainPolicyRequest(agent_id="ag", dry_run=True, config=pol.TrainingConfig(max_new_tokens=256)),
        StatusCode.INVALID_ARGUMENT,
        field="config.max_new_tokens",
        says="use at most 255",
    ),
    Case(
        "policy",
        "TrainPolicy",
        pol.TrainPolicyRequest(agent_id="ag", dry_run=True, reward_model_config=rw.RewardModelConfig(max_length=1024)),
        StatusCode.INVALID_ARGUMENT,
        field="reward_model_config.max_length",
        says="context of 256",
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
    """The harness itself: a call that succeeds is OK with its response (no abort recorded), and one servicer
    keeps its state across RPCs (all on the one loop)."""
    with hosted("feedback", tmp_path) as host:
        submit = fb.SubmitFeedbackRequest(**RATING, request_id="r-1")
        first = invoke(host, "SubmitFeedback", submit)
        again = invoke(host, "SubmitFeedback", submit)
        export = invoke(host, "ExportFeedback", fb.ExportFeedbackRequest(agent_id="ag"))
    assert (first.code, again.code, export.code) == (StatusCode.OK,) * 3
    assert (first.rich, first.details) == (None, "")
    assert not first.responses[0].duplicate and again.responses[0].duplicate
    assert again.responses[0].id == first.responses[0].id
    assert [[row.request_id for row in chunk.feedback] for chunk in export.responses] == [["r-1"]]


def test_unexpected_error_is_internal_with_an_incident_and_no_trace(tmp_path: pathlib.Path, caplog) -> None:
    """Anything that is not a domain error becomes INTERNAL naming an incident id that the server log has."""

    async def broken(*args: object) -> None:
        raise KeyError("secret-internal-detail")

    with hosted("feedback", tmp_path) as host:
        host.built.domain.stats = broken
        outcome = invoke(host, "GetFeedbackStats", fb.GetFeedbackStatsRequest(agent_id="ag"))
    assert outcome.code == StatusCode.INTERNAL and outcome.rich is None
    assert "secret-internal-detail" not in outcome.details and "Traceback" not in outcome.details
    incident = outcome.details.rsplit(" ", 1)[1]
    assert "FeedbackServicer.GetFeedbackStats" in outcome.details and len(incident) == 12
    assert any(incident in record.getMessage() and record.exc_info for record in caplog.records)


def test_deadline_reaches_the_servicer(tmp_path: pathlib.Path) -> None:
    """time_remaining is grpc_testing's, counting down from the deadline `invoke` sends."""
    seen = []

    async def score(agent_id: str, version: str, pairs: object, time_remaining: float | None, *_) -> None:
        seen.append(time_remaining)
        raise KeyError("stop here")

    with hosted("reward", tmp_path) as host:
        host.built.domain.score = score
        request = rw.ScoreBatchRequest(agent_id="ag", items=[rw.ScoreItem(prompt="p", response="r")])
        outcome = invoke(host, "ScoreBatch", request)
    assert outcome.code == StatusCode.INTERNAL, outcome
    assert len(seen) == 1 and 0 < seen[0] <= RPC_TIMEOUT


def test_grpc_testing_cannot_drive_aio_servicers(tmp_path: pathlib.Path) -> None:
    """Why this file has `adapt`: hosted as it is, an aio servicer's method returns a coroutine that
    grpc_testing takes for the response, reporting OK even for a request that is invalid."""
    with hosted("feedback", tmp_path) as host:
        descriptor = SERVICES["feedback"]
        server = grpc_testing.server_from_dictionary({descriptor: host.built.servicer}, grpc_testing.strict_real_time())
        rpc = server.invoke_unary_unary(
            descriptor.methods_by_name["SubmitFeedback"], (), fb.SubmitFeedbackRequest(agent_id="../x"), None
        )
        response, _, code, _ = rpc.termination()
        try:
            assert asyncio.iscoroutine(response) and code == StatusCode.OK
        finally:
            if asyncio.iscoroutine(response):
                response.close()
        # The same request through the adapter is rejected, naming the field.
        outcome = invoke(host, "SubmitFeedback", fb.SubmitFeedbackRequest(agent_id="../x"))
        assert outcome.code == StatusCode.INVALID_ARGUMENT and outcome.violated_field() == "agent_id"


def test_grpc_testing_abort_drops_trailing_metadata() -> None:
    """Why `AioContext.end_rpc` sets code and details instead of calling grpc_testing's abort: that abort
    ends the RPC with empty trailing metadata (what set_trailing_metadata set is lost, and with it the rich
    status), and its abort_with_status is not implemented. If a grpc_testing release changes either, this
    test fails and the adapter can use them."""
    descriptor = SERVICES["feedback"]
    trailers = (("grpc-status-details-bin", status_pb2.Status(code=5, message="gone").SerializeToString()),)
    raised: list[NotImplementedError] = []

    class Servicer:
        def GetFeedbackStats(self, request: Any, context: grpc.ServicerContext) -> None:
            context.set_trailing_metadata(trailers)
            context.abort(StatusCode.NOT_FOUND, "gone")

        def DeleteFeedback(self, request: Any, context: grpc.ServicerContext) -> None:
            try:
                context.abort_with_status(grpc.Status)  # the class will do: it is never read
            except NotImplementedError as error:
                raised.append(error)
                raise

    server = grpc_testing.server_from_dictionary({descriptor: Servicer()}, grpc_testing.strict_real_time())
    stats = descriptor.methods_by_name["GetFeedbackStats"]
    _, trailing_metadata, code, details = server.invoke_unary_unary(stats, (), None, None).termination()
    assert (code, details) == (StatusCode.NOT_FOUND, "gone")
    assert "grpc-status-details-bin" not in dict(trailing_metadata)
    delete = descriptor.methods_by_name["DeleteFeedback"]
    _, _, code, _ = server.invoke_unary_unary(delete, (), None, None).termination()
    assert code == StatusCode.UNKNOWN and len(raised) == 1


def test_stored_job_rows_are_real_jobs(tmp_path: pathlib.Path) -> None:
    """The `ended_job` setup really stores a job (so the FAILED_PRECONDITION cases test what they say)."""
    with hosted("policy", tmp_path, ended_job("CANCELLED")) as host:
        outcome = invoke(host, "GetTrainingJob", pol.GetTrainingJobRequest(job_id=JOB_ID))
    assert outcome.code == StatusCode.OK, outcome
    job = outcome.responses[0].job
    assert (job.job_id, job.agent_id, job.state) == (JOB_ID, "ag", pol.JOB_STATE_CANCELLED)
