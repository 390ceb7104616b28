"""Several replicas of a service over one database (issue 10, "Replicas on one PostgreSQL").

Job owners and leases, cancel and watch across replicas, and version numbers, with two job managers (two
"replicas") over one jobs table: on SQLite and, when RLHF_TEST_POSTGRES_URL is set, on PostgreSQL. Then two
real replicas of every service over one PostgreSQL (the `postgres` cases below)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import pathlib
import threading

import grpc
import pytest

from feedback_service.app import start as start_feedback
from feedback_service.config import FeedbackServiceConfig
from feedback_service.store import FeedbackStore, commit_in_sequence_order
from inference_service.app import start as start_inference
from inference_service.config import InferenceServiceConfig
from policy_service.app import start as start_policy
from policy_service.config import PolicyServiceConfig
from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.runtime.config import ServerConfig, client_service_config
from rlhf.runtime.db import make_engine
from rlhf.runtime.jobs import CANCELLED, INTERRUPTED, RUNNING, SUCCEEDED, JobManager, JobStore
from rlhf.runtime.migrations import SCHEMAS
from rlhf.runtime.registry import FEEDBACK_COUNT, SEQUENTIAL, Registry, registry_table
from rlhf.runtime.tls import open_aio_channel
from rlhf.sdk.clients import FeedbackClient, InferenceClient, PolicyClient, RewardClient
from tests import test_hostile_jobs
from tests.helpers import postgres_schema, rated_answers, wait_for
from tests.servers import ServerThread, ServiceProcess, feedback_thread
from tests.test_feedback_service import new_item
from tests.test_hostile_jobs import all_at_once, stores
from tests.test_policy_service import worker_pids

# A fresh jobs database per test, SQLite and PostgreSQL (each engine made by it is one "replica"'s).
database = test_hostile_jobs.database

LEASE = 1.5  # seconds: a heartbeat every 0.5 s, so the tests see expiry quickly


def replica(store: JobStore, tmp_path: pathlib.Path, owner: str, worker: str = "tests.workers.counts_steps"):
    async def on_success(job, result) -> str:
        return "v1"

    return JobManager(
        store, tmp_path / "jobs", worker, on_success, owner=owner, lease_seconds=LEASE, watch_poll_seconds=0.1
    )


async def started(store: JobStore, tmp_path: pathlib.Path, owner: str) -> JobManager:
    """A replica's job manager once it has recovered (and its heartbeat runs)."""
    jobs = replica(store, tmp_path, owner)
    await jobs.recover()
    return jobs


async def running(jobs: JobManager, job_id: str) -> None:
    async for job in jobs.watch(job_id):
        if job.state == RUNNING and job.progress.get("step", 0) >= 1:
            return


def test_a_restarted_replica_interrupts_its_own_jobs_and_leaves_the_others_running(database, tmp_path):
    first, second = stores(database, 2)

    async def scenario():
        a, b = await started(first, tmp_path, "a"), await started(second, tmp_path, "b")
        job_a = await a.submit("agent-a", {"steps": 600})
        job_b = await b.submit("agent-b", {"steps": 120})  # 6 s: past the restart and several heartbeats
        await asyncio.wait_for(asyncio.gather(running(a, job_a.job_id), running(b, job_b.job_id)), 60)
        # Replica "a" starts again (its old process still around: it must stand back, not overwrite).
        a_again = await started(first, tmp_path, "a")
        after_restart = await b.get(job_a.job_id), await b.get(job_b.job_id)
        await asyncio.sleep(2 * LEASE)  # several heartbeats of both: nobody touches b's job
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
    legacy = store.create("agent-legacy", {}, owner="", lease_seconds=600)
    store.update(legacy.job_id, owner=None, lease_expires_at=None)  # as a version before replicas left it

    async def scenario():
        b = await started(store, tmp_path, "b")  # the leases are fresh: nothing to do yet
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
    old = store.get(legacy.job_id)
    assert old.state == INTERRUPTED and old.error.startswith("the server stopped while this job ran"), old.error


def test_cancel_and_watch_of_another_replicas_job(database, tmp_path):
    first, second = stores(database, 2)

    async def scenario():
        a, b = await started(first, tmp_path, "a"), await started(second, tmp_path, "b")
        job = await a.submit("agent", {"steps": 600})
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
                commit_in_sequence_order(conn, [new_item("agent", "a")])
                (held,) = writer_a._insert_group(conn, [new_item("agent", "a")])
                done = threading.Event()
                inserted: list = []
                thread = threading.Thread(
                    target=lambda: (inserted.extend(writer_b.insert_many([new_item("agent", "b")])), done.set())
                )
                thread.start()
                waited = not done.wait(1.0)
                watermark_meanwhile = reader.max_sequence("agent")
                other_agent = writer_b.insert_many([new_item("other", "c")])  # other agents are not held up
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


# Two replicas of every service over one PostgreSQL. ----------------------------------------------------------

REWARD_CONFIG = rw.RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16, learning_rate=5e-4)
QUICK = pol.TrainingConfig(
    use_lora=True, learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=8, seed=0
)
SERVICE_LEASE = 3.0  # seconds: short, so a heartbeat that failed to renew would show within the test


class Fleet:
    """Two replicas of each service, every service over its own schema of one PostgreSQL and one data dir
    (the shared artifact volume); the services reach each other through both replicas' addresses. The reward
    replicas are processes of their own: they load reward models as policy jobs ask for scores, and
    transformers' from_pretrained is not safe in two threads of one process at once (see the fixture)."""

    def __init__(self, data_dir: pathlib.Path, urls: dict[str, str]) -> None:
        self.data_dir, self.urls = data_dir, urls
        self.servers: dict[str, list[ServerThread | ServiceProcess]] = {}
        self.servers["feedback"] = [self._start("feedback", i) for i in (1, 2)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # their start is mostly importing torch
            self.servers["reward"] = list(pool.map(lambda i: self.process("reward", i), (1, 2)))
        self.servers["policy"] = [self._start("policy", i) for i in (1, 2)]
        self.servers["inference"] = [self._start("inference", i) for i in (1, 2)]

    def target(self, service: str) -> str:
        """Both replicas of `service`, for gRPC's round-robin load balancing."""
        return "ipv4:" + ",".join(server.address for server in self.servers[service])

    def _server(self, service: str, replica: int) -> ServerConfig:
        return ServerConfig(
            service=service,
            port=0,
            data_dir=self.data_dir / service,
            database_url=self.urls[service],
            replica_id=f"{service}-{replica}",
            job_lease_seconds=SERVICE_LEASE,
        )

    def _start(self, service: str, replica: int) -> ServerThread:
        server = self._server(service, replica)
        if service == "feedback":
            return ServerThread(start_feedback, FeedbackServiceConfig.from_env(server=server)).__enter__()
        if service == "policy":
            config = PolicyServiceConfig(
                server=server, feedback_address=self.target("feedback"), reward_address=self.target("reward")
            )
            return ServerThread(start_policy, config).__enter__()
        config = InferenceServiceConfig.from_env(policy_addr=self.target("policy"))
        return ServerThread(start_inference, dataclasses.replace(config, server=server)).__enter__()

    def restart(self, service: str, replica: int) -> None:
        self.servers[service][replica - 1].stop()
        self.servers[service][replica - 1] = self._start(service, replica)

    def process(self, service: str, replica: int) -> ServiceProcess:
        """A replica of `service` (reward, policy) as a process of its own, over the same database and volume."""
        server = self._server(service, replica)
        env = {
            "RLHF_REPLICA_ID": server.replica_id,
            "RLHF_JOB_LEASE_SECONDS": str(server.job_lease_seconds),
            "RLHF_FEEDBACK_ADDR": self.target("feedback"),
        }
        if service == "policy":
            env["RLHF_REWARD_ADDR"] = self.target("reward")
        return ServiceProcess(f"{service}_service", server.data_dir, "--database-url", server.database_url, env=env)

    def address(self, service: str, replica: int) -> str:
        return self.servers[service][replica - 1].address

    def stop(self) -> None:
        for service in ("inference", "policy", "reward", "feedback"):
            for server in self.servers.get(service, []):
                if isinstance(server, ServiceProcess):
                    server.process.terminate()  # a graceful stop, as the threads get
                    server.process.wait(60)
                else:
                    server.stop()


@pytest.fixture
def fleet(tmp_path, tiny_model):
    # Six servers share this process: import transformers' model classes once, before their threads race to
    # (its lazy module can fail one of two threads importing the same name at once). Loading models is not safe
    # in two threads at once either (from_pretrained swaps PreTrainedModel.tie_weights for the whole process
    # while it runs): the two inference replicas here load one at a time, as the test asks them in turn.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401

    with contextlib.ExitStack() as schemas:
        urls = {service: schemas.enter_context(postgres_schema(f"fleet_{service}")) for service in SCHEMAS}
        fleet = Fleet(tmp_path, urls)
        try:
            yield fleet
        finally:
            fleet.stop()


def stream_ratings(address: str, agent_id: str, items: list[tuple[str, str, float]], ids: list[str]) -> list:
    with grpc.insecure_channel(address) as channel:
        requests = (
            fb.StreamFeedbackRequest(
                feedback=fb.SubmitFeedbackRequest(agent_id=agent_id, prompt=p, response=r, score=s, request_id=i)
            )
            for (p, r, s), i in zip(items, ids, strict=True)
        )
        return list(fb_grpc.FeedbackServiceStub(channel).StreamFeedback(requests, timeout=60))


def exported(address: str, agent_id: str, watermark: int = 0) -> tuple[list[str], int]:
    """(request ids of the agent's rows up to `watermark` (0: the newest), the export's watermark)."""
    with FeedbackClient(address) as client:
        ids, mark = [], watermark
        for chunk in client.stub.ExportFeedback(fb.ExportFeedbackRequest(agent_id=agent_id, watermark=watermark)):
            ids += [row.request_id for row in chunk.feedback]
            mark = chunk.watermark
    return ids, mark


@pytest.mark.slow
@pytest.mark.postgres
def test_two_replicas_of_every_service_over_one_postgresql(fleet):
    # Feedback: two agents' streams to both replicas at once, each item sent to both (a client's retry landing
    # on the other replica); meanwhile a reader takes a watermark on one replica and exports it from the other.
    agents = ("replica-a", "replica-b")
    items = {agent_id: rated_answers(120, seed=n) for n, agent_id in enumerate(agents)}
    snapshots: list[tuple[str, int, list[str]]] = []
    writing = threading.Event()

    def read_snapshots() -> None:
        while writing.is_set():
            for agent_id in agents:
                ids, mark = exported(fleet.address("feedback", 2), agent_id, 0)
                snapshots.append((agent_id, mark, ids))

    sends = [
        (fleet.address("feedback", replica), agent_id, part)
        for agent_id in agents
        for replica in (1, 2)
        for part in (slice(0, 60), slice(60, 120))
    ]
    writing.set()
    reader = threading.Thread(target=read_snapshots)
    reader.start()
    with concurrent.futures.ThreadPoolExecutor(len(sends)) as pool:
        acks = list(
            pool.map(
                lambda send: stream_ratings(
                    send[0], send[1], items[send[1]][send[2]], [f"{send[1]}-{i}" for i in range(120)][send[2]]
                ),
                sends,
            )
        )
    writing.clear()
    reader.join(60)
    assert all(ack.accepted for batch in acks for ack in batch)
    for agent_id in agents:
        ids, _ = exported(fleet.address("feedback", 1), agent_id)
        assert sorted(ids) == sorted(f"{agent_id}-{i}" for i in range(120))  # each once: none lost, none twice
    snapshots = [snapshot for snapshot in snapshots if snapshot[1]]  # 0: no row yet (and "the newest" to export)
    assert len({mark for _, mark, _ in snapshots}) >= 2, snapshots  # taken while the rows arrived
    for agent_id, mark, ids in snapshots:  # a watermark read during the writes still selects the same rows
        again, _ = exported(fleet.address("feedback", 1), agent_id, mark)
        assert again == ids

    # Reward models: one per agent, each created on another replica; a second create for an agent that has an
    # active job is refused whichever replica takes it.
    with RewardClient(fleet.address("reward", 1)) as one, RewardClient(fleet.address("reward", 2)) as two:
        jobs = [one.create_job(agents[0], REWARD_CONFIG), two.create_job(agents[1], REWARD_CONFIG)]
        with pytest.raises(grpc.RpcError) as busy:
            two.create_job(agents[0], REWARD_CONFIG)
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finals = [list(two.watch(job.job_id, timeout=300))[-1] for job in jobs]  # watched on the other replica
    assert [(j.state, j.reward_model_version) for j in finals] == [(rw.JOB_STATE_SUCCEEDED, "v1")] * 2, finals

    # Policies: a job on each policy replica; replica 1 restarts while both run. Its own job ends INTERRUPTED
    # (truthfully); replica 2's keeps RUNNING and finishes.
    policy_one = PolicyClient(fleet.address("policy", 1))
    policy_two = PolicyClient(fleet.address("policy", 2))
    try:
        request = dict(config=QUICK, reward_model_version="v1")

        def training(job_id: str, step: int) -> None:
            for state in policy_two.watch(job_id, timeout=300):
                if state.state == pol.JOB_STATE_RUNNING and state.progress.step >= step:
                    return
                assert state.state in (pol.JOB_STATE_QUEUED, pol.JOB_STATE_RUNNING), state.error

        # The second starts once both reward replicas have loaded the first's reward model (two steps' scores,
        # round robin): a reward replica loads one model at a time (see the fixture).
        first = policy_one.train(pol.TrainPolicyRequest(agent_id=agents[0], max_steps=500, **request)).job
        training(first.job_id, 2)
        second = policy_two.train(pol.TrainPolicyRequest(agent_id=agents[1], max_steps=12, **request)).job
        training(second.job_id, 1)
        policy_one.close()
        fleet.restart("policy", 1)
        policy_one = PolicyClient(fleet.address("policy", 1))
        interrupted = policy_one.get_job(first.job_id)
        running = policy_one.get_job(second.job_id)
        assert interrupted.state == pol.JOB_STATE_INTERRUPTED and "shut down" in interrupted.error
        assert running.state == pol.JOB_STATE_RUNNING
        finished = list(policy_one.watch(second.job_id, timeout=300))[-1]  # watched across replicas
        assert finished.state == pol.JOB_STATE_SUCCEEDED and finished.policy_version == "v1", finished.error
        # Replica 2 resumes replica 1's job from its checkpoint; replica 1 cancels it (replica 2 stops it).
        policy_two.resume_job(first.job_id)
        training(first.job_id, interrupted.progress.step + 1)
        policy_one.cancel_job(first.job_id)
        cancelled = list(policy_one.watch(first.job_id, timeout=120))[-1]
        assert cancelled.state == pol.JOB_STATE_CANCELLED and cancelled.resumed_from_step >= 1, cancelled.error

        # A third replica, a process of its own, dies (SIGKILL: no shutdown code runs) while its job runs; once
        # the job's lease expires another replica's heartbeat marks it INTERRUPTED, naming the dead replica.
        with fleet.process("policy", 3) as third, PolicyClient(third.address) as policy_three:
            doomed = policy_three.train(pol.TrainPolicyRequest(agent_id=agents[0], max_steps=500, **request)).job
            for state in policy_two.watch(doomed.job_id, timeout=300):
                if state.state == pol.JOB_STATE_RUNNING and state.progress.step >= 1:
                    break
            third.kill()
        ended = list(policy_two.watch(doomed.job_id, timeout=60))[-1]
        wait_for(lambda: not worker_pids(doomed.job_id), timeout=60)  # the orphaned worker stops by itself
        assert ended.state == pol.JOB_STATE_INTERRUPTED, ended.error
        assert "replica policy-3" in ended.error and "lease" in ended.error, ended.error
    finally:
        policy_one.close()
        policy_two.close()

    # Inference: a deployment set on one replica routes every key to the same version on both.
    with InferenceClient(fleet.address("inference", 1)) as one, InferenceClient(fleet.address("inference", 2)) as two:
        one.set_deployment(agents[1], {"v1": 0.5, "base": 0.5})
        chosen = {}
        for i in range(12):
            key = f"user-{i}"
            answers = [c.generate(agents[1], "Hi?", routing_key=key, max_new_tokens=2, seed=0) for c in (one, two)]
            assert answers[0].policy_version == answers[1].policy_version, key
            assert two.get_generation(answers[0].generation_id).routing_key == key  # logged where both see it
            chosen[key] = answers[0].policy_version
    assert set(chosen.values()) == {"v1", "base"}, chosen
