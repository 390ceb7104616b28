"""The whole loop at small size through real services over gRPC: feedback streamed in, a reward model
trained, PPO with rewards from ScoreBatch, a registered version, deployed, and Generate answering from it."""

from __future__ import annotations

import statistics

import grpc
import pytest

from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.sdk import rater
from rlhf.sdk.clients import FeedbackClient, InferenceClient, PolicyClient, RewardClient
from rlhf.training import corpus
from tests.stack import start_stack

AGENT = "e2e-agent"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    stack = start_stack(tmp_path_factory.mktemp("e2e"))
    yield stack
    stack.stop()


def answers(inference: InferenceClient, prompts: list[str], samples: int, version: str, seed: int):
    return [
        (
            p,
            inference.generate(
                AGENT,
                p,
                version=version,
                seed=seed + 100 * i + j,
                max_new_tokens=24,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
            ),
        )
        for i, p in enumerate(prompts)
        for j in range(samples)
    ]


def test_the_loop_improves_the_rater_score_on_held_out_prompts(stack):
    questions = corpus.prompts(len(corpus.QUESTIONS), seed=3)
    train_prompts, held_out = questions[:12], questions[12:]
    feedback = FeedbackClient(stack.feedback.address)
    inference = InferenceClient(stack.inference.address)
    policy = PolicyClient(stack.policy.address)
    reward = RewardClient(stack.reward.address)

    # With no version trained yet, the agent has nothing to serve unless "base" is asked for.
    with pytest.raises(grpc.RpcError) as error:
        inference.generate(AGENT, "Hello?")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    base_answers = [(p, a) for p, a in answers(inference, train_prompts, 10, "base", 0) if a.text.strip()]
    acks = feedback.stream(
        [
            fb.SubmitFeedbackRequest(
                agent_id=AGENT,
                prompt=p,
                response=a.text,
                score=rater.rate(a.text),
                generation_id=a.generation_id,
                policy_version=a.policy_version,
                request_id=f"r{i}",
            )
            for i, (p, a) in enumerate(base_answers)
        ]
    )
    assert all(ack.accepted for ack in acks) and len(acks) == len(base_answers) >= 100

    config = pol.TrainingConfig(
        use_lora=False,
        learning_rate=3e-4,
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=4,
        max_new_tokens=24,
        init_kl_coef=0.05,
        kl_horizon=0,
        top_k=0,
        top_p=1.0,
        seed=0,
    )
    reward_config = rw.RewardModelConfig(
        use_lora=False, learning_rate=5e-4, num_epochs=6, batch_size=16, validation_fraction=0.15
    )
    dry = policy.train(
        pol.TrainPolicyRequest(
            agent_id=AGENT, dry_run=True, max_steps=15, config=config, reward_model_config=reward_config
        )
    )
    assert dry.status == "dry_run" and dry.feedback_count == len(base_answers) and dry.estimated_steps == 15
    assert dry.estimated_time_minutes > 0
    assert dry.score_mean == pytest.approx(statistics.mean(rater.rate(a.text) for _, a in base_answers), abs=1e-6)
    assert dry.model_config["learning_rate"] == pytest.approx(3e-4) and dry.model_config["use_lora"] is False

    job = policy.train(
        pol.TrainPolicyRequest(agent_id=AGENT, max_steps=15, config=config, reward_model_config=reward_config)
    ).job
    updates = list(policy.watch(job.job_id, timeout=600))
    final = updates[-1]
    assert final.state == pol.JOB_STATE_SUCCEEDED, final.error
    assert final.policy_version == "v1" and final.reward_model_version == "v1" and final.reward_job_id
    phases = {u.progress.phase for u in updates}
    assert {"reward_model", "training"} <= phases
    step_metrics = [u.progress.metrics for u in updates if u.progress.phase == "training"]
    assert {
        "objective/kl",
        "objective/entropy",
        "loss/policy_avg",
        "loss/value_avg",
        "policy/clipfrac_avg",
        "policy/approxkl_avg",
        "kl_coef",
        "objective/scores",
    } <= set(step_metrics[-1])

    # The reward model was trained through the reward service and registered there.
    reward_model = reward.get_model(AGENT, "v1")
    assert reward_model.job_id == final.reward_job_id

    version = policy.get_policy(AGENT)
    assert version.version == "v1" and version.reward_model_version == "v1"
    assert version.metrics.training_steps == 15 and version.metrics.feedback_count == len(base_answers)
    assert version.feedback_watermark > 0 and version.base_model == "rlhf-tiny"
    assert [p.version for p in policy.list_policies(AGENT)] == ["v1"]

    # The saved policy loads with plain transformers, and the version folder has its results and plot.
    import json
    import pathlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(version.model_path)
    AutoTokenizer.from_pretrained(version.model_path)
    folder = pathlib.Path(version.artifact_path)
    results = json.loads((folder / "training_results.json").read_text())
    assert results["model_path"] == version.model_path and results["training_steps"] == 15
    assert len(results["reward_history"]) == len(results["kl_history"]) == len(results["loss_history"]) == 15
    assert (folder / "curves.png").stat().st_size > 10_000 and (folder / "value_head.pt").exists()

    # With no deployment set, the latest version serves; then an explicit deployment.
    served = inference.generate(AGENT, held_out[0], seed=1, max_new_tokens=8)
    assert served.policy_version == "v1"
    assert inference.get_generation(served.generation_id).policy_version == "v1"
    deployment = inference.set_deployment(AGENT, {"v1": 1.0})
    assert deployment.revision == 1 and not deployment.is_default

    base = [rater.rate(a.text) for _, a in answers(inference, held_out, 12, "base", 10_000)]
    trained = [rater.rate(a.text) for _, a in answers(inference, held_out, 12, "", 10_000)]
    assert statistics.mean(trained) > statistics.mean(base) + 0.25, (statistics.mean(base), statistics.mean(trained))


def test_feedback_citing_a_generation_is_attributed_to_its_version(stack, tmp_path):
    """A feedback server configured with the inference service fills in policy_version from the generation
    log, so per-version stats (the A/B readout) work when runtimes only pass the generation id along."""
    from feedback_service.app import start as start_feedback
    from feedback_service.config import FeedbackServiceConfig
    from tests.helpers import server_config
    from tests.servers import ServerThread

    inference = InferenceClient(stack.inference.address)
    base = inference.generate("attributed", "What did you see today?", version="base", seed=3, max_new_tokens=8)
    assert base.policy_version == "base"
    config = FeedbackServiceConfig.from_env(
        server=server_config("feedback", tmp_path), inference_address=stack.inference.address
    )
    with ServerThread(start_feedback, config) as server:
        feedback = FeedbackClient(server.address)
        cited = feedback.submit(
            "attributed",
            prompt="What did you see today?",
            response=base.text or "x",
            score=0.7,
            generation_id=base.generation_id,
        )
        assert cited.policy_version == "base"
        acks = feedback.stream(
            [
                fb.SubmitFeedbackRequest(
                    agent_id="attributed",
                    prompt="Q?",
                    response="A.",
                    score=0.2,
                    generation_id=base.generation_id,
                    request_id="s1",
                ),
                fb.SubmitFeedbackRequest(
                    agent_id="attributed",
                    prompt="Q?",
                    response="B.",
                    score=0.4,
                    generation_id="unknown-generation",
                    request_id="s2",
                ),
                fb.SubmitFeedbackRequest(
                    agent_id="someone-else",
                    prompt="Q?",
                    response="C.",
                    score=0.4,
                    generation_id=base.generation_id,
                    request_id="s3",
                ),
            ]
        )
        assert all(a.accepted for a in acks)  # attribution never rejects an item
        by_version = {
            s.policy_version: s.stats
            for s in feedback.stats("attributed", group_by_policy_version=True).by_policy_version
        }
        assert by_version["base"].rating_count == 2 and by_version[""].rating_count == 1
        assert by_version["base"].score_mean == pytest.approx(0.45)
        other = feedback.stats("someone-else", group_by_policy_version=True).by_policy_version
        assert [s.policy_version for s in other] == [""]  # another agent's generation lends no version


def test_command_line_tables_show_the_trained_versions(stack):
    """After the loop test: the CLI lists the job, the reward model and the policy as rows."""
    import subprocess
    import sys
    from pathlib import Path

    rlhf = str(Path(sys.executable).parent / "rlhf")

    def run(*args: str) -> str:
        result = subprocess.run([rlhf, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    policies = run("policies", "list", AGENT, "--policy-addr", stack.policy.address)
    assert policies.splitlines()[1].startswith("v1 ") and "/policy" in policies
    jobs = run("jobs", "list", "--agent-id", AGENT, "--policy-addr", stack.policy.address)
    assert "SUCCEEDED" in jobs and " v1" in jobs
    reward_jobs = run("jobs", "list", "--reward", "--agent-id", AGENT, "--reward-addr", stack.reward.address)
    assert "SUCCEEDED" in reward_jobs
    models = run("reward-models", "list", AGENT, "--reward-addr", stack.reward.address)
    assert models.splitlines()[1].startswith("v1 ") and "spearman" in models
    import json

    for flags in (["--policy-addr", stack.policy.address], ["--reward", "--reward-addr", stack.reward.address]):
        (job,) = json.loads(run("jobs", "list", "--agent-id", AGENT, "--json", *flags))
        watched = json.loads(run("jobs", "watch", job["job_id"], "--json", *flags))  # an ended job: one update
        assert watched["job_id"] == job["job_id"] and watched["state"] == "JOB_STATE_SUCCEEDED"
    shown = run("policies", "show", AGENT, "v1", "--policy-addr", stack.policy.address, "--json")
    assert '"version": "v1"' in shown or '"version":"v1"' in shown
