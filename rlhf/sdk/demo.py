"""`make demo` / `rlhf demo`: the whole RLHF loop through the real services, on embedded defaults.

The base policy answers prompts; a simulated rater (rlhf.sdk.rater: likes answers about the sea) rates them;
the ratings stream into the feedback service; the policy service trains a reward model through the reward
service and then the policy with PPO (every reward a ScoreBatch call); the new version is deployed; and
base and trained answers to held-out prompts are rated and compared.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import socket
import statistics
import sys
import time

import grpc

from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.sdk import rater
from rlhf.sdk.clients import FeedbackClient, InferenceClient, PolicyClient, wait_until_serving
from rlhf.sdk.supervisor import MODULES, Stack, start_stack, stop_stack
from rlhf.training import corpus


@dataclasses.dataclass
class DemoConfig:
    """What the demo does; defaults finish in a few minutes on 2 CPU cores."""

    # Where the demo's databases, models, artifacts and logs go.
    data_dir: pathlib.Path
    # Delete the data dir's earlier demo data first (the tiny model cache is kept).
    fresh: bool = True
    # The agent whose policy is improved.
    agent_id: str = "demo-agent"
    # Questions the agent is trained on; the rest of rlhf.corpus.QUESTIONS are held out.
    train_prompts: int = 12
    # Base-policy answers rated per training prompt.
    answers_per_prompt: int = 16
    # Answers sampled per held-out prompt, for base and trained policies each.
    eval_samples: int = 16
    # PPO steps.
    ppo_steps: int = 40
    # Longest answer, in tokens.
    max_new_tokens: int = 32
    # Port of each service (feedback, reward, policy, inference); a service left out or 0 gets a free port.
    ports: dict[str, int] = dataclasses.field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(text: str) -> None:
    print(text, flush=True)


def _answers(
    inference: InferenceClient,
    agent_id: str,
    prompts: list[str],
    samples: int,
    version: str,
    seed: int,
    max_new_tokens: int,
) -> list[tuple[str, str, str]]:
    """(prompt, text, generation_id) for `samples` seeded answers per prompt."""
    out = []
    for i, prompt in enumerate(prompts):
        for j in range(samples):
            answer = inference.generate(
                agent_id,
                prompt,
                version=version,
                seed=seed + 1000 * i + j,
                max_new_tokens=max_new_tokens,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
            )
            out.append((prompt, answer.text, answer.generation_id))
    return out


def run_demo(config: DemoConfig) -> int:
    started = time.monotonic()
    data_dir = config.data_dir
    if config.fresh and data_dir.exists():
        for child in data_dir.iterdir():
            if child.name != "models":  # keep the built tiny model
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    data_dir.mkdir(parents=True, exist_ok=True)

    _say("== 1/6 tiny default model")
    from rlhf.training.tinymodel import ensure_tiny_model

    model_dir = ensure_tiny_model(data_dir, progress=lambda line: _say(f"   {line}"))
    _say(f"   {model_dir}")

    stack = Stack(data_dir=data_dir, ports={s: config.ports.get(s) or _free_port() for s in MODULES})
    _say(f"== 2/6 starting the stack (logs in {data_dir / 'logs'})")
    processes = start_stack(stack, list(MODULES), log_dir=data_dir / "logs")
    try:
        for service in MODULES:
            wait_until_serving(stack.address(service), timeout=120)
            _say(f"   {service:<9} serving on {stack.address(service)}")
        return _loop(config, stack, started)
    except (grpc.RpcError, RuntimeError, TimeoutError) as error:
        detail = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.RpcError) else str(error)
        _say(f"\nDEMO FAILED: {detail}\nService logs: {data_dir / 'logs'}")
        return 1
    finally:
        stop_stack(processes)


def _loop(config: DemoConfig, stack: Stack, started: float) -> int:
    agent = config.agent_id
    questions = corpus.prompts(len(corpus.QUESTIONS), seed=7)
    train_prompts, held_out = questions[: config.train_prompts], questions[config.train_prompts :]
    feedback = FeedbackClient(stack.address("feedback"))
    policy = PolicyClient(stack.address("policy"))
    inference = InferenceClient(stack.address("inference"))

    _say(
        f"== 3/6 the base policy answers {len(train_prompts)} prompts x {config.answers_per_prompt}; "
        f"the simulated rater rates them"
    )
    answers = _answers(inference, agent, train_prompts, config.answers_per_prompt, "base", 0, config.max_new_tokens)
    empty = sum(1 for _, text, _ in answers if not text.strip())
    answers = [a for a in answers if a[1].strip()]  # nothing to rate in an empty answer
    requests = [
        fb.SubmitFeedbackRequest(
            agent_id=agent,
            prompt=p,
            response=text,
            score=rater.rate(text),
            run_id="demo",
            generation_id=gid,
            policy_version="base",
            request_id=f"demo-{i}",
        )
        for i, (p, text, gid) in enumerate(answers)
    ]
    acks = list(feedback.stream(requests))
    accepted = sum(a.accepted for a in acks)
    stats = feedback.stats(agent).stats
    _say(
        f"   streamed {len(requests)} ratings ({empty} empty answers skipped): {accepted} acknowledged; "
        f"mean {stats.score_mean:.3f} (std {stats.score_std:.3f})"
    )
    if accepted != len(requests):
        reasons = sorted({f"{a.field}: {a.reason}" for a in acks if not a.accepted})
        raise RuntimeError(f"only {accepted} of {len(requests)} feedback items were accepted: {reasons}")

    training = pol.TrainingConfig(
        use_lora=False,
        learning_rate=3e-4,
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=4,
        max_new_tokens=config.max_new_tokens,
        init_kl_coef=0.05,
        kl_horizon=0,
        top_k=0,
        top_p=1.0,
        seed=0,
    )
    reward_config = rw.RewardModelConfig(
        use_lora=False, learning_rate=5e-4, num_epochs=6, batch_size=16, validation_fraction=0.15, seed=0
    )
    request = pol.TrainPolicyRequest(
        agent_id=agent, max_steps=config.ppo_steps, config=training, reward_model_config=reward_config
    )
    dry = policy.train(
        pol.TrainPolicyRequest(
            agent_id=agent, dry_run=True, max_steps=config.ppo_steps, config=training, reward_model_config=reward_config
        )
    )
    _say(
        f"== 4/6 training: reward model, then PPO ({config.ppo_steps} steps; dry-run estimate "
        f"{dry.estimated_time_minutes:.1f} min, {dry.estimated_training_minutes:.1f} of them PPO)"
    )
    job = queued = policy.train(request).job
    last_line = ""
    for job in policy.watch(queued.job_id, timeout=1800):
        p = job.progress
        m = p.metrics
        if p.phase == "training":
            line = (
                f"   PPO step {p.step:>3}/{p.total_steps}  reward-model score {m.get('objective/scores', 0):+.3f}  "
                f"kl {m.get('objective/kl', 0):.2f}  {p.steps_per_second:.2f} steps/s  eta {p.eta_seconds:.0f}s"
            )
        elif p.message:
            line = f"   {p.message}"
        else:
            continue
        if line != last_line:
            _say(line)
            last_line = line
    if job.state != pol.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"policy job {job.job_id} ended {pol.JobState.Name(job.state)}: {job.error}")
    version = policy.get_policy(agent, job.policy_version)
    _say(f"   policy {version.version} registered (reward model {version.reward_model_version})")

    _say(f"== 5/6 deploying {version.version}")
    deployment = inference.set_deployment(agent, {version.version: 1.0})
    _say(f"   deployment revision {deployment.revision}: {version.version} takes 100% of traffic")

    _say(f"== 6/6 rating base vs trained answers on {len(held_out)} held-out prompts x {config.eval_samples}")
    base = _answers(inference, agent, held_out, config.eval_samples, "base", 50_000, config.max_new_tokens)
    trained = _answers(inference, agent, held_out, config.eval_samples, "", 50_000, config.max_new_tokens)
    served = inference.get_generation(trained[0][2]).policy_version
    _say(f"\n{'held-out prompt':<40} {'base':>6} {'trained':>8}")
    for prompt in held_out:
        b = statistics.mean(rater.rate(t) for p, t, _ in base if p == prompt)
        t = statistics.mean(rater.rate(t) for p, t, _ in trained if p == prompt)
        _say(f"{prompt:<40} {b:>6.3f} {t:>8.3f}")
    base_mean = statistics.mean(rater.rate(t) for _, t, _ in base)
    trained_mean = statistics.mean(rater.rate(t) for _, t, _ in trained)
    _say(f"{'mean rater score':<40} {base_mean:>6.3f} {trained_mean:>8.3f}   (served by {served})")
    _say("\nexample answers (base -> trained):")
    for (p, b, _), (_, t, _) in list(zip(base, trained, strict=False))[:: config.eval_samples][:3]:
        _say(f"  {p}\n    base:    {b.strip()}\n    trained: {t.strip()}")
    folder = pathlib.Path(version.artifact_path)
    _say(f"\nartifacts:       {folder}")
    _say(f"policy model:    {version.model_path}")
    _say(f"training curves: {folder / 'curves.png'}")
    _say(f"results:         {folder / 'training_results.json'}")
    _say(f"done in {time.monotonic() - started:.0f}s")
    if trained_mean <= base_mean:
        _say("WARNING: the trained policy did not beat the base policy on held-out prompts this time")
    return 0


def main() -> None:
    sys.exit(run_demo(DemoConfig(data_dir=pathlib.Path(".rlhf/demo").resolve())))


if __name__ == "__main__":
    main()
