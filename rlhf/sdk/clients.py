"""Typed clients of the four services: blocking (FeedbackClient, RewardClient, PolicyClient, InferenceClient)
and asyncio (AsyncFeedbackClient, ...), used by workers, the command line, the gateway, the demo and tests.

Every method is written once, as a description of its RPC (a `Call`: which method, the request, the deadline,
how the answer becomes the result). A blocking client runs it on a grpc channel, an asyncio client on a
grpc.aio channel, so both kinds have the same methods, arguments and results. On the asyncio clients a
method that returns a value is a coroutine, and one that returns an iterator returns an async iterator.

Each client wraps one channel; calls take a deadline. Retries: ScoreBatch retries with backoff while the
reward service is unavailable (a PPO step can wait a little but should not die on a blip), and
SubmitFeedback does too, safely, because every item carries an idempotency key (request_id) that the
feedback service stores once: a replay returns the original row with `duplicate` set.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import json_format

from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from rlhf.inference.v1 import inference_service_pb2 as inf
from rlhf.inference.v1 import inference_service_pb2_grpc as inf_grpc
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.policy.v1 import policy_service_pb2_grpc as pol_grpc
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.reward.v1 import reward_service_pb2_grpc as rw_grpc
from rlhf.runtime import requestids
from rlhf.runtime.config import SecurityConfig, service_address
from rlhf.runtime.tls import open_aio_channel, open_channel
from rlhf.sdk import batching

log = logging.getLogger(__name__)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
T = TypeVar("T")


def channel(
    address: str, options: list[tuple[str, Any]] | None = None, security: SecurityConfig | None = None
) -> grpc.Channel:
    """A channel to `address` with the project's message size limits (and `options` beside them); TLS and the
    bearer token as configured (`security`, default RLHF_TLS_* and RLHF_TOKEN: rlhf.runtime.tls)."""
    return open_channel(address, CHANNEL_OPTIONS + (options or []), security)


def aio_channel(
    address: str, options: list[tuple[str, Any]] | None = None, security: SecurityConfig | None = None
) -> grpc.aio.Channel:
    return open_aio_channel(address, CHANNEL_OPTIONS + (options or []), security)


def algorithm_number(name: str) -> int:
    """The contract's Algorithm for "ppo", "grpo" or "rloo" (any case); ValueError for another name."""
    try:
        return pol.Algorithm.Value(f"ALGORITHM_{name.upper()}")
    except ValueError:
        raise ValueError(f"unknown algorithm {name!r}; use ppo, grpo or rloo") from None


def new_request_id() -> str:
    """A fresh idempotency key for one feedback item."""
    return uuid.uuid4().hex


def feedback_request(agent_id: str, **fields: Any) -> fb.SubmitFeedbackRequest:
    """One feedback item (a rating: prompt, response, score; a comparison: prompt, chosen, rejected), with a
    request_id of its own unless `fields` name one. Fields left None are left unset."""
    fields = {k: v for k, v in fields.items() if v is not None}
    fields["request_id"] = fields.get("request_id") or new_request_id()
    return fb.SubmitFeedbackRequest(agent_id=agent_id, **fields)


def with_request_id(item: fb.SubmitFeedbackRequest) -> fb.SubmitFeedbackRequest:
    """`item` itself when it names a request_id, else a copy with a fresh one (the caller's message stays as is)."""
    if item.request_id:
        return item
    copy = fb.SubmitFeedbackRequest()
    copy.CopyFrom(item)
    copy.request_id = new_request_id()
    return copy


# -- an RPC as data --------------------------------------------------------------------------------------


class Shape(enum.Enum):
    UNARY = "unary"  # one request, one answer: convert(answer)
    COLLECT = "collect"  # one request, a stream of answers gathered: convert(list of answers)
    STREAM = "stream"  # one request, a stream of answers handed on as they arrive: convert(each answer)
    BIDI = "bidi"  # a stream of requests (prepare(each item)), answers handed on as they arrive: convert(each)


def _same(value: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True)
class Call(Generic[T]):
    """One RPC, ready to run on a blocking or an asyncio channel."""

    # The stub's method name, e.g. "SubmitFeedback".
    rpc: str
    # The request message; for Shape.BIDI an iterable (or, on asyncio clients, an async iterable) of items.
    request: Any
    # The deadline in seconds (None: none).
    timeout: float | None
    shape: Shape = Shape.UNARY
    # How the answer (UNARY), the list of answers (COLLECT) or each answer (STREAM, BIDI) becomes the result.
    convert: Callable[[Any], Any] = _same
    # Shape.BIDI: turns each item of `request` into the message sent (or, with `batch`, into a batch's item).
    prepare: Callable[[Any], Any] = _same
    # Shape.BIDI: when set, items go out in batches (rlhf.sdk.batching: whatever is ready, up to batch_items
    # and batch_bytes per message), each message built by batch(list of prepared items).
    batch: Callable[[list[Any]], Any] | None = None
    batch_items: int = 512
    batch_bytes: int = 1024 * 1024
    # Shape.STREAM, BIDI: when set, each answer stands for several results (expand(answer)), each converted.
    expand: Callable[[Any], Iterable[Any]] | None = None
    # UNARY only: how often to retry a RETRYABLE failure, waiting backoff * 2**attempt seconds before each.
    retries: int = 0
    backoff: float = 0.5


def rpc(build: Callable[..., Call[Any]]) -> Callable[..., Any]:
    """Turns a method that builds a Call into one that runs it on the client's channel."""

    @functools.wraps(build)
    def method(self: _Client, *args: Any, **kwargs: Any) -> Any:
        return self._invoke(build(self, *args, **kwargs))

    return method


def _retry_delay(call: Call[Any], error: grpc.RpcError, attempt: int) -> float:
    """Seconds to wait before retrying `call` after its `attempt`-th failure; raises `error` when it is final."""
    if error.code() not in RETRYABLE or attempt >= call.retries:
        raise error
    delay = call.backoff * 2**attempt
    log.warning(
        "%s %s (%s); retry %d/%d in %.1fs",
        call.rpc,
        error.code().name,
        error.details(),
        attempt + 1,
        call.retries,
        delay,
    )
    return delay


# -- running calls: blocking and asyncio -----------------------------------------------------------------


class _Client:
    """The channel, stub and default deadline of one service's client."""

    # The service's name in RLHF_<SERVICE>_ADDR, and its generated stub class (works on both channel kinds).
    service = ""
    stub_class: Any = None
    # The default deadline of unary calls, in seconds.
    default_timeout = 30.0

    def __init__(
        self,
        address: str | None = None,
        timeout: float | None = None,
        *,
        token: str | None = None,
        security: SecurityConfig | None = None,
        forwards: bool = False,
    ) -> None:
        """`token`: the bearer token to send (default RLHF_TOKEN); `security`: TLS files and token (default
        from RLHF_TLS_*); `forwards`: calls inside `rlhf.runtime.tls.forwarding(token)` send that token."""
        self.address = address or service_address(self.service)
        self.timeout = self.default_timeout if timeout is None else timeout
        security = security or SecurityConfig()
        if token is not None:
            security = dataclasses.replace(security, token=token)
        self.channel = self._open(self.address, security, forwards)
        self.stub = self.stub_class(self.channel)

    def _open(self, address: str, security: SecurityConfig, forwards: bool) -> Any:
        raise NotImplementedError

    def _invoke(self, call: Call[Any]) -> Any:
        raise NotImplementedError


class _Blocking(_Client):
    # How a retry waits between attempts; a training worker sets its own (JobContext.sleep), so that a cancel
    # stops the wait at once instead of after the whole backoff.
    sleep: Callable[[float], None] = staticmethod(time.sleep)

    def _open(self, address: str, security: SecurityConfig, forwards: bool) -> grpc.Channel:
        return open_channel(address, CHANNEL_OPTIONS, security, forwards)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _invoke(self, call: Call[Any]) -> Any:
        method = getattr(self.stub, call.rpc)
        metadata = requestids.outgoing()  # the caller's request id, passed on (rlhf.runtime.requestids)
        if call.shape is Shape.UNARY:
            attempt = 0
            while True:
                try:
                    return call.convert(method(call.request, timeout=call.timeout, metadata=metadata))
                except grpc.RpcError as error:
                    self.sleep(_retry_delay(call, error, attempt))
                    attempt += 1
        if call.shape is Shape.COLLECT:
            return call.convert(list(method(call.request, timeout=call.timeout, metadata=metadata)))
        request = call.request if call.shape is Shape.STREAM else map(call.prepare, call.request)
        if call.shape is Shape.BIDI and call.batch is not None:
            request = batching.batches(call.request, call.prepare, call.batch, call.batch_items, call.batch_bytes)
        return _iterate(method(request, timeout=call.timeout, metadata=metadata), call.convert, call.expand)


def _iterate(
    answers: Any, convert: Callable[[Any], Any], expand: Callable[[Any], Iterable[Any]] | None = None
) -> Iterator[Any]:
    """Each answer (or each of what expand(answer) holds) as it arrives; leaving the loop early cancels the call."""
    try:
        for answer in answers:
            if expand is None:
                yield convert(answer)
            else:
                yield from map(convert, expand(answer))
    finally:
        answers.cancel()


class _Async(_Client):
    """Create it inside the event loop that uses it (grpc.aio channels belong to one loop)."""

    def _open(self, address: str, security: SecurityConfig, forwards: bool) -> grpc.aio.Channel:
        return open_aio_channel(address, CHANNEL_OPTIONS, security, forwards)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _invoke(self, call: Call[Any]) -> Any:
        if call.shape in (Shape.UNARY, Shape.COLLECT):
            return self._result(call)
        return self._answers(call)

    async def _result(self, call: Call[Any]) -> Any:
        method = getattr(self.stub, call.rpc)
        metadata = requestids.outgoing()
        if call.shape is Shape.COLLECT:
            answers = method(call.request, timeout=call.timeout, metadata=metadata)
            return call.convert([answer async for answer in answers])
        attempt = 0
        while True:
            try:
                return call.convert(await method(call.request, timeout=call.timeout, metadata=metadata))
            except grpc.RpcError as error:
                await asyncio.sleep(_retry_delay(call, error, attempt))
                attempt += 1

    async def _answers(self, call: Call[Any]) -> AsyncIterator[Any]:
        method = getattr(self.stub, call.rpc)
        request = call.request if call.shape is Shape.STREAM else _amap(call.prepare, call.request)
        if call.shape is Shape.BIDI and call.batch is not None:
            request = batching.abatches(call.request, call.prepare, call.batch, call.batch_items, call.batch_bytes)
        answers = method(request, timeout=call.timeout, metadata=requestids.outgoing())
        try:
            async for answer in answers:
                if call.expand is None:
                    yield call.convert(answer)
                    continue
                for result in call.expand(answer):
                    yield call.convert(result)
        finally:
            answers.cancel()


async def _amap(function: Callable[[Any], Any], items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield function(item)
    else:
        for item in items:
            yield function(item)


# -- the services' methods, written once -----------------------------------------------------------------


def stream_message(items: list[fb.SubmitFeedbackRequest]) -> fb.StreamFeedbackRequest:
    """One StreamFeedback message of `items`, asking for compact acknowledgements. One item alone goes in the
    original single form (acknowledged the original way)."""
    if len(items) == 1:
        return fb.StreamFeedbackRequest(feedback=items[0], compact_acks=True)
    return fb.StreamFeedbackRequest(items=items, compact_acks=True)


class _StreamAcks:
    """One StreamFeedback call's request_ids in index order, so that the server's compact acknowledgements
    (StoredRanges) become one FeedbackAck per item again, as callers of stream() get them. Messages are built
    (message) before they are sent and acknowledgements come in index order, each item once, so the ids of
    acknowledged items leave from the front (deque: the two run on different threads)."""

    def __init__(self) -> None:
        self._request_ids: collections.deque[str] = collections.deque()

    def message(self, items: list[fb.SubmitFeedbackRequest]) -> fb.StreamFeedbackRequest:
        self._request_ids.extend(item.request_id for item in items)
        return stream_message(items)

    def acks(self, answer: fb.StreamFeedbackResponse) -> Iterable[fb.StreamFeedbackResponse | fb.FeedbackAck]:
        pop = self._request_ids.popleft
        if not answer.stored_ranges:
            acks = answer.results or (answer,)
            for _ in range(len(acks)):
                pop()
            return acks
        Ack = fb.FeedbackAck
        return [
            Ack(request_id=pop(), id=str(stored.first_id + k), accepted=True, index=stored.first_index + k)
            for stored in answer.stored_ranges
            for k in range(stored.count)
        ]


def _export_result(chunks: list[fb.ExportFeedbackResponse]) -> tuple[list[fb.Feedback], int]:
    rows = [row for chunk in chunks for row in chunk.feedback]
    return rows, chunks[-1].watermark if chunks else 0


class _FeedbackCalls(_Client):
    service = "feedback"
    stub_class = fb_grpc.FeedbackServiceStub

    @rpc
    def submit(self, agent_id: str, *, retries: int = 3, **fields: Any) -> Call[fb.SubmitFeedbackResponse]:
        """Store one item (fields of SubmitFeedbackRequest). It gets a request_id unless `fields` name one,
        so the retries of an unavailable service (and a caller's own retry with the answer's request_id)
        store it once."""
        return Call("SubmitFeedback", feedback_request(agent_id, **fields), self.timeout, retries=retries)

    @rpc
    def stream(
        self,
        requests: Iterable[fb.SubmitFeedbackRequest] | AsyncIterable[fb.SubmitFeedbackRequest],
        timeout: float | None = 600.0,
        batch_items: int = 512,
    ) -> Call[Iterator[fb.StreamFeedbackResponse | fb.FeedbackAck]]:
        """Stream items on one StreamFeedback call; yields each acknowledgement as the server commits it
        (in order; `index` is the item's position; a FeedbackAck, with the same fields, for items that went
        in a batch). Whatever `requests` has ready goes in one message, up to `batch_items` (1: one message
        per item). Items without a request_id get one. For a long-lived stream that survives restarts, use
        rlhf.sdk.sender.FeedbackSender."""
        acks = _StreamAcks()
        return Call(
            "StreamFeedback",
            requests,
            timeout,
            Shape.BIDI,
            prepare=with_request_id,
            batch=acks.message,
            batch_items=batch_items,
            expand=acks.acks,
        )

    @rpc
    def stats(self, agent_id: str, group_by_policy_version: bool = False) -> Call[fb.GetFeedbackStatsResponse]:
        request = fb.GetFeedbackStatsRequest(agent_id=agent_id, group_by_policy_version=group_by_policy_version)
        return Call("GetFeedbackStats", request, self.timeout)

    @rpc
    def list_feedback(
        self, agent_id: str, page_size: int = 0, page_token: str = "", **filters: Any
    ) -> Call[tuple[list[fb.Feedback], str]]:
        """One page of an agent's rows, newest first: (rows, next_page_token). `filters`: the other fields
        of ListFeedbackRequest (kind, min_score, run_id, ...)."""
        request = fb.ListFeedbackRequest(agent_id=agent_id, page_size=page_size, page_token=page_token, **filters)
        return Call(
            "ListFeedback", request, self.timeout, convert=lambda page: (list(page.feedback), page.next_page_token)
        )

    @rpc
    def delete_feedback(self, agent_id: str, ids: Iterable[str] = (), all: bool = False) -> Call[int]:
        """Delete rows by id, or every row of the agent (all=True); the number deleted."""
        request = fb.DeleteFeedbackRequest(agent_id=agent_id, ids=list(ids), all=all)
        return Call("DeleteFeedback", request, self.timeout, convert=lambda answer: answer.deleted_count)

    @rpc
    def export(
        self, agent_id: str, kind: int = 0, watermark: int = 0, timeout: float | None = 600.0
    ) -> Call[tuple[list[fb.Feedback], int]]:
        """All of an agent's rows up to a watermark fixed when the export starts, and that watermark."""
        request = fb.ExportFeedbackRequest(agent_id=agent_id, kind=kind, watermark=watermark)
        return Call("ExportFeedback", request, timeout, Shape.COLLECT, convert=_export_result)


class _JobCalls(_Client):
    """get, list, cancel and watch of a service with training jobs (policy and reward: same RPCs)."""

    # The service's *_pb2 module.
    messages: Any

    @rpc
    def get_job(self, job_id: str) -> Call[Any]:
        request = self.messages.GetTrainingJobRequest(job_id=job_id)
        return Call("GetTrainingJob", request, self.timeout, convert=lambda answer: answer.job)

    @rpc
    def list_jobs(self, agent_id: str = "", state: int = 0, page_size: int = 0, page_token: str = "") -> Call[Any]:
        """One page of jobs, newest first: (jobs, next_page_token)."""
        request = self.messages.ListTrainingJobsRequest(
            agent_id=agent_id, state=state, page_size=page_size, page_token=page_token
        )
        page = lambda answer: (list(answer.jobs), answer.next_page_token)  # noqa: E731
        return Call("ListTrainingJobs", request, self.timeout, convert=page)

    @rpc
    def cancel_job(self, job_id: str) -> Call[Any]:
        request = self.messages.CancelTrainingJobRequest(job_id=job_id)
        return Call("CancelTrainingJob", request, self.timeout, convert=lambda answer: answer.job)

    @rpc
    def watch(self, job_id: str, timeout: float | None = None) -> Call[Iterator[Any]]:
        """The job now and after every change, until it ends."""
        request = self.messages.WatchTrainingJobRequest(job_id=job_id)
        return Call("WatchTrainingJob", request, timeout, Shape.STREAM, convert=lambda update: update.job)


class _RewardCalls(_JobCalls):
    service = "reward"
    stub_class = rw_grpc.RewardServiceStub
    messages = rw
    default_timeout = 60.0

    @rpc
    def score(
        self,
        agent_id: str,
        pairs: list[tuple[str, str]],
        version: str = "",
        retries: int = 5,
        backoff: float = 0.5,
        functions: list[dict] | None = None,
    ) -> Call[rw.ScoreBatchResponse]:
        """One ScoreBatch call; retried with exponential backoff while the service is unavailable. `functions`:
        registered reward functions to combine, each {"name", "weight", "params"} (ListRewardFunctions)."""
        request = rw.ScoreBatchRequest(
            agent_id=agent_id,
            version=version,
            items=[rw.ScoreItem(prompt=p, response=r) for p, r in pairs],
            functions=[json_format.ParseDict(f, rw.RewardFunctionSpec()) for f in functions or ()],
        )
        return Call("ScoreBatch", request, self.timeout, retries=retries, backoff=backoff)

    @rpc
    def create_job(self, agent_id: str, config: rw.RewardModelConfig | None = None) -> Call[rw.TrainingJob]:
        request = rw.CreateTrainingJobRequest(agent_id=agent_id, config=config)
        return Call("CreateTrainingJob", request, self.timeout, convert=lambda answer: answer.job)

    @rpc
    def get_model(self, agent_id: str, version: str = "") -> Call[rw.RewardModel]:
        request = rw.GetRewardModelRequest(agent_id=agent_id, version=version)
        return Call("GetRewardModel", request, self.timeout, convert=lambda answer: answer.reward_model)

    @rpc
    def list_models(self, agent_id: str) -> Call[list[rw.RewardModel]]:
        request = rw.ListRewardModelsRequest(agent_id=agent_id)
        return Call("ListRewardModels", request, self.timeout, convert=lambda answer: list(answer.reward_models))

    @rpc
    def list_functions(self) -> Call[list[rw.RewardFunction]]:
        """The reward functions `score(functions=...)` and a run's config.reward_functions may name."""
        request = rw.ListRewardFunctionsRequest()
        return Call("ListRewardFunctions", request, self.timeout, convert=lambda answer: list(answer.functions))


class _PolicyCalls(_JobCalls):
    service = "policy"
    stub_class = pol_grpc.PolicyServiceStub
    messages = pol
    default_timeout = 60.0

    @rpc
    def train(self, request: pol.TrainPolicyRequest, timeout: float | None = None) -> Call[pol.TrainPolicyResponse]:
        return Call("TrainPolicy", request, timeout or self.timeout)

    @rpc
    def train_policy(
        self,
        agent_id: str,
        algorithm: str = "ppo",
        config: pol.TrainingConfig | dict | None = None,
        algorithm_config: pol.GRPOConfig | pol.RLOOConfig | dict | None = None,
        timeout: float | None = None,
        **fields: Any,
    ) -> Call[pol.TrainPolicyResponse]:
        """TrainPolicy with the algorithm by name: "ppo", "grpo" or "rloo"; `config`: the shared TrainingConfig
        and `algorithm_config`: GRPO's or RLOO's own knobs (messages or dicts of their fields; unset: TRL's
        defaults); `fields`: the request's others (dry_run, wait, max_steps, reward_model_version, ...)."""
        name = algorithm.lower()
        request = pol.TrainPolicyRequest(agent_id=agent_id, algorithm=algorithm_number(name))
        if config is not None:
            request.config.CopyFrom(config if isinstance(config, pol.TrainingConfig) else pol.TrainingConfig(**config))
        if algorithm_config is not None:
            if name not in ("grpo", "rloo"):
                raise ValueError(f"algorithm_config is for GRPO and RLOO; {algorithm} takes its knobs in config")
            knobs = getattr(request, f"{name}_config")
            knobs.CopyFrom(
                algorithm_config if not isinstance(algorithm_config, dict) else type(knobs)(**algorithm_config)
            )
        for key, value in fields.items():
            setattr(request, key, value)
        return Call("TrainPolicy", request, timeout or self.timeout)

    @rpc
    def resume_job(self, job_id: str) -> Call[pol.TrainingJob]:
        request = pol.ResumeTrainingJobRequest(job_id=job_id)
        return Call("ResumeTrainingJob", request, self.timeout, convert=lambda answer: answer.job)

    @rpc
    def list_policies(self, agent_id: str) -> Call[list[pol.Policy]]:
        request = pol.ListPoliciesRequest(agent_id=agent_id)
        return Call("ListPolicies", request, self.timeout, convert=lambda answer: list(answer.policies))

    @rpc
    def list_policies_page(
        self, agent_id: str, page_size: int = 0, page_token: str = ""
    ) -> Call[tuple[list[pol.Policy], str]]:
        """One page of an agent's versions, newest first: (policies, next_page_token); page_size 0: 50, at most 500."""
        request = pol.ListPoliciesRequest(agent_id=agent_id, page_size=page_size, page_token=page_token)
        return Call(
            "ListPolicies", request, self.timeout, convert=lambda page: (list(page.policies), page.next_page_token)
        )

    @rpc
    def get_policy(self, agent_id: str, version: str = "") -> Call[pol.Policy]:
        request = pol.GetPolicyRequest(agent_id=agent_id, version=version)
        return Call("GetPolicy", request, self.timeout, convert=lambda answer: answer.policy)


def _generation(message: Any, agent_id: str, prompt: str, version: str, routing_key: str, params: dict) -> Any:
    """A GenerateRequest or GenerateStreamRequest (the same fields)."""
    return message(
        agent_id=agent_id,
        prompt=prompt,
        version=version,
        routing_key=routing_key,
        params=inf.SamplingParams(**params),
    )


class _InferenceCalls(_Client):
    service = "inference"
    stub_class = inf_grpc.InferenceServiceStub
    default_timeout = 120.0

    @rpc
    def generate(
        self, agent_id: str, prompt: str, version: str = "", routing_key: str = "", **params: Any
    ) -> Call[inf.GenerateResponse]:
        """One answer; `params`: fields of SamplingParams (max_new_tokens, temperature, seed, ...)."""
        request = _generation(inf.GenerateRequest, agent_id, prompt, version, routing_key, params)
        return Call("Generate", request, self.timeout)

    @rpc
    def generate_stream(
        self, agent_id: str, prompt: str, version: str = "", routing_key: str = "", **params: Any
    ) -> Call[Iterator[inf.GenerateStreamResponse]]:
        """The answer in pieces as they are generated; the last piece has done set."""
        request = _generation(inf.GenerateStreamRequest, agent_id, prompt, version, routing_key, params)
        return Call("GenerateStream", request, self.timeout, Shape.STREAM)

    @rpc
    def set_deployment(self, agent_id: str, weights: dict[str, float]) -> Call[inf.Deployment]:
        targets = [inf.DeploymentTarget(version=v, weight=w) for v, w in weights.items()]
        request = inf.SetDeploymentRequest(agent_id=agent_id, targets=targets)
        return Call("SetDeployment", request, self.timeout, convert=lambda answer: answer.deployment)

    @rpc
    def get_deployment(self, agent_id: str) -> Call[inf.Deployment]:
        request = inf.GetDeploymentRequest(agent_id=agent_id)
        return Call("GetDeployment", request, self.timeout, convert=lambda answer: answer.deployment)

    @rpc
    def get_generation(self, generation_id: str) -> Call[inf.Generation]:
        request = inf.GetGenerationRequest(generation_id=generation_id)
        return Call("GetGeneration", request, self.timeout, convert=lambda answer: answer.generation)


# -- the clients -----------------------------------------------------------------------------------------


class FeedbackClient(_FeedbackCalls, _Blocking):
    """Blocking client of the feedback service."""


class RewardClient(_RewardCalls, _Blocking):
    """Blocking client of the reward service."""


class PolicyClient(_PolicyCalls, _Blocking):
    """Blocking client of the policy service."""


class InferenceClient(_InferenceCalls, _Blocking):
    """Blocking client of the inference service."""


class AsyncFeedbackClient(_FeedbackCalls, _Async):
    """asyncio client of the feedback service (grpc.aio): `await client.submit(...)`,
    `async for ack in client.stream(items)`."""


class AsyncRewardClient(_RewardCalls, _Async):
    """asyncio client of the reward service (grpc.aio)."""


class AsyncPolicyClient(_PolicyCalls, _Async):
    """asyncio client of the policy service (grpc.aio): `async for job in client.watch(job_id)`."""


class AsyncInferenceClient(_InferenceCalls, _Async):
    """asyncio client of the inference service (grpc.aio)."""


def wait_until_serving(address: str, timeout: float = 60.0) -> None:
    """Block until the server at `address` answers its health check with SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no server answered at {address} within {timeout:.0f}s")
            time.sleep(0.2)
