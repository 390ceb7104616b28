"""The server interceptor that gives every RPC a request id, a log line and its metrics.

One line per RPC, on the `rlhf.requests` logger, when its status is known:

    rpc /rlhf.feedback.v1.FeedbackService/SubmitFeedback code=OK ms=3.2 agent=support-bot request_id=4f0c...

`agent` is the request's agent_id ("-" for client streams, whose items name their own, and for requests
without one). The request id comes from the call's `x-request-id` metadata or is made here, and is bound to
the handler's context (rlhf.runtime.requestids), so the calls the handler makes to other services carry it.
Health checks log at DEBUG (probes would fill the log); grpc's synchronous handlers (reflection) pass untouched.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from rlhf.runtime import requestids
from rlhf.runtime.metrics import ServerMetrics

log = logging.getLogger("rlhf.requests")

_QUIET_PREFIX = "/grpc.health.v1.Health/"
# A handler's kinds, and whether its first argument is the (one) request.
_KINDS = (("unary_unary", True), ("unary_stream", True), ("stream_unary", False), ("stream_stream", False))


def _status(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The name of the status the call ended with."""
    if isinstance(error, asyncio.CancelledError):
        left = context.time_remaining()
        return "DEADLINE_EXCEEDED" if left is not None and left <= 0 else "CANCELLED"
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return "UNKNOWN"  # what grpc answers for an exception that escaped the handler
    return "OK"


class _Call:
    """One RPC under way: when it started, its id and agent; `end` logs and counts it."""

    __slots__ = ("method", "request_id", "agent", "started", "_token", "_metrics")

    def __init__(self, method: str, request_id: str, metrics: ServerMetrics | None, request: Any) -> None:
        self.method = method
        self.request_id = request_id
        agent = getattr(request, "agent_id", "")  # request: None for client streams
        self.agent = agent if isinstance(agent, str) and agent else "-"
        self.started = time.perf_counter()
        self._metrics = metrics
        self._token = requestids.bind(request_id)

    def end(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        seconds = time.perf_counter() - self.started
        code = _status(context, error)
        requestids.unbind(self._token)
        if self._metrics is not None:
            self._metrics.observe_rpc(self.method, code, seconds)
        level = logging.DEBUG if self.method.startswith(_QUIET_PREFIX) else logging.INFO
        log.log(
            level,
            "rpc %s code=%s ms=%.1f agent=%s request_id=%s",
            self.method,
            code,
            seconds * 1000,
            self.agent,
            self.request_id,
        )


def _wrapped(behavior: Callable, start: Callable[[Any], _Call], unary_request: bool) -> Callable:
    """The handler's behavior inside a _Call, as a function of the same kind (grpc.aio tells handlers apart by
    their function's kind). `unary_request`: its first argument is the request, which names the agent."""
    if inspect.isasyncgenfunction(behavior):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = start(request if unary_request else None)
            error: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as caught:
                error = caught
                raise
            finally:
                call.end(context, error)

        return streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = start(request if unary_request else None)
        error: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as caught:
            error = caught
            raise
        finally:
            call.end(context, error)

    return unary


def _is_async(behavior: Callable) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


class RequestLog(grpc.aio.ServerInterceptor):
    """Server interceptor: request id, one log line and the RPC metrics of every call (see module doc).
    Put it first, so that it also sees the calls the interceptors after it refuse (tokens)."""

    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        request_id = requestids.from_metadata(handler_call_details.invocation_metadata) or requestids.new()

        def start(request: Any) -> _Call:
            return _Call(method, request_id, self._metrics, request)

        parse, write = handler.request_deserializer, handler.response_serializer
        for kind, unary_request in _KINDS:
            behavior = getattr(handler, kind)
            if behavior is not None:
                if not _is_async(behavior):
                    return handler
                factory = getattr(grpc, f"{kind}_rpc_method_handler")
                return factory(_wrapped(behavior, start, unary_request), parse, write)
        return handler
