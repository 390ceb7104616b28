"""Several replicas of a service over one database (issue 10, "Replicas on one PostgreSQL").

Job owners and leases, cancel and watch across replicas, and version numbers, with two job managers (two
"replicas") over one jobs table: on SQLite and, when RLHF_TEST_POSTGRES_URL is set, on PostgreSQL. Then two
real replicas of every service over one PostgreSQL (the `postgres` cases below)."""

from __future__ import annotations

import asyncio
import json
import pathlib
import threading

import pytest

from feedback_service.models import NewFeedback
from feedback_service.store import FeedbackStore, commit_in_sequence_order
from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from rlhf.runtime.config import client_service_config
from rlhf.runtime.db import make_engine
from rlhf.runtime.jobs import CANCELLED, INTERRUPTED, RUNNING, SUCCEEDED, JobManager, JobStore
from rlhf.runtime.registry import FEEDBACK_COUNT, SEQUENTIAL, Registry, registry_table
from rlhf.runtime.tls import open_aio_channel
from rlhf.sdk.clients import FeedbackClient
from tests import test_hostile_jobs
from tests.helpers import postgres_schema
from tests.servers import feedback_thread
from tests.test_hostile_jobs import all_at_once, stores

# A fresh jobs database per test, SQLite and PostgreSQL (each engine made by it is one "replica"'s).
database = test_hostile_jobs.database

LEASE = 1.5  # seconds: a heartbeat every 0.5 s, so the tests see expiry quickly


def replica(store: JobStore, tmp_path: pathlib.Path, owner: str, worker: str = "tests.workers.stops_on_cancel"):
    async def on_success(job, result) -> str:
        return "v1"

    return JobManager(
        store, tmp_path / "jobs", worker, on_success, owner=owner, lease_seconds=LEASE, watch_poll_seconds=0.1
    )


async def running(jobs: JobManager, job_id: str) -> None:
    async for job in jobs.watch(job_id):
        if job.state == RUNNING and job.progress.get("step", 0) >= 1:
            return


def test_a_restarted_replica_interrupts_its_own_jobs_and_leaves_the_others_running(database, tmp_path):
    first, second = stores(database, 2)

    async def scenario():
        a, b = replica(first, tmp_path, "a"), replica(second, tmp_path, "b")
        await a.recover()
        await b.recover()
        job_a = await a.submit("agent-a", {})
        job_b = await b.submit("agent-b", {})
        await asyncio.wait_for(asyncio.gather(running(a, job_a.job_id), running(b, job_b.job_id)), 60)
        # Replica "a" starts again (its old process still around: it must stand back, not overwrite).
        a_again = replica(first, tmp_path, "a")
        await a_again.recover()
        after_restart = await b.get(job_a.job_id), await b.get(job_b.job_id)
        await asyncio.sleep(3 * LEASE)  # several heartbeats of both: nobody touches b's job
        still = await a_again.get(job_b.job_id)
        # The old "a" saw that the job is no longer its own at the next progress and stopped its worker.
        stopped = await asyncio.wait_for(_until(lambda: job_a.job_id not in a._tasks), 30)
        final_b = await asyncio.wait_for(b.wait(job_b.job_id), 60)
        final_a = await a_again.get(job_a.job_id)
        for manager in (a, a_again, b):
            await manager.close()
        return after_restart, still, stopped, final_a, final_b

    (interrupted, kept), still, stopped, final_a, final_b = asyncio.run(scenario())
    assert interrupted.state == INTERRUPTED and "server stopped while this job ran" in interrupted.error
    assert kept.state == RUNNING and still.state == RUNNING and still.owner == "b"
    assert still.lease_expires_at > kept.lease_expires_at  # b's heartbeat renewed it
    assert stopped
    assert final_b.state == SUCCEEDED, final_b.error
    assert (final_a.state, final_a.error) == (interrupted.state, interrupted.error)  # not overwritten by old "a"


async def _until(predicate, interval: float = 0.05) -> bool:
    while not predicate():
        await asyncio.sleep(interval)
    return True


def test_the_jobs_of_a_replica_whose_lease_expired_are_interrupted_by_another(database, tmp_path):
    (store,) = stores(database, 1)
    dead = store.create("agent-dead", {}, owner="dead", lease_seconds=LEASE)
    alive = store.create("agent-alive", {}, owner="alive", lease_seconds=600)
    asked = store.create("agent-asked", {}, owner="dead", lease_seconds=LEASE)
    assert store.request_cancel(asked.job_id)

    async def scenario():
        b = replica(store, tmp_path, "b")
        await b.recover()  # the leases are fresh: nothing to do yet
        fresh = await b.get(dead.job_id)
        ended = await asyncio.wait_for(_until(lambda: store.get(dead.job_id).terminal, 0.1), 10)
        await b.close()
        return fresh, ended

    fresh, ended = asyncio.run(scenario())
    assert fresh.state == "QUEUED" and ended
    gone = store.get(dead.job_id)
    assert gone.state == INTERRUPTED and "replica dead" in gone.error and "lease" in gone.error, gone.error
    assert store.get(asked.job_id).state == CANCELLED  # a cancel asked meanwhile is what it ends as
    assert store.get(alive.job_id).state == "QUEUED"  # a live replica's job is left alone


def test_cancel_and_watch_of_another_replicas_job(database, tmp_path):
    first, second = stores(database, 2)

    async def scenario():
        a, b = replica(first, tmp_path, "a"), replica(second, tmp_path, "b")
        await a.recover()
        await b.recover()
        job = await a.submit("agent", {})
        seen = []

        async def watch_on_b():
            async for state in b.watch(job.job_id):
                seen.append(state)

        watcher = asyncio.create_task(watch_on_b())
        await asyncio.wait_for(running(b, job.job_id), 60)  # b sees a's progress by reading the database
        cancelled = await b.cancel(job.job_id)
        await asyncio.wait_for(watcher, 30)
        for manager in (a, b):
            await manager.close()
        return cancelled, seen

    cancelled, seen = asyncio.run(scenario())
    assert cancelled.cancel_requested_at is not None and cancelled.owner == "a"
    assert seen[-1].state == CANCELLED and seen[-1].error == "cancelled by request"
    steps = [state.progress.get("step", 0) for state in seen]
    assert max(steps) >= 1 and steps == sorted(steps)


@pytest.mark.parametrize("naming", [SEQUENTIAL, FEEDBACK_COUNT])
def test_concurrent_registrations_of_one_agent_get_distinct_versions_with_complete_folders(database, tmp_path, naming):
    engine_of, metadata = database
    table = registry_table(metadata, "policies")
    metadata.create_all(engine_of())
    replicas = [Registry(engine_of(), table, "policy", naming) for _ in range(8)]
    placed: list[str] = []
    lock = threading.Lock()

    def register(i: int):
        staging = tmp_path / f"staging{i}"
        staging.mkdir()
        (staging / "model.bin").write_text(str(i))
        version = replicas[i].register_folder("agent", staging, tmp_path / "root", f"job{i}", {"feedback_count": 5})
        with lock:
            placed.append(version.version)
        return version

    results = all_at_once(len(replicas), register)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(v.version_number for v in results) == list(range(1, 9))
    expected = [f"v{n}" for n in range(1, 9)] if naming == SEQUENTIAL else ["v5"] + [f"v5.{n}" for n in range(2, 9)]
    assert sorted(placed) == sorted(expected)
    for version in results:  # each folder is the one its row names, holding what its job staged
        assert (pathlib.Path(version.path) / "model.bin").read_text() == version.job_id.removeprefix("job")
    assert len(replicas[0].list("agent")) == 8
    assert not list(tmp_path.glob("staging*"))


def test_the_job_lease_is_configured_with_a_documented_default(monkeypatch):
    from rlhf.runtime.config import ServerConfig

    assert ServerConfig(service="policy").job_lease_seconds == 30.0
    monkeypatch.setenv("RLHF_JOB_LEASE_SECONDS", "12")
    monkeypatch.setenv("RLHF_REPLICA_ID", "policy-0")
    config = ServerConfig.from_env("policy")
    assert (config.job_lease_seconds, config.resolved_replica_id()) == (12.0, "policy-0")
    shared = ServerConfig(service="policy", database_url="postgresql+psycopg://db/rlhf")
    assert shared.resolved_replica_id() != shared.resolved_replica_id()  # one per process: never shared
    assert ServerConfig(service="policy").resolved_replica_id() == "embedded"  # one process per SQLite file
    with pytest.raises(ValueError, match="lease"):
        JobManager(None, pathlib.Path("unused"), "unused", None, lease_seconds=0)  # type: ignore[arg-type]


# Feedback export watermarks with several writers. -----------------------------------------------------------


def feedback_item(agent_id: str, request_id: str) -> NewFeedback:
    return NewFeedback(
        agent_id=agent_id,
        kind="rating",
        prompt="p",
        response="r",
        score=0.5,
        chosen="",
        rejected="",
        margin=None,
        run_id="",
        notes="",
        generation_id="",
        policy_version="",
        request_id=request_id,
        metadata_json="{}",
    )


@pytest.mark.postgres
def test_a_watermark_never_passes_a_row_another_writer_has_yet_to_commit():
    """Writer A holds an uncommitted row of the agent; writer B's insert of the same agent waits for it, so no
    reader can see B's (higher) sequence as the watermark while A's lower one may still appear below it."""
    with postgres_schema("watermarks") as url:
        engines = [make_engine(url) for _ in range(3)]
        try:
            FeedbackStore(engines[0]).create_tables()
            writer_a, writer_b, reader = (FeedbackStore(engine) for engine in engines)
            with engines[0].begin() as conn:  # writer A, mid-transaction
                commit_in_sequence_order(conn, [feedback_item("agent", "a")])
                (held,) = writer_a._insert_group(conn, [feedback_item("agent", "a")])
                done = threading.Event()
                inserted: list = []
                thread = threading.Thread(
                    target=lambda: (inserted.extend(writer_b.insert_many([feedback_item("agent", "b")])), done.set())
                )
                thread.start()
                waited = not done.wait(1.0)
                watermark_meanwhile = reader.max_sequence("agent")
                other_agent = writer_b.insert_many([feedback_item("other", "c")])  # other agents are not held up
            thread.join(30)
            assert waited and watermark_meanwhile == 0 and other_agent[0].sequence
            assert inserted[0].sequence > held.sequence
            exported = [r.sequence for r in reader.export_chunk("agent", "", reader.max_sequence("agent"), 0, 10)]
            assert exported == [held.sequence, inserted[0].sequence]
        finally:
            for engine in engines:
                engine.dispose()


# Clients reach replicas through gRPC's client-side load balancing. -----------------------------------------


def test_clients_spread_calls_over_every_address_of_a_service(tmp_path):
    """Two feedback servers (each its own SQLite file, so each row tells which one took the call) behind one
    target with two addresses: the SDK's client and a service's own channel (open_aio_channel) reach both."""
    with feedback_thread(tmp_path / "one") as one, feedback_thread(tmp_path / "two") as two:
        target = f"ipv4:{one.address},{two.address}"
        with FeedbackClient(target) as client:
            for i in range(20):
                client.submit("agent", prompt="Q?", response=f"A{i}.", score=0.5)

        async def services_channel() -> None:
            channel = open_aio_channel(target, [])
            stub = fb_grpc.FeedbackServiceStub(channel)
            for i in range(20):
                await stub.SubmitFeedback(
                    fb.SubmitFeedbackRequest(agent_id="service", prompt="Q?", response=f"A{i}.", score=0.5), timeout=10
                )
            await channel.close()

        asyncio.run(services_channel())
        counts = {}
        for name, server in (("one", one), ("two", two)):
            with FeedbackClient(server.address) as client:
                counts[name] = (
                    client.stats("agent").stats.feedback_count,
                    client.stats("service").stats.feedback_count,
                )
    assert all(sdk > 0 and service > 0 for sdk, service in counts.values()), counts
    assert sum(sdk for sdk, _ in counts.values()) == 20 and sum(s for _, s in counts.values()) == 20


def test_load_balancing_is_round_robin_unless_configured(monkeypatch):
    assert json.loads(client_service_config()) == {"loadBalancingConfig": [{"round_robin": {}}]}
    monkeypatch.setenv("RLHF_LOAD_BALANCING", "pick_first")
    assert json.loads(client_service_config()) == {"loadBalancingConfig": [{"pick_first": {}}]}
    monkeypatch.setenv("RLHF_LOAD_BALANCING", "random")
    with pytest.raises(ValueError, match="RLHF_LOAD_BALANCING must be one of round_robin, pick_first"):
        client_service_config()
