"""The job runner (rlhf.runtime.jobs) with real worker processes and a real SQLite table, no training."""

from __future__ import annotations

import asyncio
import pathlib

import pytest
from sqlalchemy import MetaData

from rlhf.runtime.db import make_engine
from rlhf.runtime.jobs import JobManager, JobStore, jobs_table


def manager(tmp_path: pathlib.Path, worker: str, registered: list) -> JobManager:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    metadata = MetaData()
    table = jobs_table(metadata)
    metadata.create_all(engine)

    async def on_success(job, result) -> str:
        registered.append(result)
        return "v1"

    return JobManager(JobStore(engine, table), tmp_path / "jobs", worker, on_success)


async def cancel_when_running(jobs: JobManager, job_id: str):
    async for job in jobs.watch(job_id):
        if job.state == "RUNNING" and job.progress.get("step", 0) >= 1:
            await jobs.cancel(job_id)
            break
    return await jobs.wait(job_id)


def test_a_cancel_that_lands_after_the_work_is_done_keeps_the_result(tmp_path):
    registered: list = []

    async def scenario():
        jobs = manager(tmp_path, "tests.workers.finishes_anyway", registered)
        job = await jobs.submit("agent", {})
        final = await asyncio.wait_for(cancel_when_running(jobs, job.job_id), 60)
        await jobs.close()
        return final

    final = asyncio.run(scenario())
    assert final.state == "SUCCEEDED" and final.version == "v1", (final.state, final.error)
    assert registered == [{"finished": True, "saw_cancel": True}]


def test_a_cancel_that_stops_the_worker_ends_cancelled_and_registers_nothing(tmp_path):
    registered: list = []

    async def scenario():
        jobs = manager(tmp_path, "tests.workers.stops_on_cancel", registered)
        job = await jobs.submit("agent", {})
        final = await asyncio.wait_for(cancel_when_running(jobs, job.job_id), 60)
        await jobs.close()
        return final

    final = asyncio.run(scenario())
    assert final.state == "CANCELLED" and final.error == "cancelled by request"
    assert final.progress["step"] < 199 and registered == []


@pytest.mark.parametrize("worker", ["tests.workers.finishes_anyway"])
def test_worker_modules_are_importable(worker):
    __import__(worker)
