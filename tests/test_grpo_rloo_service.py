"""GRPO and RLOO over the real policy service: validation of their knobs, dry runs, jobs end to end with every
reward from a real reward service, TRL's metric names in the progress stream, cancel, resume.

Each job test has its own agent (one active job per agent) with its own reward model (v1)."""

from __future__ import annotations

import json
import pathlib

import grpc
import pytest

from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.sdk.clients import PolicyClient, RewardClient
from tests.stack import policy_server, reward_server, stack_with_ratings

AGENT = "group-agent"  # dry runs and request checks only
SHARED = pol.TrainingConfig(use_lora=True, learning_rate=1e-3, batch_size=4, max_new_tokens=8, seed=0)
KNOBS = {
    "grpo": {"grpo_config": pol.GRPOConfig(num_generations=4)},
    "rloo": {"rloo_config": pol.RLOOConfig(num_generations=4)},
}
ALGORITHM = {"grpo": pol.ALGORITHM_GRPO, "rloo": pol.ALGORITHM_RLOO}
JOB_AGENTS = [f"{name}-{algorithm}" for name in ("e2e", "resume") for algorithm in ALGORITHM]
# A cancelled job must not be able to finish first (a step here takes a fraction of a second).
RESUMABLE_STEPS = 20
ACTIVE = (pol.JOB_STATE_QUEUED, pol.JOB_STATE_RUNNING)
OUTAGE = "outage-grpo"  # its own reward and policy servers


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    ratings = dict.fromkeys((AGENT, OUTAGE, *JOB_AGENTS), 60)
    with stack_with_ratings(tmp_path_factory.mktemp("group"), ratings, seed=3) as stack:
        yield stack


@pytest.fixture(scope="module")
def reward_models(stack):
    reward = RewardClient(stack.reward.address)
    config = rw.RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16, learning_rate=5e-4)
    jobs = [reward.create_job(agent_id, config) for agent_id in JOB_AGENTS]
    for job in jobs:
        final = list(reward.watch(job.job_id, timeout=300))[-1]
        assert final.state == rw.JOB_STATE_SUCCEEDED, final.error


@pytest.fixture
def policy(stack):
    with PolicyClient(stack.policy.address) as client:
        yield client


def request(algorithm: str, agent_id: str = AGENT, **fields) -> pol.TrainPolicyRequest:
    values = {"config": SHARED, **KNOBS[algorithm], **fields}
    return pol.TrainPolicyRequest(agent_id=agent_id, algorithm=ALGORITHM[algorithm], **values)


# --- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithm, knobs, field",
    [
        ("grpo", pol.GRPOConfig(num_generations=1), "grpo_config.num_generations"),
        ("grpo", pol.GRPOConfig(num_generations=5000), "grpo_config.num_generations"),
        ("grpo", pol.GRPOConfig(beta=-0.1), "grpo_config.beta"),
        ("grpo", pol.GRPOConfig(beta=float("nan")), "grpo_config.beta"),
        ("grpo", pol.GRPOConfig(num_iterations=0), "grpo_config.num_iterations"),
        ("grpo", pol.GRPOConfig(epsilon=0.0), "grpo_config.epsilon"),
        ("grpo", pol.GRPOConfig(epsilon_high=-1.0), "grpo_config.epsilon_high"),
        ("grpo", pol.GRPOConfig(loss_type="ppo"), "grpo_config.loss_type"),
        ("grpo", pol.GRPOConfig(scale_rewards="sometimes"), "grpo_config.scale_rewards"),
        ("rloo", pol.RLOOConfig(num_generations=1), "rloo_config.num_generations"),
        ("rloo", pol.RLOOConfig(beta=-1.0), "rloo_config.beta"),
        ("rloo", pol.RLOOConfig(num_iterations=101), "rloo_config.num_iterations"),
        ("rloo", pol.RLOOConfig(epsilon=-0.2), "rloo_config.epsilon"),
        ("rloo", pol.RLOOConfig(epsilon_high=1e9), "rloo_config.epsilon_high"),
    ],
)
def test_bad_knobs_are_invalid_argument_naming_the_field(policy, algorithm, knobs, field):
    for dry_run in (True, False):
        with pytest.raises(grpc.RpcError) as error:
            policy.train(request(algorithm, dry_run=dry_run, **{f"{algorithm}_config": knobs}))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert error.value.details().startswith(field), error.value.details()


def test_other_algorithms_knobs_uneven_micro_batches_and_a_second_gpu_are_invalid_argument(policy):
    with pytest.raises(grpc.RpcError) as error:
        policy.train(pol.TrainPolicyRequest(agent_id=AGENT, dry_run=True, rloo_config=pol.RLOOConfig(beta=0.1)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("rloo_config") and "ALGORITHM_RLOO only" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        # 3 prompts x 3 answers do not split into 2 micro-batches.
        uneven = pol.TrainingConfig(batch_size=3, gradient_accumulation_steps=2)
        policy.train(request("grpo", dry_run=True, config=uneven, grpo_config=pol.GRPOConfig(num_generations=3)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("config.gradient_accumulation_steps"), error.value.details()
    with pytest.raises(grpc.RpcError) as error:  # TRL (accelerate) takes the first visible GPU
        policy.train(request("rloo", dry_run=True, config=pol.TrainingConfig(device="cuda:1")))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("config.device") and "CUDA_VISIBLE_DEVICES" in error.value.details()


def test_dry_runs_show_trl_defaults_and_price_each_algorithm(policy):
    def dry_run(algorithm: int, **fields) -> pol.TrainPolicyResponse:
        return policy.train(pol.TrainPolicyRequest(agent_id=AGENT, dry_run=True, algorithm=algorithm, **fields))

    grpo, rloo, ppo = (dry_run(a, max_steps=100) for a in (pol.ALGORITHM_GRPO, pol.ALGORITHM_RLOO, pol.ALGORITHM_PPO))
    # TRL 1.16's defaults, and the seed's shared fields.
    assert grpo.model_config["num_generations"] == 8 and grpo.model_config["beta"] == 0.0
    assert grpo.model_config["loss_type"] == "dapo" and grpo.model_config["scale_rewards"] == "group"
    assert grpo.model_config["epsilon"] == pytest.approx(0.2) and grpo.model_config["num_iterations"] == 1
    assert rloo.model_config["num_generations"] == 2 and rloo.model_config["beta"] == pytest.approx(0.05)
    assert rloo.model_config["normalize_advantages"] is False
    for response in (grpo, rloo):
        assert response.model_config["batch_size"] == 8 and response.model_config["max_new_tokens"] == 128
        assert "ppo_epochs" not in response.model_config and "init_kl_coef" not in response.model_config
    assert "GRPO run" in grpo.estimate_basis and "RLOO run" in rloo.estimate_basis
    # A GRPO step samples 8 answers per prompt (RLOO 2, PPO 1 but 4 epochs): each has its own price.
    assert grpo.estimated_training_minutes > rloo.estimated_training_minutes > 0
    assert ppo.estimated_training_minutes != grpo.estimated_training_minutes
    assert grpo.estimated_peak_memory_bytes > rloo.estimated_peak_memory_bytes
    # The SDK names the algorithm and takes its knobs as a dict.
    more = policy.train_policy(AGENT, "grpo", algorithm_config={"num_generations": 16}, dry_run=True, max_steps=100)
    assert 1.5 * grpo.estimated_training_minutes < more.estimated_training_minutes
    assert more.model_config["num_generations"] == 16


# --- jobs -------------------------------------------------------------------------------------------------


def metric_names(updates: list[pol.TrainingJob]) -> set[str]:
    """Step metric names in the watched updates. "saving" carries the last step's metrics too: a watch yields
    the latest state after each change, so on a loaded machine a short job's training updates can all be
    folded into the next one (CI once saw none, for a job that succeeded)."""
    phases = ("training", "saving")
    return {name for job in updates if job.progress.phase in phases for name in job.progress.metrics}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_a_job_trains_with_service_rewards_and_registers_a_loadable_version(stack, policy, reward_models, algorithm):
    agent_id = f"e2e-{algorithm}"
    job = policy.train(request(algorithm, agent_id, max_steps=4, reward_model_version="v1")).job
    assert job.algorithm == ALGORITHM[algorithm]
    assert getattr(job, f"{algorithm}_config").num_generations == 4
    updates = list(policy.watch(job.job_id, timeout=300))
    final = updates[-1]
    assert final.state == pol.JOB_STATE_SUCCEEDED, final.error
    # TRL's own metric names, every step.
    names = metric_names(updates)
    assert {"reward", "reward_std", "loss", "entropy", "completions/mean_length", "rewards/reward_model/mean"} <= names
    assert "ratings/mean" in names  # the reward service's 0..1 ratings beside the scores
    if algorithm == "rloo":
        assert "kl" in names  # beta 0.05 by default (GRPO's 0.0 computes no KL)
    assert all(1 <= u.progress.step <= 4 for u in updates if u.progress.phase == "training")

    version = policy.get_policy(agent_id, final.policy_version)
    assert version.algorithm == ALGORITHM[algorithm] and version.metrics.training_steps == 4
    assert getattr(version, f"{algorithm}_config").num_generations == 4
    assert version.reward_model_version == "v1" and version.base_model == "rlhf-tiny"
    folder = pathlib.Path(version.artifact_path)
    results = json.loads((folder / "training_results.json").read_text())
    seed_fields = ("model_path", "reward_model_path", "feedback_count", "final_reward_mean", "final_reward_std")
    assert all(key in results for key in seed_fields + ("training_steps", "reward_history", "kl_history"))
    assert results["algorithm"] == algorithm and results["algorithm_config"]["num_generations"] == 4
    assert len(results["reward_history"]) == 4 and all(0.0 <= r <= 1.0 for r in results["reward_history"])
    assert 0.0 <= version.metrics.reward_mean <= 1.0 and version.metrics.score_mean != version.metrics.reward_mean
    assert results["lineage"]["job_id"] == job.job_id and results["timing"]["ppo_steps"] == 4
    assert (folder / "curves.png").is_file()

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(version.model_path)
    assert not any("lora" in name for name, _ in model.named_parameters())

    # The next dry run of this algorithm is calibrated on the finished run.
    again = policy.train(request(algorithm, agent_id, dry_run=True, max_steps=4))
    assert f"{algorithm.upper()} steps of job {job.job_id}" in again.estimate_basis, again.estimate_basis


def wait_for_training(policy: PolicyClient, job_id: str) -> pol.TrainingJob:
    for job in policy.watch(job_id, timeout=300):
        if job.state == pol.JOB_STATE_RUNNING and job.progress.phase == "training" and job.progress.step >= 2:
            return job
        assert job.state in ACTIVE, job.error
    raise AssertionError("job ended before training")


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_a_cancelled_job_keeps_a_checkpoint_and_resumes_to_the_end(stack, policy, reward_models, algorithm):
    agent_id = f"resume-{algorithm}"
    job = policy.train(request(algorithm, agent_id, max_steps=RESUMABLE_STEPS, reward_model_version="v1")).job
    wait_for_training(policy, job.job_id)
    policy.cancel_job(job.job_id)
    cancelled = list(policy.watch(job.job_id, timeout=120))[-1]
    assert cancelled.state == pol.JOB_STATE_CANCELLED
    stopped_at = cancelled.progress.step
    assert 2 <= stopped_at < RESUMABLE_STEPS
    # TRL's checkpoint of the last finished step: weights (the adapter), optimizer, scheduler, RNG, state.
    trl_dir = stack.data_dir / "artifacts" / "policies" / ".jobs" / job.job_id / "trl"
    checkpoint = trl_dir / f"checkpoint-{stopped_at}"
    assert {"trainer_state.json", "optimizer.pt", "scheduler.pt"} <= {p.name for p in checkpoint.iterdir()}

    policy.resume_job(job.job_id)
    updates = list(policy.watch(job.job_id, timeout=300))
    final = updates[-1]
    assert final.state == pol.JOB_STATE_SUCCEEDED, final.error
    assert final.resumed_from_step == stopped_at
    steps = [u.progress.step for u in updates if u.progress.phase == "training"]
    assert steps and min(steps) > stopped_at  # from the checkpoint: nothing redone, nothing skipped
    version = policy.get_policy(agent_id, final.policy_version)
    assert version.metrics.training_steps == RESUMABLE_STEPS
    results = json.loads((pathlib.Path(version.artifact_path) / "training_results.json").read_text())
    assert len(results["reward_history"]) == RESUMABLE_STEPS  # both runs' curves, once each
    assert results["timing"]["ppo_steps"] == RESUMABLE_STEPS - stopped_at


@pytest.mark.slow
def test_reward_service_outage_fails_the_job_cleanly_with_a_checkpoint(stack, tmp_path):
    # Reward and policy servers of its own: this test stops its reward server mid-run.
    reward = reward_server(tmp_path, stack.feedback.address)
    flaky_policy = policy_server(tmp_path, stack.feedback.address, reward.address, score_retries=1)
    try:
        reward_client = RewardClient(reward.address)
        config = rw.RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16, learning_rate=5e-4)
        trained = list(reward_client.watch(reward_client.create_job(OUTAGE, config).job_id))[-1]
        assert trained.state == rw.JOB_STATE_SUCCEEDED, trained.error
        with PolicyClient(flaky_policy.address) as client:
            job = client.train(request("grpo", OUTAGE, max_steps=10_000, reward_model_version="v1")).job
            running = wait_for_training(client, job.job_id)
            reward.stop()
            final = list(client.watch(job.job_id, timeout=180))[-1]
        assert final.state == pol.JOB_STATE_FAILED
        assert "reward service failed during GRPO (UNAVAILABLE" in final.error, final.error
        trl_dir = tmp_path / "artifacts" / "policies" / ".jobs" / job.job_id / "trl"
        assert int(sorted(trl_dir.glob("checkpoint-*"))[-1].name.split("-")[1]) >= running.progress.step
    finally:
        reward.stop()
        flaky_policy.stop()
