"""Data-parallel PPO under torchrun on the CPU (gloo), on the tiny model: two ranks keep identical weights, learn
as one process does, resume exactly; a job with num_processes=2 runs through the real policy service (cancel
reaches every rank, resume continues), and the request is validated."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import grpc
import pytest

from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.sdk.clients import PolicyClient, RewardClient
from tests.helpers import wait_for
from tests.stack import stack_with_ratings
from tests.test_policy_service import start_policy_process, worker_pids

ROOT = pathlib.Path(__file__).resolve().parent.parent
RANK_SCRIPT = ROOT / "tests" / "workers" / "data_parallel_ppo.py"
# A step samples 8 prompts (4 a rank), two optimiser steps an epoch; the length reward moves the policy fast.
CONFIG = dict(learning_rate=1e-2, batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=16)
STEPS = 12


def run_ppo(out: pathlib.Path, model: pathlib.Path, processes: int, **spec) -> list[dict]:
    """tests/workers/data_parallel_ppo.py under torchrun with `processes` ranks (1: plainly, no torchrun);
    each rank's record."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps({"model": str(model), "out": str(out), **spec}))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    done = subprocess.run(
        [*launcher, str(RANK_SCRIPT), str(out / "spec.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]


def gain(record: dict) -> float:
    """Mean score of the last four steps minus that of the first four."""
    reward = record["reward"]
    return sum(reward[-4:]) / 4 - sum(reward[:4]) / 4


@pytest.mark.slow
def test_two_ranks_keep_identical_weights_learn_as_one_process_and_resume_exactly(tiny_model, tmp_path):
    config = {**CONFIG, "max_steps": STEPS, "checkpoint_interval": 2}
    ranks = run_ppo(tmp_path / "dp", tiny_model, 2, config=config, keep_at=2)
    (single,) = run_ppo(tmp_path / "single", tiny_model, 1, config={**CONFIG, "max_steps": STEPS})

    first, second = ranks
    assert first["world_size"] == second["world_size"] == 2
    # Gradients were averaged: every update left the same weights and the same optimiser state on both ranks.
    assert first["checksum"] == second["checksum"] and first["checksum"] != first["initial_checksum"]
    assert first["exp_avg_sum"] == second["exp_avg_sum"]
    # The statistics are the whole batch's: the curves and the KL controller agree exactly.
    assert first["reward"] == second["reward"] and first["kl"] == second["kl"] and first["loss"] == second["loss"]
    assert first["kl_coef"] == second["kl_coef"]
    # Each rank got its own half of every batch and sampled its own answers.
    assert first["steps"] == second["steps"] == single["steps"] == STEPS
    assert len(first["prompts"]) == len(second["prompts"]) == STEPS * 4
    for step in range(STEPS):
        halves = first["prompts"][step * 4 : step * 4 + 4] + second["prompts"][step * 4 : step * 4 + 4]
        assert halves == single["prompts"][step * 8 : step * 8 + 8]  # together: the batch one process draws
    assert first["texts"] != second["texts"]
    # It learns as one process does. The gain of one 12-step run is noisy: over seeds 0-3 the single process
    # gained +0.18 to +0.36 and two ranks +0.15 to +0.45, their differences +0.19, +0.21, +0.09 and -0.21 (a
    # bound of 0.15 held at seed 0 only until the passes' float rounding changed).
    assert gain(single) >= 0.1 and gain(first) >= 0.1, (single["reward"], first["reward"])
    assert abs(gain(first) - gain(single)) <= 0.3, (single["reward"], first["reward"])

    # Resumed from the step-2 checkpoint (rank 0's, and rank 1's own sampling state), it ends where the
    # uninterrupted run did, bit for bit.
    kept = tmp_path / "dp" / "kept2.pt"
    assert (tmp_path / "dp" / "kept2.rank1.pt").is_file()
    resumed = run_ppo(tmp_path / "resumed", tiny_model, 2, config=config, resume_from=str(kept))
    assert [r["checksum"] for r in resumed] == [first["checksum"]] * 2
    assert resumed[0]["reward"] == first["reward"]


# --- through the policy service --------------------------------------------------------------------------

AGENT = "dp-agent"
JOB_AGENT = "dp-job"
TWO = pol.TrainingConfig(
    use_lora=True, learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=8
)
TWO.num_processes = 2
# A cancelled job must not be able to finish first (a step here takes a fraction of a second).
RESUMABLE_STEPS = 30
ACTIVE = (pol.JOB_STATE_QUEUED, pol.JOB_STATE_RUNNING)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    with stack_with_ratings(tmp_path_factory.mktemp("dp"), {AGENT: 60, JOB_AGENT: 60}, seed=2) as stack:
        yield stack


@pytest.fixture(scope="module")
def reward_model(stack):
    """JOB_AGENT's reward model v1."""
    reward = RewardClient(stack.reward.address)
    started = reward.create_job(JOB_AGENT, rw.RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16))
    assert list(reward.watch(started.job_id, timeout=300))[-1].state == rw.JOB_STATE_SUCCEEDED


@pytest.fixture
def policy(stack):
    with PolicyClient(stack.policy.address) as client:
        yield client


def config_with(**fields) -> pol.TrainingConfig:
    config = pol.TrainingConfig()
    config.CopyFrom(TWO)
    for name, value in fields.items():
        setattr(config, name, value)
    return config


@pytest.mark.parametrize(
    "algorithm, fields, field",
    [
        (pol.ALGORITHM_PPO, {"num_processes": 0}, "config.num_processes"),
        (pol.ALGORITHM_PPO, {"num_processes": 65}, "config.num_processes"),
        (pol.ALGORITHM_PPO, {"num_processes": 3}, "config.batch_size"),
        (pol.ALGORITHM_PPO, {"batch_size": 6, "mini_batch_size": 3}, "config.mini_batch_size"),
        (pol.ALGORITHM_GRPO, {}, "config.num_processes"),
        (pol.ALGORITHM_RLOO, {}, "config.num_processes"),
    ],
)
def test_num_processes_out_of_range_uneven_or_for_trl_is_invalid_argument(policy, algorithm, fields, field):
    for dry_run in (True, False):
        with pytest.raises(grpc.RpcError) as error:
            policy.train(
                pol.TrainPolicyRequest(
                    agent_id=AGENT, algorithm=algorithm, dry_run=dry_run, config=config_with(**fields)
                )
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert error.value.details().startswith(field), error.value.details()


def test_a_two_process_dry_run_is_accepted_and_shows_the_fields(policy):
    response = policy.train(
        pol.TrainPolicyRequest(agent_id=AGENT, dry_run=True, config=config_with(gradient_checkpointing=True))
    )
    assert response.model_config["num_processes"] == 2 and response.model_config["gradient_checkpointing"] is True


@pytest.mark.slow
def start_two_process_job(policy: PolicyClient) -> pol.TrainingJob:
    """JOB_AGENT's 2-process job, once it has done a step under torchrun."""
    job = policy.train(
        pol.TrainPolicyRequest(agent_id=JOB_AGENT, max_steps=RESUMABLE_STEPS, config=TWO, reward_model_version="v1")
    ).job
    for update in policy.watch(job.job_id, timeout=300):
        assert update.state in ACTIVE, update.error
        if update.progress.phase == "training" and update.progress.step >= 1:
            break
    assert len(worker_pids(job.job_id)) >= 3  # torchrun and two ranks
    return job


@pytest.mark.slow
def test_a_two_process_job_trains_through_the_service_cancels_on_every_rank_and_resumes(stack, policy, reward_model):
    job = start_two_process_job(policy)
    policy.cancel_job(job.job_id)
    cancelled = list(policy.watch(job.job_id, timeout=120))[-1]
    assert cancelled.state == pol.JOB_STATE_CANCELLED and cancelled.error == "cancelled by request"
    wait_for(lambda: not worker_pids(job.job_id), timeout=60)  # the cancel reached torchrun and every rank
    folder = stack.data_dir / "artifacts" / "policies" / ".jobs" / job.job_id
    from rlhf.training.ppo_trainer import PPOTrainer

    checkpoint = PPOTrainer.read_checkpoint(folder / "checkpoint.pt")
    stopped_at = checkpoint["step"]
    assert 1 <= stopped_at == cancelled.progress.step < RESUMABLE_STEPS
    assert len(checkpoint["history"]["reward"]) == stopped_at

    policy.stub.ResumeTrainingJob(pol.ResumeTrainingJobRequest(job_id=job.job_id))
    updates = list(policy.watch(job.job_id, timeout=300))
    final = updates[-1]
    assert final.state == pol.JOB_STATE_SUCCEEDED, final.error
    assert final.resumed_from_step == stopped_at
    steps = [u.progress.step for u in updates if u.progress.phase == "training"]
    assert steps and min(steps) > stopped_at
    version = policy.get_policy(JOB_AGENT, final.policy_version)
    assert version.metrics.training_steps == RESUMABLE_STEPS
    results = json.loads((pathlib.Path(version.artifact_path) / "training_results.json").read_text())
    assert len(results["reward_history"]) == RESUMABLE_STEPS and results["config"]["num_processes"] == 2
    assert (folder / "checkpoint.rank1.pt").is_file()  # rank 1 ran and kept its own sampling state


def test_num_processes_outside_torchrun_is_refused_with_what_to_do(tiny_model):
    from rlhf.training.config import TrainingConfig
    from rlhf.training.errors import TrainingError
    from rlhf.training.ppo_trainer import PPOTrainer

    with pytest.raises(TrainingError, match="torchrun --nproc-per-node 2"):
        PPOTrainer(TrainingConfig(num_processes=2), str(tiny_model), "cpu")
    with pytest.raises(TrainingError, match="mini_batch_size=4 does not split evenly over 8 ranks"):
        from rlhf.training.distributed import Group

        PPOTrainer(TrainingConfig(batch_size=8, mini_batch_size=4), str(tiny_model), "cpu", Group(0, 8))


@pytest.mark.slow
def test_every_rank_stops_when_the_server_is_killed(stack, reward_model, tmp_path):
    server = start_policy_process(tmp_path, stack)  # its own job database: JOB_AGENT is free there
    try:
        with PolicyClient(server.address) as client:
            job = start_two_process_job(client)
        server.kill()  # SIGKILL: torchrun is re-parented and its ranks are not, so they watch the server's pid
        wait_for(lambda: not worker_pids(job.job_id), timeout=60)
        from rlhf.training.ppo_trainer import PPOTrainer

        checkpoint = PPOTrainer.read_checkpoint(
            tmp_path / "artifacts" / "policies" / ".jobs" / job.job_id / "checkpoint.pt"
        )
        assert 1 <= checkpoint["step"] < RESUMABLE_STEPS
    finally:
        server.process.terminate()
        server.process.wait(30)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_job_over_two_machines_meets_at_the_rendezvous_and_trains(stack, reward_model, tmp_path):
    # Two "machines" on localhost: the service's (RLHF_TORCHRUN_ARGS names a c10d rendezvous) and a second one
    # started by hand on the job's folder, as a second machine would over the shared volume; one rank each.
    from tests.servers import ServiceProcess

    rendezvous = f"--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{free_port()} --rdzv-id two-machines"
    server = ServiceProcess(
        "policy_service",
        tmp_path,
        "--feedback-addr",
        stack.feedback.address,
        "--reward-addr",
        stack.reward.address,
        env={"RLHF_TORCHRUN_ARGS": f"{rendezvous} --rdzv-conf is_host=true"},
    )
    second = None
    try:
        with PolicyClient(server.address) as client:
            config = config_with(num_processes=1, checkpoint_interval=1)
            job = client.train(
                pol.TrainPolicyRequest(agent_id=JOB_AGENT, max_steps=3, config=config, reward_model_version="v1")
            ).job
            folder = tmp_path / "artifacts" / "policies" / ".jobs" / job.job_id
            wait_for(lambda: (folder / "spec.json").is_file(), timeout=60)
            with open(tmp_path / "second.log", "wb") as log:
                second = subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", *rendezvous.split(), "--rdzv-conf", "is_host=false"]
                    + ["--nproc-per-node", "1", "-m", "policy_service.worker", "--job-dir", str(folder)],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            final = list(client.watch(job.job_id, timeout=300))[-1]
            assert final.state == pol.JOB_STATE_SUCCEEDED, final.error
            assert second.wait(60) == 0, (tmp_path / "second.log").read_text()[-3000:]
        # The second machine's rank trained beside rank 0: it kept its own sampling state at the last step.
        from rlhf.training.ppo_trainer import PPOTrainer

        assert PPOTrainer.read_checkpoint(folder / "checkpoint.rank1.pt")["step"] == 3
    finally:
        if second is not None and second.poll() is None:
            second.kill()
        server.process.terminate()
        server.process.wait(30)
