"""Policy service over real gRPC: dry runs and checks, cancel, reward service outage, restart.

Every test that runs a job has its own agent (the service allows one active job per agent) and leaves no
job active (checked after each test); tests that stop or restart a server start their own."""

from __future__ import annotations

import json
import pathlib

import grpc
import pytest

from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.sdk.clients import PolicyClient, RewardClient
from tests.helpers import wait_for
from tests.servers import ServerThread, ServiceProcess
from tests.stack import policy_server, reward_server, stack_with_ratings

AGENT = "policy-agent"  # dry runs and request checks: feedback, no reward model, never a job
QUICK = pol.TrainingConfig(
    use_lora=True, learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=8, seed=0
)
REWARD_CONFIG = rw.RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16, learning_rate=5e-4)
# Tests that run jobs on the shared servers: each its own agent with its own reward model (v1).
WITH_REWARD_MODEL = ("wait", "unloadable", "cancel", "resume", "restart", "kill9", "diskfull")
# Long enough that a job cancelled (or whose server is killed) after step 1 cannot finish first: a QUICK
# step takes a fraction of a second, a cancel lands within a step.
RESUMABLE_STEPS = 60
ACTIVE = (pol.JOB_STATE_QUEUED, pol.JOB_STATE_RUNNING)


def agent(name: str) -> str:
    return f"policy-{name}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    """Feedback, reward and policy servers with feedback for every agent; no model trained yet."""
    ratings = {**dict.fromkeys((AGENT, agent("outage"), *map(agent, WITH_REWARD_MODEL)), 60), "few": 3}
    with stack_with_ratings(tmp_path_factory.mktemp("policy"), ratings, seed=2) as stack:
        yield stack


@pytest.fixture(scope="module")
def reward_models(stack):
    """A reward model v1 for each agent of WITH_REWARD_MODEL, trained side by side."""
    reward = RewardClient(stack.reward.address)
    jobs = [reward.create_job(agent(name), REWARD_CONFIG) for name in WITH_REWARD_MODEL]
    for job in jobs:
        final = list(reward.watch(job.job_id, timeout=300))[-1]
        assert final.state == rw.JOB_STATE_SUCCEEDED and final.reward_model_version == "v1", final.error


@pytest.fixture(autouse=True)
def leaves_no_active_job(stack):
    """After each test: no job of the shared policy server is still queued or running (any that is, is
    cancelled so that it cannot disturb the next test, and the test errors)."""
    yield
    with PolicyClient(stack.policy.address) as client:
        active = [job for state in ACTIVE for job in client.list_jobs(state=state, page_size=100)[0]]
        for job in active:
            try:
                client.cancel_job(job.job_id)
            except grpc.RpcError:
                pass  # ended meanwhile
            list(client.watch(job.job_id, timeout=120))
    assert not active, f"the test left active jobs: {[(job.job_id, job.agent_id) for job in active]}"


@pytest.fixture
def policy(stack):
    with PolicyClient(stack.policy.address) as client:
        yield client


def job_dir(data_dir: pathlib.Path, job_id: str) -> pathlib.Path:
    return data_dir / "artifacts" / "policies" / ".jobs" / job_id


def checkpoint_step(data_dir: pathlib.Path, job_id: str) -> int:
    """The step a job's checkpoint holds (and its curves agree)."""
    from rlhf.training.ppo_trainer import PPOTrainer

    checkpoint = PPOTrainer.read_checkpoint(job_dir(data_dir, job_id) / "checkpoint.pt")
    assert checkpoint is not None, "no checkpoint"
    assert len(checkpoint["history"]["reward"]) == checkpoint["step"]
    return checkpoint["step"]


@pytest.fixture
def own_policy_server(stack, tmp_path):
    """A policy server of its own (own job database and artifacts) on the shared feedback and reward servers."""
    server = policy_server(tmp_path, stack.feedback.address, stack.reward.address)
    yield server
    server.stop()


def test_dry_run_has_the_seed_fields_and_trains_nothing(own_policy_server):
    with PolicyClient(own_policy_server.address) as policy:

        def dry_run(**fields) -> pol.TrainPolicyResponse:
            return policy.train(pol.TrainPolicyRequest(agent_id=AGENT, dry_run=True, **fields))

        response = dry_run(max_steps=1000, learning_rate=1e-5)
        assert response.status == "dry_run" and response.feedback_count == 60 and response.estimated_steps == 1000
        assert 0 <= response.score_mean <= 1 and response.score_std > 0
        assert response.model_config["base_model"] == "rlhf-tiny" and response.model_config["use_lora"] is True
        assert response.model_config["learning_rate"] == pytest.approx(1e-5)
        assert response.model_config["init_kl_coef"] == pytest.approx(0.2)  # the seed's default
        assert not response.HasField("job")

        # The estimate: a server with no finished run prices the seed's default step (8 prompts x 128 new
        # tokens, 4 PPO epochs) on the tiny model (309k parameters) on CPU. That step is ~15k token passes,
        # ~10 GFLOP: between 0.1 s and 10 s on any CPU this runs on.
        minutes = response.estimated_time_minutes
        assert 0.1 <= minutes * 60 / 1000 <= 10, minutes
        # The same request gives the same estimate; the PPO phase scales with the steps and the work per step
        # (reward-model training, loading and saving do not depend on the step count).
        again = dry_run(max_steps=1000, learning_rate=1e-5)
        assert again.estimated_time_minutes == minutes and again.estimate_basis == response.estimate_basis
        training = response.estimated_training_minutes
        assert 0 < training < minutes
        double = dry_run(max_steps=2000, learning_rate=1e-5)
        assert double.estimated_training_minutes == pytest.approx(2 * training, rel=0.01)
        assert double.estimated_time_minutes == pytest.approx(minutes + training, rel=0.01)
        tenth = dry_run(max_steps=100, learning_rate=1e-5)
        assert tenth.estimated_training_minutes == pytest.approx(training / 10, rel=0.01)
        longer = dry_run(max_steps=1000, config=pol.TrainingConfig(max_new_tokens=255))
        assert 1.5 * training < longer.estimated_training_minutes < 3 * training
        fewer_epochs = dry_run(max_steps=1000, config=pol.TrainingConfig(ppo_epochs=1))
        # Sampling the responses does not depend on the epochs: one epoch costs less, but not a quarter.
        assert training / 4 < fewer_epochs.estimated_training_minutes < training

        assert policy.stub.ListTrainingJobs(pol.ListTrainingJobsRequest()).jobs == []


@pytest.mark.parametrize(
    "request_fields, code, text",
    [
        ({"agent_id": "few", "dry_run": True}, grpc.StatusCode.FAILED_PRECONDITION, "has 3 feedback items"),
        ({"agent_id": "nobody", "dry_run": True}, grpc.StatusCode.FAILED_PRECONDITION, "has 0 feedback items"),
        ({"agent_id": "a/b", "dry_run": True}, grpc.StatusCode.INVALID_ARGUMENT, "agent_id"),
        ({"agent_id": AGENT, "dry_run": True, "max_steps": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_steps"),
        (
            {"agent_id": AGENT, "dry_run": True, "config": pol.TrainingConfig(gamma=1.5)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.gamma",
        ),
        (
            {"agent_id": AGENT, "dry_run": True, "config": pol.TrainingConfig(batch_size=4, mini_batch_size=8)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.mini_batch_size",
        ),
        (
            {"agent_id": AGENT, "dry_run": True, "config": pol.TrainingConfig(device="tpu")},
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.device",
        ),
        ({"agent_id": AGENT, "dry_run": True, "reward_model_version": "v7"}, grpc.StatusCode.NOT_FOUND, "v7"),
        (
            {"agent_id": AGENT, "dry_run": True, "reward_model_version": "seven"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "reward_model_version",
        ),
        (  # GRPO's knobs with PPO (GRPO and RLOO themselves: tests/test_grpo_rloo_service.py)
            {"agent_id": AGENT, "dry_run": True, "grpo_config": pol.GRPOConfig(beta=0.1)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "grpo_config",
        ),
    ],
)
def test_bad_requests_get_clear_status_codes(policy, request_fields, code, text):
    with pytest.raises(grpc.RpcError) as error:
        policy.train(pol.TrainPolicyRequest(**request_fields))
    assert error.value.code() == code and text in error.value.details()


def test_unknown_job_and_policy_are_not_found(policy):
    with pytest.raises(grpc.RpcError) as error:
        policy.get_job("missing")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        policy.get_policy(AGENT, "v3")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def wait_for_training(policy: PolicyClient, job_id: str) -> pol.TrainingJob:
    """The job once it is seen RUNNING with at least one PPO step done."""
    for job in policy.watch(job_id, timeout=300):
        if job.state == pol.JOB_STATE_RUNNING and job.progress.phase == "training" and job.progress.step >= 1:
            return job
        assert job.state in ACTIVE, job.error
    raise AssertionError("job ended before training")


@pytest.mark.slow
def test_wait_returns_the_seed_result_and_lora_policy_is_merged(policy, reward_models, tiny_model):
    config = pol.TrainingConfig()
    config.CopyFrom(QUICK)
    config.base_model = str(tiny_model)  # a local model folder, as users pass their own models
    response = policy.train(
        pol.TrainPolicyRequest(
            agent_id=agent("wait"), max_steps=2, config=config, reward_model_version="latest", wait=True
        ),
        timeout=300,
    )
    assert response.status == "trained", response.job.error
    assert response.version.startswith("v") and response.policy_id and response.training_steps == 2
    assert response.model_path.endswith("/policy") and response.reward_model_path
    assert response.feedback_count == 60
    # The seed's rewardMean/rewardStd are on the 0..1 feedback scale (the reward service's ratings);
    # the reward model's own units are reported beside them (they used to be in rewardMean).
    results = json.loads((pathlib.Path(response.model_path).parent / "training_results.json").read_text())
    ratings, scores = results["reward_history"], results["score_history"]
    assert len(ratings) == len(scores) == 2 and all(0.0 <= r <= 1.0 for r in ratings)
    assert response.reward_mean == pytest.approx(sum(ratings) / 2) and 0.0 <= response.reward_std <= 1.0
    policy_metrics = policy.get_policy(agent("wait"), response.version).metrics
    assert policy_metrics.score_mean == pytest.approx(sum(scores) / 2)
    assert policy_metrics.score_mean != pytest.approx(policy_metrics.reward_mean)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(response.model_path)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_a_model_that_cannot_be_loaded_fails_the_request_with_what_to_do(policy):
    # Checked before a job starts (its config only, no weights; offline a hub id fails at once).
    config = pol.TrainingConfig()
    config.CopyFrom(QUICK)
    config.base_model = "someorg/not-on-this-machine"
    agent_id = agent("unloadable")
    with pytest.raises(grpc.RpcError) as error:
        policy.train(
            pol.TrainPolicyRequest(agent_id=agent_id, max_steps=2, config=config, reward_model_version="v1", wait=True),
            timeout=300,
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "could not load model 'someorg/not-on-this-machine'" in error.value.details()
    assert "Pass a local model folder" in error.value.details()
    assert policy.stub.ListTrainingJobs(pol.ListTrainingJobsRequest(agent_id=agent_id)).jobs == []


@pytest.mark.slow
def test_cancel_stops_the_job_and_keeps_a_checkpoint(stack, policy, reward_models):
    agent_id = agent("cancel")
    job = policy.train(
        pol.TrainPolicyRequest(agent_id=agent_id, max_steps=10_000, config=QUICK, reward_model_version="v1")
    ).job
    with pytest.raises(grpc.RpcError) as error:  # one active job per agent
        policy.train(pol.TrainPolicyRequest(agent_id=agent_id, max_steps=2, config=QUICK, reward_model_version="v1"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and job.job_id in error.value.details()
    running = wait_for_training(policy, job.job_id)
    policy.cancel_job(job.job_id)
    final = list(policy.watch(job.job_id, timeout=120))[-1]
    assert final.state == pol.JOB_STATE_CANCELLED and final.error == "cancelled by request"
    # The checkpoint holds the steps done up to the cancel, and nothing was registered.
    assert 1 <= running.progress.step <= checkpoint_step(stack.data_dir, job.job_id) == final.progress.step
    assert final.policy_version == "" and policy.list_policies(agent_id) == []
    with pytest.raises(grpc.RpcError) as error:
        policy.stub.CancelTrainingJob(pol.CancelTrainingJobRequest(job_id=job.job_id))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.slow
def test_a_cancelled_job_resumes_from_its_checkpoint_and_finishes(stack, policy, reward_models):
    agent_id = agent("resume")
    job = policy.train(
        pol.TrainPolicyRequest(agent_id=agent_id, max_steps=RESUMABLE_STEPS, config=QUICK, reward_model_version="v1")
    ).job
    with pytest.raises(grpc.RpcError) as error:  # only ended jobs resume
        policy.stub.ResumeTrainingJob(pol.ResumeTrainingJobRequest(job_id=job.job_id))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    wait_for_training(policy, job.job_id)
    policy.cancel_job(job.job_id)
    cancelled = list(policy.watch(job.job_id, timeout=120))[-1]
    assert cancelled.state == pol.JOB_STATE_CANCELLED
    stopped_at = checkpoint_step(stack.data_dir, job.job_id)
    assert 1 <= stopped_at == cancelled.progress.step < RESUMABLE_STEPS

    resumed = policy.stub.ResumeTrainingJob(pol.ResumeTrainingJobRequest(job_id=job.job_id)).job
    assert resumed.job_id == job.job_id and resumed.state in ACTIVE
    updates = list(policy.watch(job.job_id, timeout=300))
    final = updates[-1]
    assert final.state == pol.JOB_STATE_SUCCEEDED, final.error
    assert final.resumed_from_step == stopped_at  # from the checkpoint: nothing redone from 0, nothing skipped
    steps = [u.progress.step for u in updates if u.progress.phase == "training"]
    assert steps and min(steps) > final.resumed_from_step
    version = policy.get_policy(agent_id, final.policy_version)
    assert version.metrics.training_steps == RESUMABLE_STEPS
    import json

    results = json.loads((pathlib.Path(version.artifact_path) / "training_results.json").read_text())
    assert len(results["reward_history"]) == RESUMABLE_STEPS  # the curves of both runs, once each


@pytest.mark.slow
def test_reward_service_outage_fails_the_job_with_the_reason_and_a_checkpoint(stack, tmp_path):
    # Reward and policy servers of its own (own registry and jobs): this test stops its reward server.
    reward = reward_server(tmp_path, stack.feedback.address)
    flaky_policy = policy_server(tmp_path, stack.feedback.address, reward.address, score_retries=1)
    try:
        reward_client = RewardClient(reward.address)
        trained = list(reward_client.watch(reward_client.create_job(agent("outage"), REWARD_CONFIG).job_id))[-1]
        assert trained.state == rw.JOB_STATE_SUCCEEDED, trained.error
        with PolicyClient(flaky_policy.address) as client:
            job = client.train(
                pol.TrainPolicyRequest(
                    agent_id=agent("outage"), max_steps=10_000, config=QUICK, reward_model_version="v1"
                )
            ).job
            wait_for_training(client, job.job_id)
            reward.stop()
            final = list(client.watch(job.job_id, timeout=180))[-1]
        assert final.state == pol.JOB_STATE_FAILED
        assert "reward service failed during PPO (UNAVAILABLE" in final.error
        assert checkpoint_step(tmp_path, job.job_id) >= 1
    finally:
        reward.stop()
        flaky_policy.stop()


@pytest.mark.slow
def test_server_restart_reports_the_interrupted_job(stack, reward_models, tmp_path):
    # Policy servers of its own (own job database): this test stops one while its job runs.
    first = policy_server(tmp_path, stack.feedback.address, stack.reward.address)
    second: ServerThread | None = None
    try:
        with PolicyClient(first.address) as client:
            job = client.train(
                pol.TrainPolicyRequest(
                    agent_id=agent("restart"), max_steps=10_000, config=QUICK, reward_model_version="v1"
                )
            ).job
            wait_for_training(client, job.job_id)
        first.stop()
        second = policy_server(tmp_path, stack.feedback.address, stack.reward.address)
        with PolicyClient(second.address) as client:
            restarted = client.get_job(job.job_id)
        assert restarted.state == pol.JOB_STATE_INTERRUPTED
        assert "shut down" in restarted.error or "stopped" in restarted.error
        assert checkpoint_step(tmp_path, job.job_id) >= 1
    finally:
        first.stop()
        if second is not None:
            second.stop()


def worker_pids(job_id: str) -> list[int]:
    """Processes whose command line names the job (its worker)."""
    pids = []
    for proc in pathlib.Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if job_id.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def start_policy_process(data_dir: pathlib.Path, stack, preexec=None) -> ServiceProcess:
    return ServiceProcess(
        "policy_service",
        data_dir,
        "--feedback-addr",
        stack.feedback.address,
        "--reward-addr",
        stack.reward.address,
        preexec=preexec,
    )


@pytest.mark.slow
def test_kill_9_of_the_server_then_restart_and_resume_from_the_checkpoint(stack, reward_models, tmp_path):
    server = start_policy_process(tmp_path, stack)
    try:
        with PolicyClient(server.address) as client:
            job = client.train(
                pol.TrainPolicyRequest(
                    agent_id=agent("kill9"), max_steps=RESUMABLE_STEPS, config=QUICK, reward_model_version="v1"
                )
            ).job
            wait_for_training(client, job.job_id)
        assert worker_pids(job.job_id)
        server.kill()  # SIGKILL: no shutdown code runs in the server
        wait_for(lambda: not worker_pids(job.job_id), timeout=60)  # the orphaned worker stops by itself
        stopped_at = checkpoint_step(tmp_path, job.job_id)
        assert 1 <= stopped_at < RESUMABLE_STEPS
        server = start_policy_process(tmp_path, stack)
        with PolicyClient(server.address) as client:
            restarted = client.get_job(job.job_id)
        assert restarted.state == pol.JOB_STATE_INTERRUPTED and "stopped while this job ran" in restarted.error
        with PolicyClient(server.address) as client:
            client.stub.ResumeTrainingJob(pol.ResumeTrainingJobRequest(job_id=job.job_id))
            final = list(client.watch(job.job_id, timeout=300))[-1]
            assert final.state == pol.JOB_STATE_SUCCEEDED, final.error
            assert final.resumed_from_step == stopped_at
            version = client.get_policy(agent("kill9"), final.policy_version)
            assert version.metrics.training_steps == RESUMABLE_STEPS
    finally:
        server.process.terminate()
        server.process.wait(30)


def _files_of_at_most(size: int):
    """A preexec_fn: the process and its workers may not write a file past `size` bytes (as with a full disk,
    a write past it fails: EFBIG, since Python ignores SIGXFSZ)."""

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


@pytest.mark.slow
def test_a_save_that_cannot_write_fails_the_job_with_the_reason_and_keeps_earlier_versions(
    stack, reward_models, tmp_path
):
    name = agent("diskfull")
    request = pol.TrainPolicyRequest(agent_id=name, max_steps=2, config=QUICK, reward_model_version="v1")
    server = start_policy_process(tmp_path, stack)
    try:
        with PolicyClient(server.address) as client:
            first = list(client.watch(client.train(request).job.job_id, timeout=300))[-1]
            assert first.state == pol.JOB_STATE_SUCCEEDED, first.error
            before = client.get_policy(name, first.policy_version)
    finally:
        server.process.terminate()
        server.process.wait(30)
    folder = pathlib.Path(before.model_path).parent
    saved = {p.relative_to(folder.parent): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    # The tiny policy's weights are ~1.2 MB: its save cannot complete under a 600 kB limit on file size.
    server = start_policy_process(tmp_path, stack, preexec=_files_of_at_most(600_000))
    try:
        with PolicyClient(server.address) as client:
            failed = list(client.watch(client.train(request).job.job_id, timeout=300))[-1]
            assert failed.state == pol.JOB_STATE_FAILED
            assert "File too large" in failed.error, failed.error  # the reason, not a generic failure
            versions = [p.version for p in client.list_policies(name)]
            assert versions == [before.version]  # nothing half-written was registered
            assert client.get_policy(name, before.version).model_path == before.model_path
    finally:
        server.process.terminate()
        server.process.wait(30)
    # The earlier version is intact, byte for byte, and no partial version folder is left beside it.
    assert {p.relative_to(folder.parent): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == saved
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.startswith(".")) == [before.version]
