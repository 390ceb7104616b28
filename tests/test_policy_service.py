"""Policy service over real gRPC: dry runs and checks, cancel, reward service outage, restart."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import grpc
import pytest

from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.sdk.clients import PolicyClient, RewardClient
from tests.helpers import rated_answers, submit_ratings, wait_for
from tests.stack import policy_server, reward_server, start_stack

AGENT = "policy-agent"
QUICK = pol.TrainingConfig(
    use_lora=True, learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=8, seed=0
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    stack = start_stack(tmp_path_factory.mktemp("policy"), with_inference=False)
    with stack.feedback.channel() as channel:
        submit_ratings(channel, AGENT, rated_answers(60, seed=2))
        submit_ratings(channel, "few", rated_answers(3, seed=2))
    reward = RewardClient(stack.reward.address)
    job = reward.create_job(
        AGENT, rw.RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16, learning_rate=5e-4)
    )
    assert list(reward.watch(job.job_id, timeout=300))[-1].state == rw.JOB_STATE_SUCCEEDED
    yield stack
    stack.stop()


@pytest.fixture
def policy(stack):
    with PolicyClient(stack.policy.address) as client:
        yield client


def job_dir(stack, job_id: str) -> pathlib.Path:
    return stack.data_dir / "artifacts" / "policies" / ".jobs" / job_id


def test_dry_run_has_the_seed_fields_and_trains_nothing(policy):
    response = policy.train(pol.TrainPolicyRequest(agent_id=AGENT, dry_run=True, max_steps=1000, learning_rate=1e-5))
    assert response.status == "dry_run" and response.feedback_count == 60 and response.estimated_steps == 1000
    assert response.estimated_time_minutes > 0
    assert 0 <= response.score_mean <= 1 and response.score_std > 0
    assert response.model_config["base_model"] == "rlhf-tiny" and response.model_config["use_lora"] is True
    assert response.model_config["learning_rate"] == pytest.approx(1e-5)
    assert response.model_config["init_kl_coef"] == pytest.approx(0.2)  # the seed's default
    assert not response.HasField("job")
    assert policy.stub.ListTrainingJobs(pol.ListTrainingJobsRequest(agent_id=AGENT)).jobs == []


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
        ({"agent_id": AGENT, "algorithm": pol.ALGORITHM_GRPO}, grpc.StatusCode.UNIMPLEMENTED, "GRPO"),
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
    for job in policy.watch(job_id, timeout=300):
        if job.progress.phase == "training" and job.progress.step >= 1:
            return job
        assert job.state in (pol.JOB_STATE_QUEUED, pol.JOB_STATE_RUNNING), job.error
    raise AssertionError("job ended before training")


def test_wait_returns_the_seed_result_and_lora_policy_is_merged(policy, tiny_model):
    config = pol.TrainingConfig()
    config.CopyFrom(QUICK)
    config.base_model = str(tiny_model)  # a local model folder, as users pass their own models
    response = policy.train(
        pol.TrainPolicyRequest(agent_id=AGENT, max_steps=2, config=config, reward_model_version="latest", wait=True),
        timeout=300,
    )
    assert response.status == "trained", response.job.error
    assert response.version.startswith("v") and response.policy_id and response.training_steps == 2
    assert response.model_path.endswith("/policy") and response.reward_model_path
    assert response.feedback_count == 60
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(response.model_path)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_a_model_that_cannot_be_loaded_fails_the_request_with_what_to_do(policy):
    # Checked before a job starts (its config only, no weights; offline a hub id fails at once).
    config = pol.TrainingConfig()
    config.CopyFrom(QUICK)
    config.base_model = "someorg/not-on-this-machine"
    with pytest.raises(grpc.RpcError) as error:
        policy.train(
            pol.TrainPolicyRequest(agent_id=AGENT, max_steps=2, config=config, reward_model_version="v1", wait=True),
            timeout=300,
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "could not load model 'someorg/not-on-this-machine'" in error.value.details()
    assert "Pass a local model folder" in error.value.details()
    assert (
        policy.stub.ListTrainingJobs(pol.ListTrainingJobsRequest(agent_id=AGENT, state=pol.JOB_STATE_FAILED)).jobs == []
    )


def test_cancel_stops_the_job_and_keeps_a_checkpoint(stack, policy):
    config = pol.TrainingConfig()
    config.CopyFrom(QUICK)
    job = policy.train(
        pol.TrainPolicyRequest(agent_id=AGENT, max_steps=10_000, config=config, reward_model_version="v1")
    ).job
    with pytest.raises(grpc.RpcError) as error:  # one active job per agent
        policy.train(pol.TrainPolicyRequest(agent_id=AGENT, max_steps=2, config=QUICK, reward_model_version="v1"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and job.job_id in error.value.details()
    wait_for_training(policy, job.job_id)
    policy.cancel_job(job.job_id)
    final = list(policy.watch(job.job_id, timeout=120))[-1]
    assert final.state == pol.JOB_STATE_CANCELLED
    assert final.progress.step < 10_000
    assert (job_dir(stack, job.job_id) / "checkpoint.pt").exists()
    with pytest.raises(grpc.RpcError) as error:
        policy.stub.CancelTrainingJob(pol.CancelTrainingJobRequest(job_id=job.job_id))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_cancelled_job_resumes_from_its_checkpoint_and_finishes(stack, policy):
    config = pol.TrainingConfig()
    config.CopyFrom(QUICK)
    job = policy.train(
        pol.TrainPolicyRequest(agent_id=AGENT, max_steps=30, config=config, reward_model_version="v1")
    ).job
    with pytest.raises(grpc.RpcError) as error:  # only ended jobs resume
        policy.stub.ResumeTrainingJob(pol.ResumeTrainingJobRequest(job_id=job.job_id))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    wait_for_training(policy, job.job_id)
    policy.cancel_job(job.job_id)
    cancelled = list(policy.watch(job.job_id, timeout=120))[-1]
    assert cancelled.state == pol.JOB_STATE_CANCELLED and cancelled.progress.step < 30
    stopped_at = cancelled.progress.step

    resumed = policy.stub.ResumeTrainingJob(pol.ResumeTrainingJobRequest(job_id=job.job_id)).job
    assert resumed.job_id == job.job_id and resumed.state in (pol.JOB_STATE_QUEUED, pol.JOB_STATE_RUNNING)
    updates = list(policy.watch(job.job_id, timeout=300))
    final = updates[-1]
    assert final.state == pol.JOB_STATE_SUCCEEDED, final.error
    assert final.resumed_from_step >= stopped_at  # at least where it stopped: nothing was redone from 0
    steps = [u.progress.step for u in updates if u.progress.phase == "training"]
    assert steps and min(steps) > final.resumed_from_step
    version = policy.get_policy(AGENT, final.policy_version)
    assert version.metrics.training_steps == 30
    import json

    results = json.loads((pathlib.Path(version.artifact_path) / "training_results.json").read_text())
    assert len(results["reward_history"]) == 30  # the curves of both runs, once each


def test_reward_service_outage_fails_the_job_with_the_reason_and_a_checkpoint(stack, policy):
    # A second reward server on the same registry, which the policy server below depends on.
    reward = reward_server(stack.data_dir, stack.feedback.address)
    flaky_policy = policy_server(stack.data_dir, stack.feedback.address, reward.address, score_retries=1)
    try:
        with PolicyClient(flaky_policy.address) as client:
            job = client.train(
                pol.TrainPolicyRequest(agent_id=AGENT, max_steps=10_000, config=QUICK, reward_model_version="v1")
            ).job
            wait_for_training(client, job.job_id)
            reward.stop()
            final = list(client.watch(job.job_id, timeout=180))[-1]
        assert final.state == pol.JOB_STATE_FAILED
        assert "reward service failed during PPO (UNAVAILABLE" in final.error
        assert (job_dir(stack, job.job_id) / "checkpoint.pt").exists()
    finally:
        reward.stop()
        flaky_policy.stop()


def test_server_restart_reports_the_interrupted_job(stack):
    first = policy_server(stack.data_dir, stack.feedback.address, stack.reward.address)
    with PolicyClient(first.address) as client:
        job = client.train(
            pol.TrainPolicyRequest(agent_id=AGENT, max_steps=10_000, config=QUICK, reward_model_version="v1")
        ).job
        wait_for_training(client, job.job_id)
    first.stop()
    second = policy_server(stack.data_dir, stack.feedback.address, stack.reward.address)
    try:
        with PolicyClient(second.address) as client:
            restarted = client.get_job(job.job_id)
        assert restarted.state == pol.JOB_STATE_INTERRUPTED
        assert "shut down" in restarted.error or "stopped" in restarted.error
    finally:
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


def start_policy_process(data_dir: pathlib.Path, stack) -> tuple[subprocess.Popen, str]:
    import socket

    from rlhf.sdk.clients import wait_until_serving

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "policy_service",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--feedback-addr",
            stack.feedback.address,
            "--reward-addr",
            stack.reward.address,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until_serving(f"127.0.0.1:{port}", timeout=60)
    return process, f"127.0.0.1:{port}"


def test_kill_9_of_the_server_then_restart_and_resume_from_the_checkpoint(stack, tmp_path):
    server, address = start_policy_process(tmp_path, stack)
    try:
        with PolicyClient(address) as client:
            job = client.train(
                pol.TrainPolicyRequest(agent_id=AGENT, max_steps=40, config=QUICK, reward_model_version="v1")
            ).job
            wait_for_training(client, job.job_id)
        assert worker_pids(job.job_id)
        server.kill()  # SIGKILL: no shutdown code runs in the server
        server.wait()
        wait_for(lambda: not worker_pids(job.job_id), timeout=60)  # the orphaned worker stops by itself
        assert (tmp_path / "artifacts" / "policies" / ".jobs" / job.job_id / "checkpoint.pt").exists()
        server, address = start_policy_process(tmp_path, stack)
        with PolicyClient(address) as client:
            restarted = client.get_job(job.job_id)
        assert restarted.state == pol.JOB_STATE_INTERRUPTED and "stopped while this job ran" in restarted.error
        with PolicyClient(address) as client:
            client.stub.ResumeTrainingJob(pol.ResumeTrainingJobRequest(job_id=job.job_id))
            final = list(client.watch(job.job_id, timeout=300))[-1]
            assert final.state == pol.JOB_STATE_SUCCEEDED, final.error
            assert final.resumed_from_step >= 1
            assert client.get_policy(AGENT, final.policy_version).metrics.training_steps == 40
    finally:
        server.terminate()
        server.wait(30)
