"""One active job per agent and unique job numbers, kept by the database itself (issue 9, defect 9), on SQLite
and, when RLHF_TEST_POSTGRES_URL is set, on PostgreSQL: concurrent creates from many threads, each over its own
engine (as several server replicas would be)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from sqlalchemy import MetaData, text
from sqlalchemy.exc import IntegrityError

from feedback_service.app import start as start_feedback
from feedback_service.config import FeedbackServiceConfig
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.reward.v1 import reward_service_pb2_grpc as rw_grpc
from rlhf.runtime.db import make_engine
from rlhf.runtime.errors import FailedPrecondition
from rlhf.runtime.jobs import FAILED, JobManager, JobStore, jobs_table, utcnow
from tests.helpers import rated_answers, server_config, submit_ratings
from tests.servers import ServerThread
from tests.stack import reward_server

THREADS = 8


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request, tmp_path):
    """(engine factory, MetaData) of a fresh database: a SQLite file, or a schema of its own on PostgreSQL."""
    if request.param == "sqlite":
        url, schema = f"sqlite:///{tmp_path / 'jobs.db'}", None
    else:
        url = os.environ.get("RLHF_TEST_POSTGRES_URL")
        if not url:
            pytest.skip("RLHF_TEST_POSTGRES_URL is not set")
        schema = f"jobs_{uuid.uuid4().hex[:12]}"
        with make_engine(url).begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    engines = []

    def engine():
        engines.append(make_engine(url))
        return engines[-1]

    yield engine, MetaData(schema=schema)
    if schema:
        with engines[0].begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    for made in engines:
        made.dispose()


def store(database) -> JobStore:
    engine, metadata = database
    table = jobs_table(metadata)
    metadata.create_all(engine())
    return JobStore(engine(), table)


def stores(database, count: int) -> list[JobStore]:
    first = store(database)
    make_engine_, _ = database
    return [first] + [JobStore(make_engine_(), first.table) for _ in range(count - 1)]


def all_at_once(count: int, work) -> list:
    """Run work(i) in `count` threads released together; the results (or exceptions) by i."""
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as error:  # noqa: BLE001 - collected for the assertions
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_the_database_refuses_a_second_active_job_of_an_agent(database):
    jobs = store(database)
    jobs.create("agent", {})
    row = dict(spec="{}", progress="{}", result="{}", error="", version="", created_at=utcnow())
    with pytest.raises(IntegrityError), jobs.engine.begin() as conn:  # past the check, as a racing create is
        conn.execute(jobs.table.insert().values(job_id="x1", agent_id="agent", state="RUNNING", seq=100, **row))
    with jobs.engine.begin() as conn:  # an ended job of the same agent is fine
        conn.execute(jobs.table.insert().values(job_id="x2", agent_id="agent", state=FAILED, seq=101, **row))
    with pytest.raises(IntegrityError), jobs.engine.begin() as conn:  # a duplicate number is not
        conn.execute(jobs.table.insert().values(job_id="x3", agent_id="other", state=FAILED, seq=101, **row))


def test_concurrent_creates_for_one_agent_start_exactly_one_job(database):
    replicas = stores(database, THREADS)
    results = all_at_once(THREADS, lambda i: replicas[i].create("agent", {"try": i}))
    started = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, FailedPrecondition)]
    assert len(started) == 1 and len(refused) == THREADS - 1, results
    assert "already has an active training job" in refused[0].message
    assert [j.job_id for j in replicas[0].list(agent_id="agent")] == [started[0].job_id]


def test_concurrent_creates_for_many_agents_get_unique_numbers_and_page_completely(database):
    replicas = stores(database, THREADS)
    results = all_at_once(THREADS, lambda i: replicas[i].create(f"agent{i}", {}))
    assert not [r for r in results if isinstance(r, Exception)], results
    assert len({job.seq for job in results}) == THREADS

    async def every_job_one_per_page() -> list[str]:
        manager = JobManager(replicas[0], pathlib.Path("unused"), "unused", on_success=None)  # type: ignore[arg-type]
        seen, token = [], ""
        while True:
            page, token = await manager.page("", "", 1, token)
            seen += [job.job_id for job in page]
            if not token:
                return seen

    seen = asyncio.run(every_job_one_per_page())
    assert sorted(seen) == sorted(job.job_id for job in results) and len(seen) == THREADS


# Defect 11: what a job's error says after its worker died or the server stopped. ------------------------


def manager(tmp_path: pathlib.Path, resumable: bool, worker: str = "tests.workers.stops_on_cancel") -> JobManager:
    engine = make_engine(f"sqlite:///{tmp_path / 'manager.db'}")
    metadata = MetaData()
    table = jobs_table(metadata)
    metadata.create_all(engine)

    async def on_success(job, result) -> str:
        return "v1"

    return JobManager(JobStore(engine, table), tmp_path / "jobs", worker, on_success, resumable=resumable)


async def running(jobs: JobManager, job_id: str) -> None:
    async for job in jobs.watch(job_id):
        if job.state == "RUNNING" and job.progress.get("step", 0) >= 1:
            return


def test_a_worker_killed_by_a_signal_says_so(tmp_path):
    async def scenario():
        jobs = manager(tmp_path, resumable=True)
        job = await jobs.submit("agent", {})
        await asyncio.wait_for(running(jobs, job.job_id), 60)
        os.kill(jobs._processes[job.job_id].pid, signal.SIGKILL)
        final = await asyncio.wait_for(jobs.wait(job.job_id), 60)
        await jobs.close()
        return final

    final = asyncio.run(scenario())
    assert final.state == "FAILED"
    assert final.error.startswith("worker killed by signal 9 (SIGKILL)"), final.error
    assert "ResumeTrainingJob" in final.error and "\n" not in final.error


@pytest.mark.parametrize("resumable", [True, False])
def test_an_interrupted_job_says_whether_it_can_be_resumed(tmp_path, resumable):
    async def scenario():
        jobs = manager(tmp_path, resumable)
        job = await jobs.submit("agent", {})
        await asyncio.wait_for(running(jobs, job.job_id), 60)
        await jobs.close()  # the server shuts down while the job runs
        return await jobs.get(job.job_id)

    final = asyncio.run(scenario())
    assert final.state == "INTERRUPTED"
    assert ("ResumeTrainingJob" in final.error) == resumable, final.error


# Defect 10: a cancel while the worker waits between ScoreBatch retries. ------------------------------------


def test_a_cancel_ends_the_waits_between_score_retries_at_once(tmp_path):
    async def scenario():
        jobs = manager(tmp_path, resumable=True, worker="tests.workers.scores_while_unavailable")
        job = await jobs.submit("agent", {})
        await asyncio.wait_for(running(jobs, job.job_id), 60)
        await asyncio.sleep(2.0)  # into the backoff (0.5 + 1 + 2 + ... seconds)
        cancelled_at = time.monotonic()
        await jobs.cancel(job.job_id)
        final = await asyncio.wait_for(jobs.wait(job.job_id), 60)
        took = time.monotonic() - cancelled_at
        await jobs.close()
        return final, took

    final, took = asyncio.run(scenario())
    assert final.state == "CANCELLED", (final.state, final.error)
    assert took < 3.0, f"the cancel took {took:.1f} s"


def test_six_simultaneous_create_training_job_calls_start_one_job(tmp_path, tiny_model):
    """Over the RPC, as the review did it: every call passes the checks, the database lets one job in."""
    config = FeedbackServiceConfig.from_env(server=server_config("feedback", tmp_path))
    with ServerThread(start_feedback, config) as feedback:
        reward = reward_server(tmp_path, feedback.address)
        try:
            with feedback.channel() as channel:
                submit_ratings(channel, "agent", rated_answers(12))
            with reward.channel() as channel:
                stub = rw_grpc.RewardServiceStub(channel)
                create = rw.CreateTrainingJobRequest(agent_id="agent", config=rw.RewardModelConfig(num_epochs=1))
                barrier = threading.Barrier(6)

                def one(_: int):
                    barrier.wait()
                    try:
                        return stub.CreateTrainingJob(create, timeout=60).job
                    except grpc.RpcError as error:
                        return error

                with ThreadPoolExecutor(6) as pool:
                    results = list(pool.map(one, range(6)))
                started = [r for r in results if not isinstance(r, grpc.RpcError)]
                refused = [r for r in results if isinstance(r, grpc.RpcError)]
                assert len(started) == 1, results
                assert {r.code() for r in refused} == {grpc.StatusCode.FAILED_PRECONDITION}
                assert "already has an active training job" in refused[0].details()
                stub.CancelTrainingJob(rw.CancelTrainingJobRequest(job_id=started[0].job_id), timeout=30)
                jobs = stub.ListTrainingJobs(rw.ListTrainingJobsRequest(agent_id="agent"), timeout=30).jobs
                assert [j.job_id for j in jobs] == [started[0].job_id]
        finally:
            reward.stop()
