"""HTTP transport of the seed's REST API: JSON in, a call through the typed clients, JSON out.

Errors are raised, not caught: gateway.app maps them to JSON answers (gateway.errors) in one place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gateway.config import GatewayConfig
from gateway.errors import ApiError, from_rpc_error
from gateway.schemas import (
    FeedbackIn,
    TrainIn,
    dry_run_json,
    feedback_json,
    job_json,
    policy_json,
    train_request,
    trained_json,
)
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.sdk.clients import FeedbackClient, PolicyClient, wait_until_serving

TERMINAL = (pol.JOB_STATE_SUCCEEDED, pol.JOB_STATE_FAILED, pol.JOB_STATE_CANCELLED, pol.JOB_STATE_INTERRUPTED)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid input: `fields` names each invalid field"},
    404: {"description": "Unknown agent version or job"},
    503: {"description": "A service behind the gateway is down (Retry-After says when to try again)"},
}


@dataclasses.dataclass
class Backends:
    """The gateway's clients of the services, and a thread pool for job event streams (each waits in a thread)."""

    config: GatewayConfig
    feedback: FeedbackClient
    policy: PolicyClient
    streams: concurrent.futures.ThreadPoolExecutor

    @classmethod
    def open(cls, config: GatewayConfig) -> Backends:
        timeout = config.call_timeout_seconds
        return cls(
            config,
            FeedbackClient(config.feedback_address, timeout=timeout),
            PolicyClient(config.policy_address, timeout=timeout),
            concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="job-events"),
        )

    def close(self) -> None:
        self.streams.shutdown(wait=False, cancel_futures=True)
        self.feedback.close()
        self.policy.close()


def backends(request: Request) -> Backends:
    return request.app.state.backends


Services = Annotated[Backends, Depends(backends)]


router = APIRouter()


# -- the seed's three endpoints ----------------------------------------------------------------------------


@router.post("/api/policies/feedback/{agent_id}", tags=["seed"], responses=ERROR_RESPONSES)
def submit_feedback(agent_id: str, body: FeedbackIn, b: Services) -> dict[str, Any]:
    """Submit feedback for an agent: a rating (`prompt`, `response`, `score` 0..1) as in the seed, or a comparison
    (`prompt`, `chosen`, `rejected`). At least 10 items are needed before a policy can be trained."""
    return feedback_json(b.feedback.submit(agent_id, **body.to_fields()))


@router.post(
    "/api/policies/train_policy/{agent_id}",
    tags=["seed"],
    responses={
        **ERROR_RESPONSES,
        202: {"description": "Asynchronous form: the job was started; Location is its URL"},
        409: {"description": "The agent already has a training job running"},
        422: {"description": "Fewer feedback items than training needs (10)"},
    },
)
def train_policy(
    agent_id: str,
    request: Request,
    b: Services,
    body: TrainIn | None = None,
    run_async: Annotated[bool, Query(alias="async", description="Answer 202 at once with the job's URL")] = False,
    prefer: Annotated[str | None, Header(description="`respond-async` does what ?async=true does")] = None,
) -> Any:
    """Train a new policy with RLHF (blocks until it is trained), or estimate it (`dryRun`). With `?async=true` or
    `Prefer: respond-async` it answers 202 at once; follow the job at its URL or its event stream."""
    body = body or TrainIn()
    c = b.config
    message = train_request(agent_id, body, c.training_defaults, c.training_overrides, c.reward_model_config)
    if body.dry_run:
        return dry_run_json(b.policy.train(message))
    job = b.policy.train(message).job
    url = job_url(request, job.job_id)
    asked_async = "respond-async" in (prefer or "").lower()
    if run_async or asked_async:
        headers = {"Location": url, **({"Preference-Applied": "respond-async"} if asked_async else {})}
        queued = {"status": "queued", "jobId": job.job_id, "agentId": agent_id, "job": url, "events": f"{url}/events"}
        return JSONResponse(queued, status_code=202, headers=headers)
    final = job
    try:
        for update in b.policy.watch(job.job_id, timeout=c.train_timeout_seconds):
            final = update
    except grpc.RpcError as error:
        raise with_job(from_rpc_error(error, c.retry_after_seconds), job, url) from None
    return finished(b, final, url)


@router.get("/api/policies/{agent_id}", tags=["seed"], responses=ERROR_RESPONSES)
def list_policies(agent_id: str, b: Services) -> list[dict[str, Any]]:
    """Every trained policy version of an agent, newest first (an empty list when there is none)."""
    policies, token = b.policy.list_policies_page(agent_id, page_size=500)
    while token:
        page, token = b.policy.list_policies_page(agent_id, page_size=500, page_token=token)
        policies += page
    return [policy_json(policy) for policy in policies]


# -- training jobs (the asynchronous form) -----------------------------------------------------------------


def job_url(request: Request, job_id: str) -> str:
    return str(request.url_for("get_job", job_id=job_id))


def with_job(error: ApiError, job: pol.TrainingJob, url: str) -> ApiError:
    error.extra.update({"jobId": job.job_id, "job": url})
    return error


def finished(b: Backends, job: pol.TrainingJob, url: str) -> dict[str, Any]:
    """The seed's answer for a job that ended, or the error that says why it has no policy."""
    if job.state == pol.JOB_STATE_SUCCEEDED:
        return trained_json(b.policy.get_policy(job.agent_id, job.policy_version))
    retry = {"Retry-After": str(b.config.retry_after_seconds)}
    if job.state == pol.JOB_STATE_FAILED:
        error = ApiError(500, "training_failed", f"training job {job.job_id} failed: {job.error}")
    elif job.state == pol.JOB_STATE_CANCELLED:
        error = ApiError(409, "cancelled", f"training job {job.job_id} was cancelled: {job.error}")
    elif job.state == pol.JOB_STATE_INTERRUPTED:
        error = ApiError(
            503,
            "interrupted",
            f"the policy service stopped while training job {job.job_id} ran; `rlhf jobs resume {job.job_id}` "
            f"continues it from its last checkpoint",
            headers=retry,
        )
    else:
        message = f"the policy service stopped reporting on job {job.job_id}; it may still run"
        error = ApiError(503, "unavailable", message, headers=retry)
    raise with_job(error, job, url)


@router.get("/api/jobs/{job_id}", tags=["jobs"], responses=ERROR_RESPONSES)
def get_job(job_id: str, request: Request, b: Services) -> dict[str, Any]:
    """A training job's state and progress; once it succeeded, `result` is the seed's train_policy answer."""
    job = b.policy.get_job(job_id)
    body = job_json(job, job_url(request, job_id))
    if job.state == pol.JOB_STATE_SUCCEEDED:
        body["result"] = trained_json(b.policy.get_policy(job.agent_id, job.policy_version))
    return body


@router.post("/api/jobs/{job_id}/cancel", tags=["jobs"], responses=ERROR_RESPONSES)
def cancel_job(job_id: str, request: Request, b: Services) -> dict[str, Any]:
    """Cancel a queued or running job (409 when it already ended); its checkpoint is kept."""
    return job_json(b.policy.cancel_job(job_id), job_url(request, job_id))


@router.get(
    "/api/jobs/{job_id}/events",
    tags=["jobs"],
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}},
)
def job_events(job_id: str, request: Request, b: Services) -> StreamingResponse:
    """A live stream (server-sent events) of the job: a `progress` event with the job (as GET /api/jobs/{id}) now
    and after every change, then one `done` event when it ends (with `result` once it succeeded), or an `error`
    event if the policy service goes away. Comments keep the connection alive while nothing changes."""
    b.policy.get_job(job_id)  # an unknown job is a 404 before the stream starts
    url = job_url(request, job_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(b, job_id, url), media_type="text/event-stream", headers=headers)


def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


async def events(b: Backends, job_id: str, url: str) -> AsyncIterator[str]:
    """WatchTrainingJob as server-sent events. The watch runs on a channel of its own, in a thread: closing the
    channel when the client goes away ends the call at once."""
    client = PolicyClient(b.config.policy_address, timeout=b.config.call_timeout_seconds)
    updates = iter(client.watch(job_id))
    loop = asyncio.get_running_loop()
    pending: asyncio.Future | None = None
    count = 0
    try:
        while True:
            if pending is None:
                pending = loop.run_in_executor(b.streams, next, updates, None)
            done, _ = await asyncio.wait({pending}, timeout=b.config.heartbeat_seconds)
            if not done:
                yield ": keep-alive\n\n"
                continue
            future, pending = pending, None
            try:
                job = future.result()
            except grpc.RpcError as error:
                yield sse("error", from_rpc_error(error, b.config.retry_after_seconds).body())
                return
            if job is None:
                error = ApiError(503, "unavailable", f"the policy service stopped reporting on job {job_id}")
                yield sse("error", error.body())
                return
            count += 1
            body = job_json(job, url)
            if job.state not in TERMINAL:
                yield sse("progress", body, count)
                continue
            if job.state == pol.JOB_STATE_SUCCEEDED:
                policy = await loop.run_in_executor(b.streams, client.get_policy, job.agent_id, job.policy_version)
                body["result"] = trained_json(policy)
            yield sse("done", body, count)
            return
    finally:
        if pending is not None:  # the client left while the watch waited: its error is expected, not news
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        client.close()


# -- service endpoints -------------------------------------------------------------------------------------


@router.get("/healthz", tags=["service"])
def healthz(b: Services) -> JSONResponse:
    """200 when every service the gateway calls answers its health check, else 503; `backends` says which."""
    addresses = {"feedback": b.config.feedback_address, "policy": b.config.policy_address}

    def serving(address: str) -> bool:
        try:
            wait_until_serving(address, timeout=b.config.health_timeout_seconds)
            return True
        except TimeoutError:
            return False

    with concurrent.futures.ThreadPoolExecutor(len(addresses)) as pool:
        reachable = dict(zip(addresses, pool.map(serving, addresses.values()), strict=True))
    healthy = all(reachable.values())
    body = {
        "status": "ok" if healthy else "degraded",
        "backends": {name: {"address": addresses[name], "reachable": reachable[name]} for name in addresses},
    }
    return JSONResponse(body, status_code=200 if healthy else 503)
