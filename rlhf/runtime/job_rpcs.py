"""The job RPCs every service with training jobs implements alike: get, list, cancel and watch.

A servicer mixes in `JobRpcs`, names its contract's generated module (`messages`) and says how one job
becomes its contract's TrainingJob (`job_message`); the RPCs themselves are written once, here. The
servicer's domain holds the job manager (`domain.jobs`).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from google.protobuf.message import Message

from rlhf.runtime.errors import InvalidArgument, translate_errors
from rlhf.runtime.jobs import Job, JobManager
from rlhf.runtime.timestamps import to_proto


def job_message_fields(job: Job, messages: ModuleType) -> dict[str, Any]:
    """The TrainingJob fields every service's contract shares, from a job: ids, state, error, times, and
    `progress` as the contract's JobProgress with every field the worker reported (by name)."""
    progress = messages.JobProgress()
    for field in progress.DESCRIPTOR.fields:
        value = job.progress.get(field.name)
        if value is None or field.message_type is not None:  # unset, or a map (metrics: filled below)
            continue
        setattr(progress, field.name, value)
    if "metrics" in progress.DESCRIPTOR.fields_by_name:
        progress.metrics.update(job.progress.get("metrics", {}))
    return {
        "job_id": job.job_id,
        "agent_id": job.agent_id,
        "state": messages.JobState.Value(f"JOB_STATE_{job.state}"),
        "progress": progress,
        "error": job.error,
        "created_at": to_proto(job.created_at),
        "started_at": to_proto(job.started_at),
        "finished_at": to_proto(job.finished_at),
    }


@translate_errors
class JobRpcs:
    # The service's *_pb2 module: GetTrainingJobResponse, ListTrainingJobsResponse, JobState, ...
    messages: ModuleType
    # Job -> the contract's TrainingJob message; a staticmethod in the servicer.
    job_message: Callable[[Job], Message]

    def __init__(self, domain: Any) -> None:
        self.domain = domain
        self.jobs: JobManager = domain.jobs

    async def GetTrainingJob(self, request: Any, context: Any) -> Message:
        return self.messages.GetTrainingJobResponse(job=self.job_message(await self.jobs.get(request.job_id)))

    async def ListTrainingJobs(self, request: Any, context: Any) -> Message:
        if request.state not in self.messages.JobState.values():  # proto3 enums are open: any number arrives
            raise InvalidArgument("state", f"unknown job state {request.state}")
        state = self.messages.JobState.Name(request.state).removeprefix("JOB_STATE_") if request.state else ""
        jobs, token = await self.jobs.page(request.agent_id, state, request.page_size, request.page_token)
        return self.messages.ListTrainingJobsResponse(jobs=[self.job_message(j) for j in jobs], next_page_token=token)

    async def CancelTrainingJob(self, request: Any, context: Any) -> Message:
        return self.messages.CancelTrainingJobResponse(job=self.job_message(await self.jobs.cancel(request.job_id)))

    async def WatchTrainingJob(self, request: Any, context: Any):
        async for job in self.jobs.watch(request.job_id):
            yield self.messages.WatchTrainingJobResponse(job=self.job_message(job))
