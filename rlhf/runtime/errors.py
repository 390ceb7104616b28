"""Domain errors and their one mapping to gRPC status codes with rich details (google.rpc.Status).

Domain code raises these; servicers are wrapped by `translate_errors`, which turns them into the right
status code, and any other exception into INTERNAL without leaking a stack trace to the caller.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from rlhf.training.errors import DeadlinePassed, ModelLoadError, NotEnoughData, TrainingError

log = logging.getLogger(__name__)


class DomainError(Exception):
    """Base of errors that map to a gRPC status; `message` is safe to show to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[Any]:
        """Rich error detail messages (google.rpc.*) to attach."""
        return []


class InvalidArgument(DomainError):
    """A request field is invalid; names the field (a BadRequest field violation)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, description: str) -> None:
        super().__init__(f"{field}: {description}")
        self.field = field
        self.description = description

    def details(self) -> list[Any]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.description)
                ]
            )
        ]


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DomainError):
    """The system is not in a state that allows the operation (e.g. too little feedback)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, subject: str = "", kind: str = "STATE") -> None:
        super().__init__(message)
        self.subject = subject
        self.kind = kind

    def details(self) -> list[Any]:
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=self.kind, subject=self.subject, description=self.message
                    )
                ]
            )
        ]


class Unavailable(DomainError):
    """A dependency (another service) cannot be reached; the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def to_rpc_status(error: DomainError) -> grpc.Status:
    """A grpc.Status carrying google.rpc.Status with the error's details in trailing metadata."""
    packed = []
    for detail in error.details():
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=packed)
    return rpc_status.to_status(status)


def from_rpc_error(error: grpc.RpcError, service: str) -> DomainError:
    """Map a failed call to another service into a domain error for our own caller."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    text = error.details() if hasattr(error, "details") else str(error)
    message = f"{service} answered {code.name}: {text}"
    by_code: dict[grpc.StatusCode, type[DomainError]] = {
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    }
    if code == grpc.StatusCode.FAILED_PRECONDITION or code == grpc.StatusCode.INVALID_ARGUMENT:
        return FailedPrecondition(message, subject=service)
    return by_code.get(code, Unavailable)(message)


def field_violation(error: grpc.RpcError) -> tuple[str, str] | None:
    """(field, description) of the first BadRequest field violation another service's error carries."""
    try:
        status = rpc_status.from_call(error)
    except (AttributeError, ValueError):
        return None
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            return bad.field_violations[0].field, bad.field_violations[0].description
    return None


def from_library_error(error: TrainingError) -> DomainError:
    """The status a training-library error stands for when a service meets it."""
    if isinstance(error, ModelLoadError):
        return FailedPrecondition(error.message, subject=error.path, kind="MODEL")
    if isinstance(error, NotEnoughData):
        return FailedPrecondition(error.message, kind="FEEDBACK_COUNT")
    if isinstance(error, DeadlinePassed):
        return DeadlineExceeded(error.message)
    return FailedPrecondition(error.message)


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, TrainingError):
        error = from_library_error(error)
    if isinstance(error, DomainError):
        await context.abort_with_status(to_rpc_status(error))
    incident = uuid.uuid4().hex[:12]
    log.exception("internal error in %s (incident %s)", method, incident, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; the server log has incident {incident}")


def _wrap(method: Callable, name: str) -> Callable:
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - every error gets a status, never a trace
                await _abort(context, error, name)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001
            await _abort(context, error, name)

    return unary_wrapper


def translate_errors(cls: type) -> type:
    """Class decorator for servicers: every public RPC method maps its errors to status codes."""
    for attr, value in list(vars(cls).items()):
        if attr.startswith("_") or not callable(value):
            continue
        if inspect.iscoroutinefunction(value) or inspect.isasyncgenfunction(value):
            setattr(cls, attr, _wrap(value, f"{cls.__name__}.{attr}"))
    return cls
