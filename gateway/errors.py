"""Errors as JSON: `{"error", "message", "fields", ...}` with an HTTP status, from gRPC statuses in one place.

The services attach google.rpc details (rlhf.runtime.errors): BadRequest field violations name the invalid
fields, PreconditionFailure violations say what was missing (type FEEDBACK_COUNT: too little feedback; STATE:
a job's state, such as an active job of the agent). Field names are the REST API's (camelCase at the top
level, snake_case inside `config` as in the dry run's modelConfig).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

# Status code -> (HTTP status, error name) of the answer; FAILED_PRECONDITION depends on its detail.
BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_argument"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_argument"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "already_exists"),
    grpc.StatusCode.ABORTED: (409, "conflict"),
    grpc.StatusCode.FAILED_PRECONDITION: (422, "failed_precondition"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "resource_exhausted"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "unimplemented"),
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "deadline_exceeded"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "unauthenticated"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_denied"),
}
# Answers a client may simply retry later: they carry Retry-After.
RETRY_LATER = {429, 503, 504}
# Precondition types (rlhf.runtime.errors.FailedPrecondition.kind) with their own answer.
BY_PRECONDITION = {"FEEDBACK_COUNT": (422, "not_enough_feedback"), "STATE": (409, "conflict")}
# Top-level request fields whose REST name differs from the gRPC one.
REST_NAMES = {
    "agent_id": "agentId",
    "run_id": "runId",
    "generation_id": "generationId",
    "request_id": "requestId",
    "policy_version": "policyVersion",
    "max_steps": "maxSteps",
    "learning_rate": "learningRate",
    "reward_model_version": "rewardModelVersion",
    "job_id": "jobId",
    "grpo_config": "algorithmConfig",
    "rloo_config": "algorithmConfig",
    "algorithm_config": "algorithmConfig",
}


@dataclasses.dataclass
class ApiError(Exception):
    """An answer other than success; `body()` is its JSON."""

    status: int
    error: str
    message: str
    fields: list[dict[str, str]] = dataclasses.field(default_factory=list)
    violations: list[dict[str, str]] = dataclasses.field(default_factory=list)
    # More members of the body (e.g. the job's URL when a training job failed).
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error, "message": self.message, "fields": self.fields}
        if self.violations:
            body["violations"] = self.violations
        return {**body, **self.extra}


def invalid(field: str, description: str) -> ApiError:
    """400 naming one field of the request."""
    return ApiError(400, "invalid_argument", f"{field}: {description}", [{"field": field, "description": description}])


def rest_field(name: str) -> str:
    head, dot, rest = name.partition(".")
    return REST_NAMES.get(head, head) + dot + rest


def from_rpc_error(error: grpc.RpcError, retry_after: int) -> ApiError:
    """The answer for a failed call to a service."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else "") or code.name
    fields: list[dict[str, str]] = []
    violations: list[dict[str, str]] = []
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [{"field": rest_field(v.field), "description": v.description} for v in bad.field_violations]
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            violations += [
                {"type": v.type, "subject": v.subject, "description": v.description} for v in failure.violations
            ]
    http, name = BY_CODE.get(code, (502, "bad_gateway"))
    if code == grpc.StatusCode.FAILED_PRECONDITION and violations:
        http, name = BY_PRECONDITION.get(violations[0]["type"], (http, name))
    if code == grpc.StatusCode.INVALID_ARGUMENT and fields:
        message = "; ".join(f"{f['field']}: {f['description']}" for f in fields)
    headers = {"Retry-After": str(retry_after)} if http in RETRY_LATER else {}
    if http == 401:  # RFC 6750: say which scheme; the service's advice (RLHF_TOKEN) is for gRPC clients
        headers["WWW-Authenticate"] = "Bearer"
        message = "this API requires a bearer token: send the header 'Authorization: Bearer <token>'"
    return ApiError(http, name, message, fields, violations, headers=headers)
