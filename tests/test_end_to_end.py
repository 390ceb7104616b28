"""The whole loop at small size through real services over gRPC: feedback streamed in, a reward model
trained, PPO (LoRA, the seed's default) with rewards from ScoreBatch, a registered version, deployed, and
Generate answering from it. Full fine-tuning learning is covered by tests/test_demo.py (the demo's setup)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics

import grpc
import pytest

from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.sdk import rater
from rlhf.sdk.clients import FeedbackClient, InferenceClient, PolicyClient, RewardClient
from rlhf.training import corpus
from rlhf.training.config import TrainingConfig
from tests.stack import start_stack

AGENT = "e2e-agent"
STEPS = 15
LEARNING_RATE = 2e-3
# The seed's LoRA defaults (r=8, alpha=32, peft's default target modules), KL controller (init_kl_coef=0.2,
# adaptive towards target_kl=6 over kl_horizon=10000), sampling (top_k=50, top_p=0.95) and ppo_epochs=4;
# only the learning rate and the step count are set for the tiny model, and the batch sizes and answer
# length for time.
LORA = pol.TrainingConfig(
    use_lora=True,
    lora_r=8,
    lora_alpha=32,
    # The seed's lora_dropout=0.1 stays active in the policy during PPO (the base model's dropout is turned
    # off, the adapters' is not), so the log-probs PPO optimises are noisy (issue 6 fixes the default).
    # Off here, so that this test measures LoRA PPO itself.
    lora_dropout=0.0,
    learning_rate=LEARNING_RATE,
    batch_size=16,
    mini_batch_size=8,
    max_new_tokens=24,
    seed=0,
)
REWARD_CONFIG = rw.RewardModelConfig(
    use_lora=False, learning_rate=5e-4, num_epochs=6, batch_size=16, validation_fraction=0.15
)
TARGET_KL = 6.0  # the seed's default, asserted on the dry run below
# "KL stays bounded": the KL (nats summed over an answer) stays under twice what the adaptive controller
# aims for. Measured on this setup (seeds 0-2): 3-6 averaged over the last 5 steps, 3-5 from the saved
# weights; with the KL penalty switched off the same run reaches 33-49 and 44-65.
KL_BOUND = 2 * TARGET_KL


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


def sampled_kl(
    policy_path: str, base_path: str, prompts: list[str], samples: int, max_new_tokens: int, top_k: int, top_p: float
) -> float:
    """KL(policy || base) per answer in nats, estimated here independently of the trainer: answers sampled
    from the saved policy with plain transformers (the run's sampling settings), log-ratios of the two
    models' full distributions summed over each answer's tokens up to and including EOS, averaged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    policy = AutoModelForCausalLM.from_pretrained(policy_path).eval()
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    per_answer: list[float] = []
    with torch.inference_mode():
        for prompt in prompts:
            query = tokenizer([prompt] * samples, return_tensors="pt")["input_ids"]
            ids = policy.generate(
                input_ids=query,
                attention_mask=torch.ones_like(query),
                do_sample=True,
                temperature=1.0,
                top_k=top_k,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )
            response = ids[:, query.shape[1] :]
            is_eos = (response == eos).long()
            mask = ((torch.cumsum(is_eos, 1) - is_eos) == 0).float()  # up to and including the first EOS
            start = query.shape[1] - 1

            def logprobs(model, ids=ids, response=response, start=start):
                logits = model(input_ids=ids).logits[:, start:-1].float()
                return torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)

            per_answer += ((logprobs(policy) - logprobs(base)) * mask).sum(1).tolist()
    return statistics.mean(per_answer)


@dataclasses.dataclass
class Loop:
    held_out: list[str]
    base_answers: list
    dry: pol.TrainPolicyResponse
    updates: list[pol.TrainingJob]
    version: pol.Policy
    results: dict


@pytest.fixture(scope="module")
def loop(stack) -> Loop:
    """The base policy's answers rated and streamed in, a dry run, then one LoRA PPO job (reward model
    trained by the job through the reward service)."""
    questions = corpus.prompts(len(corpus.QUESTIONS), seed=3)
    train_prompts, held_out = questions[:12], questions[12:]
    feedback = FeedbackClient(stack.feedback.address)
    inference = InferenceClient(stack.inference.address)
    policy = PolicyClient(stack.policy.address)

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
    acks = list(acks)  # stream() yields acknowledgements as they arrive
    assert all(ack.accepted for ack in acks) and len(acks) == len(base_answers) >= 100

    dry = policy.train(
        pol.TrainPolicyRequest(
            agent_id=AGENT, dry_run=True, max_steps=STEPS, config=LORA, reward_model_config=REWARD_CONFIG
        )
    )
    job = policy.train(
        pol.TrainPolicyRequest(agent_id=AGENT, max_steps=STEPS, config=LORA, reward_model_config=REWARD_CONFIG)
    ).job
    updates = list(policy.watch(job.job_id, timeout=600))
    assert updates[-1].state == pol.JOB_STATE_SUCCEEDED, updates[-1].error
    version = policy.get_policy(AGENT)
    results = json.loads((pathlib.Path(version.artifact_path) / "training_results.json").read_text())
    return Loop(held_out, base_answers, dry, updates, version, results)


@pytest.mark.slow  # the loop fixture trains a reward model and a policy
def test_the_dry_run_reports_the_feedback_and_the_seed_defaults_it_will_run(loop):
    dry = loop.dry
    assert dry.status == "dry_run" and dry.feedback_count == len(loop.base_answers) and dry.estimated_steps == STEPS
    assert dry.estimated_time_minutes > 0
    mean = statistics.mean(rater.rate(a.text) for _, a in loop.base_answers)
    assert dry.score_mean == pytest.approx(mean, abs=1e-6)
    config = dry.model_config
    assert config["use_lora"] is True and config["learning_rate"] == pytest.approx(LEARNING_RATE)
    assert config["lora_r"] == 8 and config["lora_alpha"] == 32 and config["init_kl_coef"] == pytest.approx(0.2)
    assert config["target_kl"] == pytest.approx(TARGET_KL) and config["kl_horizon"] == TrainingConfig().kl_horizon
    assert config["top_k"] == 50 and config["top_p"] == pytest.approx(0.95) and config["ppo_epochs"] == 4


@pytest.mark.slow  # the loop fixture trains a reward model and a policy
def test_the_job_trains_a_reward_model_then_registers_a_merged_lora_policy(stack, loop):
    final = loop.updates[-1]
    assert final.policy_version == "v1" and final.reward_model_version == "v1" and final.reward_job_id
    phases = {u.progress.phase for u in loop.updates}
    assert {"reward_model", "training"} <= phases
    step_metrics = [u.progress.metrics for u in loop.updates if u.progress.phase == "training"]
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
    reward_model = RewardClient(stack.reward.address).get_model(AGENT, "v1")
    assert reward_model.job_id == final.reward_job_id

    policy = PolicyClient(stack.policy.address)
    version = loop.version
    assert version.version == "v1" and version.reward_model_version == "v1"
    assert version.metrics.training_steps == STEPS and version.metrics.feedback_count == len(loop.base_answers)
    assert version.feedback_watermark > 0 and version.base_model == "rlhf-tiny"
    assert [p.version for p in policy.list_policies(AGENT)] == ["v1"]

    # The saved policy loads with plain transformers, LoRA merged; the version folder has results and plot.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(version.model_path)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    AutoTokenizer.from_pretrained(version.model_path)
    folder = pathlib.Path(version.artifact_path)
    results = loop.results
    assert results["model_path"] == version.model_path and results["training_steps"] == STEPS
    assert len(results["reward_history"]) == len(results["kl_history"]) == len(results["loss_history"]) == STEPS
    assert (folder / "curves.png").stat().st_size > 10_000 and (folder / "value_head.pt").exists()


@pytest.mark.slow  # the loop fixture trains a reward model and a policy
def test_kl_to_the_base_model_stays_bounded(loop, tiny_model):
    kl_history = loop.results["kl_history"]
    live = {u.progress.step: u.progress.metrics["objective/kl"] for u in loop.updates if u.progress.phase == "training"}
    assert live and all(kl == pytest.approx(kl_history[step - 1]) for step, kl in live.items())  # the same KL
    assert loop.version.metrics.kl == pytest.approx(kl_history[-1])
    # As the job measured it, averaged over its last 5 steps (one batch of 16 answers is noisy) ...
    assert statistics.mean(kl_history[-5:]) < KL_BOUND, kl_history
    # ... and as measured here from the saved weights on held-out prompts, independently of the trainer.
    config = loop.dry.model_config
    measured = sampled_kl(
        loop.version.model_path,
        str(tiny_model),
        loop.held_out,
        samples=16,
        max_new_tokens=LORA.max_new_tokens,
        top_k=int(config["top_k"]),
        top_p=config["top_p"],
    )
    assert -0.5 < measured < KL_BOUND, (measured, kl_history)


@pytest.mark.slow  # the loop fixture trains a reward model and a policy
def test_the_deployed_lora_policy_beats_the_base_on_held_out_prompts(stack, loop):
    inference = InferenceClient(stack.inference.address)
    # With no deployment set, the latest version serves; then an explicit deployment.
    served = inference.generate(AGENT, loop.held_out[0], seed=1, max_new_tokens=8)
    assert served.policy_version == "v1"
    assert inference.get_generation(served.generation_id).policy_version == "v1"
    deployment = inference.set_deployment(AGENT, {"v1": 1.0})
    assert deployment.revision == 1 and not deployment.is_default

    base = [rater.rate(a.text) for _, a in answers(inference, loop.held_out, 12, "base", 10_000)]
    served_answers = answers(inference, loop.held_out, 12, "", 10_000)
    assert {a.policy_version for _, a in served_answers} == {"v1"}
    trained = [rater.rate(a.text) for _, a in served_answers]
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


@pytest.mark.slow  # the loop fixture trains a reward model and a policy
def test_command_line_tables_show_the_trained_versions(stack, loop):
    """The CLI lists the loop's job, reward model and policy as rows."""
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
        # An ended job: its last state and what it made ({"job": ..., "policy" | "reward_model": ...}).
        watched = json.loads(run("jobs", "watch", job["job_id"], "--json", *flags))
        assert watched["job"]["job_id"] == job["job_id"] and watched["job"]["state"] == "JOB_STATE_SUCCEEDED"
        made = watched["policy"] if "--reward" not in flags else watched["reward_model"]
        assert made["version"] == "v1" and made["agent_id"] == AGENT
    shown = run("policies", "show", AGENT, "v1", "--policy-addr", stack.policy.address, "--json")
    assert '"version": "v1"' in shown or '"version":"v1"' in shown
