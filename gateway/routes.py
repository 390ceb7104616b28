"""HTTP transport of the seed's REST API: JSON in, a call through the typed clients, JSON out.

Errors are raised, not caught: gateway.app maps them to JSON answers (gateway.errors) in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from rlhf.sdk.clients import AsyncFeedbackClient, AsyncPolicyClient, wait_until_serving

TERMINAL = (pol.JOB_STATE_SUCCEEDED, pol.JOB_STATE_FAILED, pol.JOB_STATE_CANCELLED, pol.JOB_STATE_INTERRUPTED)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Invalid input: `fields` names each invalid field"},
    404: {"description": "Unknown agent version or job"},
    503: {"description": "A service behind the gateway is down (Retry-After says when to try again)"},
}


@dataclasses.dataclass
class Backends:
    """The gateway's asyncio clients of the services: a request that waits (a blocking training, an event
    stream) holds no thread."""

    config: GatewayConfig
    feedback: AsyncFeedbackClient
    policy: AsyncPolicyClient

    @classmethod
    def open(cls, config: GatewayConfig) -> Backends:
        """Call inside the event loop that serves (grpc.aio channels belong to one loop)."""
        timeout = config.call_timeout_seconds
        # Each call carries its caller's token (ForwardToken in gateway.app), none of the gateway's own.
        security = dataclasses.replace(config.security, token="")
        return cls(
            config,
            AsyncFeedbackClient(config.feedback_address, timeout=timeout, security=security, forwards=True),
            AsyncPolicyClient(config.policy_address, timeout=timeout, security=security, forwards=True),
        )

    async def close(self) -> None:
        await self.feedback.close()
        await self.policy.close()


def backends(request: Request) -> Backends:
    return request.app.state.backends


Services = Annotated[Backends, Depends(backends)]


router = APIRouter()


# -- the seed's three endpoints ----------------------------------------------------------------------------


@router.post("/api/policies/feedback/{agent_id}", tags=["seed"], responses=ERROR_RESPONSES)
async def submit_feedback(agent_id: str, body: FeedbackIn, b: Services) -> dict[str, Any]:
    """Submit feedback for an agent: a rating (`prompt`, `response`, `score` 0..1) as in the seed, or a comparison
    (`prompt`, `chosen`, `rejected`). At least 10 items are needed before a policy can be trained."""
    return feedback_json(await b.feedback.submit(agent_id, **body.to_fields()))


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
async def train_policy(
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
        return dry_run_json(await b.policy.train(message))
    job = (await b.policy.train(message)).job
    url = job_url(request, job.job_id)
    asked_async = "respond-async" in (prefer or "").lower()
    if run_async or asked_async:
        headers = {"Location": url, **({"Preference-Applied": "respond-async"} if asked_async else {})}
        queued = {"status": "queued", "jobId": job.job_id, "agentId": agent_id, "job": url, "events": f"{url}/events"}
        return JSONResponse(queued, status_code=202, headers=headers)
    final = job
    try:
        async for update in b.policy.watch(job.job_id, timeout=c.train_timeout_seconds):
            final = update
    except grpc.RpcError as error:
        raise with_job(from_rpc_error(error, c.retry_after_seconds), job, url) from None
    return await finished(b, final, url)


@router.get("/api/policies/{agent_id}", tags=["seed"], responses=ERROR_RESPONSES)
async def list_policies(agent_id: str, b: Services) -> list[dict[str, Any]]:
    """Every trained policy version of an agent, newest first (an empty list when there is none)."""
    policies, token = await b.policy.list_policies_page(agent_id, page_size=500)
    while token:
        page, token = await b.policy.list_policies_page(agent_id, page_size=500, page_token=token)
        policies += page
    return [policy_json(policy) for policy in policies]


# -- training jobs (the asynchronous form) -----------------------------------------------------------------


def job_url(request: Request, job_id: str) -> str:
    return str(request.url_for("get_job", job_id=job_id))


def with_job(error: ApiError, job: pol.TrainingJob, url: str) -> ApiError:
    error.extra.update({"jobId": job.job_id, "job": url})
    return error


async def finished(b: Backends, job: pol.TrainingJob, url: str) -> dict[str, Any]:
    """The seed's answer for a job that ended, or the error that says why it has no policy."""
    if job.state == pol.JOB_STATE_SUCCEEDED:
        return trained_json(await b.policy.get_policy(job.agent_id, job.policy_version))
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
async def get_job(job_id: str, request: Request, b: Services) -> dict[str, Any]:
    """A training job's state and progress; once it succeeded, `result` is the seed's train_policy answer."""
    job = await b.policy.get_job(job_id)
    body = job_json(job, job_url(request, job_id))
    if job.state == pol.JOB_STATE_SUCCEEDED:
        body["result"] = trained_json(await b.policy.get_policy(job.agent_id, job.policy_version))
    return body


@router.post("/api/jobs/{job_id}/cancel", tags=["jobs"], responses=ERROR_RESPONSES)
async def cancel_job(job_id: str, request: Request, b: Services) -> dict[str, Any]:
    """Cancel a queued or running job (409 when it already ended); its checkpoint is kept."""
    return job_json(await b.policy.cancel_job(job_id), job_url(request, job_id))


@router.get(
    "/api/jobs/{job_id}/events",
    tags=["jobs"],
    responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}, "description": "Server-sent events"}},
)
async def job_events(job_id: str, request: Request, b: Services) -> StreamingResponse:
    """A live stream (server-sent events) of the job: a `progress` event with the job (as GET /api/jobs/{id}) now
    and after every change, then one `done` event when it ends (with `result` once it succeeded), or an `error`
    event if the policy service goes away. Comments keep the connection alive while nothing changes."""
    await b.policy.get_job(job_id)  # an unknown job is a 404 before the stream starts
    url = job_url(request, job_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(b, job_id, url), media_type="text/event-stream", headers=headers)


def sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


async def events(b: Backends, job_id: str, url: str) -> AsyncIterator[str]:
    """WatchTrainingJob as server-sent events; a comment every heartbeat_seconds while the job reports nothing.
    When the client goes away the stream is cancelled, and with it the watch."""
    updates = b.policy.watch(job_id)
    pending: asyncio.Task | None = None
    count = 0
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(updates.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=b.config.heartbeat_seconds)
            if not done:
                yield ": keep-alive\n\n"
                continue
            task, pending = pending, None
            try:
                job = task.result()
            except StopAsyncIteration:
                error = ApiError(503, "unavailable", f"the policy service stopped reporting on job {job_id}")
                yield sse("error", error.body())
                return
            except grpc.RpcError as error:
                yield sse("error", from_rpc_error(error, b.config.retry_after_seconds).body())
                return
            count += 1
            body = job_json(job, url)
            if job.state not in TERMINAL:
                yield sse("progress", body, count)
                continue
            if job.state == pol.JOB_STATE_SUCCEEDED:
                body["result"] = trained_json(await b.policy.get_policy(job.agent_id, job.policy_version))
            yield sse("done", body, count)
            return
    finally:
        if pending is not None:  # the client left while the watch waited: cancelling the wait ends the call
            pending.cancel()
        else:
            with contextlib.suppress(BaseException):
                await updates.aclose()


# -- service endpoints -------------------------------------------------------------------------------------


@router.get("/healthz", tags=["service"])
async def healthz(b: Services) -> JSONResponse:
    """200 when every service the gateway calls answers its health check, else 503; `backends` says which."""
    addresses = {"feedback": b.config.feedback_address, "policy": b.config.policy_address}

    def serving(address: str) -> bool:
        try:
            wait_until_serving(address, timeout=b.config.health_timeout_seconds)
            return True
        except TimeoutError:
            return False

    answers = await asyncio.gather(*(asyncio.to_thread(serving, address) for address in addresses.values()))
    reachable = dict(zip(addresses, answers, strict=True))
    healthy = all(reachable.values())
    body = {
        "status": "ok" if healthy else "degraded",
        "backends": {name: {"address": addresses[name], "reachable": reachable[name]} for name in addresses},
    }
    return JSONResponse(body, status_code=200 if healthy else 503)
