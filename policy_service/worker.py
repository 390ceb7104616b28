"""`python -m policy_service.worker --job-dir DIR`: get a reward model, get prompts, run PPO, save a version."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Any

import grpc

from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.runtime.protoconfig import from_message
from rlhf.runtime.worker import Cancelled, JobContext, main_for
from rlhf.sdk.clients import FeedbackClient, RewardClient
from rlhf.training.config import RewardModelConfig, TrainingConfig
from rlhf.training.modeling import pick_device, resolve_model
from rlhf.training.modelshape import device_kind
from rlhf.training.ppo_trainer import PPOTrainer
from rlhf.training.scoring import Scores, fill_unscorable
from rlhf.training.tinymodel import tiny_model_dir
from rlhf.training.version_folder import plot_version_curves, version_results, write_results

log = logging.getLogger(__name__)


def tiny_model_built(data_dir: pathlib.Path) -> bool:
    return (tiny_model_dir(data_dir) / "build_info.json").is_file()


def build_seconds(data_dir: pathlib.Path) -> float:
    """How long the tiny model's build took (it was built during this job)."""
    try:
        return float(json.loads((tiny_model_dir(data_dir) / "build_info.json").read_text())["seconds"])
    except (OSError, ValueError, KeyError):
        return 0.0


def reward_device_kind(preference: str) -> str:
    """The reward service's device kind, as seen from here (it may run elsewhere: then as asked)."""
    try:
        return device_kind(pick_device(preference))
    except ValueError:
        return preference


def ensure_reward_model(context: JobContext, reward: RewardClient, resumed_version: str) -> rw.RewardModel:
    """The named reward-model version (or the one a resumed run used), else a new one trained through
    the reward service (waited for)."""
    spec = context.spec
    agent_id = spec["agent_id"]
    if resumed_version or spec["reward_model_version"]:
        return reward.get_model(agent_id, resumed_version or spec["reward_model_version"])
    config = rw.RewardModelConfig()
    config.ParseFromString(bytes.fromhex(spec["reward_model_config"]))
    started = reward.create_job(agent_id, config)
    context.sticky["reward_job_id"] = started.job_id
    context.progress(phase="reward_model", message=f"training reward model (job {started.job_id})")
    job = started
    for job in reward.watch(started.job_id):
        try:
            context.check_cancelled()
        except Cancelled:
            reward.cancel_job(job.job_id)
            raise
        p = job.progress
        detail = f" step {p.step}/{p.total_steps}, loss {p.train_loss:.4f}" if p.phase == "training" else ""
        context.progress(
            phase="reward_model",
            step=0,
            total_steps=spec["config"]["max_steps"],
            message=f"reward model {p.phase or 'queued'}{detail}",
        )
    if job.state != rw.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"reward-model job {job.job_id} ended {rw.JobState.Name(job.state)}: {job.error}")
    return reward.get_model(agent_id, job.reward_model_version)


def train(context: JobContext) -> dict[str, Any]:
    spec = context.spec
    agent_id = spec["agent_id"]
    config = TrainingConfig(**spec["config"])
    job_dir = context.job_dir
    reward = RewardClient(spec["reward_address"], timeout=spec["score_timeout_seconds"])
    checkpoint_path = job_dir / "checkpoint.pt"
    checkpoint = PPOTrainer.read_checkpoint(checkpoint_path)  # a resumed job continues from here
    earlier = checkpoint["extra"] if checkpoint else {}
    if earlier.get("reward_job_id"):
        context.sticky["reward_job_id"] = earlier["reward_job_id"]
    data_dir = pathlib.Path(spec["data_dir"])
    # Each phase timed apart from the others (policy_service.estimate calibrates dry runs on them).
    tiny_before = tiny_model_built(data_dir)
    phase_started = time.monotonic()
    reward_model = ensure_reward_model(context, reward, earlier.get("reward_model_version", ""))
    context.sticky["reward_model_version"] = reward_model.version
    timing: dict[str, Any] = {"reward_model_seconds": round(time.monotonic() - phase_started, 3)}
    timing["build_seconds_reward"] = build_seconds(data_dir) if not tiny_before and tiny_model_built(data_dir) else 0.0
    trained_reward_model = not (earlier.get("reward_model_version") or spec["reward_model_version"])
    if trained_reward_model:
        reward_config = from_message(reward_model.config, RewardModelConfig)
        timing["reward_model"] = {
            "trained": True,
            "items": reward_model.feedback_count,
            "config": dataclasses.asdict(reward_config),
            "device_kind": reward_device_kind(reward_config.device),
        }

    phase_started = time.monotonic()
    context.progress(phase="loading", message="exporting prompts")
    with FeedbackClient(spec["feedback_address"]) as feedback:
        rows, watermark = feedback.export(agent_id)
    prompts = sorted({row.prompt for row in rows if row.prompt.strip()})
    if not prompts:
        raise RuntimeError(f"agent '{agent_id}' has no feedback prompts to train on")

    device = pick_device(config.device)
    tiny_before = tiny_model_built(data_dir)
    base_path = resolve_model(config.base_model, data_dir)
    timing["build_seconds"] = build_seconds(data_dir) if not tiny_before and tiny_model_built(data_dir) else 0.0
    context.progress(phase="loading", message=f"loading {base_path} on {device}")
    trainer = PPOTrainer(config, base_path, device)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        context.sticky["resumed_from_step"] = trainer.step
        log.info("resumed from %s at step %d", checkpoint_path, trainer.step)
    timing["loading_seconds"] = round(time.monotonic() - phase_started, 3)
    timing["device"] = device
    timing["device_kind"] = device_kind(device)
    extra = {"reward_model_version": reward_model.version, "reward_job_id": context.sticky.get("reward_job_id", "")}
    unscored = {"count": 0}

    def score(batch_prompts: list[str], responses: list[str]) -> Scores:
        context.check_cancelled()
        try:
            answer = reward.score(
                agent_id,
                list(zip(batch_prompts, responses, strict=False)),
                version=reward_model.version,
                retries=spec["score_retries"],
            )
        except grpc.RpcError as error:
            raise RuntimeError(
                f"reward service failed during PPO ({error.code().name}: {error.details()}); "
                f"last checkpoint kept at {checkpoint_path}"
            ) from error
        unscored["count"] += sum(1 for s in answer.scores if not s.ok)
        return Scores(
            fill_unscorable([s.score if s.ok else None for s in answer.scores]),
            fill_unscorable([s.rating if s.ok else None for s in answer.scores]),
        )

    started = time.monotonic()
    first_step = trainer.step
    last_metrics: dict[str, float] = {}
    # What the steps of this process processed: widths (tokens) of each step's longest response and prompt.
    response_widths: dict[str, int] = {}
    step_seconds = query_width_sum = 0.0

    def on_step(step: int, metrics: dict[str, float]) -> None:
        nonlocal last_metrics, step_seconds, query_width_sum
        last_metrics = metrics
        width = str(int(metrics.get("tokens/response_width", config.max_new_tokens)))
        response_widths[width] = response_widths.get(width, 0) + 1
        query_width_sum += metrics.get("tokens/query_width", 0.0)
        step_seconds += metrics.get("time/step_s", 0.0)
        if step == first_step + 1:
            timing["first_step_seconds"] = round(metrics.get("time/step_s", 0.0), 3)
        elapsed = time.monotonic() - started
        rate = (step - first_step) / elapsed if elapsed > 0 else 0.0
        context.progress(
            phase="training",
            step=step,
            total_steps=config.max_steps,
            metrics=metrics,
            steps_per_second=rate,
            eta_seconds=(config.max_steps - step) / rate if rate else 0.0,
        )
        context.check_cancelled()

    def save() -> None:
        trainer.save_checkpoint(checkpoint_path, extra)

    try:
        history = trainer.train(prompts, score, on_step, save)
    except BaseException:  # cancel, reward service down, anything: keep what was learnt
        save()
        raise

    timing["ppo_seconds"] = round(time.monotonic() - started, 3)  # the steps and the loop around them
    timing["ppo_step_seconds"] = round(step_seconds, 3)  # the steps alone (PPOTrainer's time/step_s)
    timing["ppo_steps"] = trainer.step - first_step
    timing["response_widths"] = response_widths
    timing["query_width_sum"] = query_width_sum
    phase_started = time.monotonic()
    context.progress(phase="saving", step=trainer.step, total_steps=config.max_steps, metrics=last_metrics)
    output = job_dir / "output"
    trainer.save(output)
    # The seed's reward fields are on the 0..1 feedback scale (the reward service's ratings: the reward
    # model's saved normalisation undone); the reward model's own units are reported beside them.
    results = version_results(
        output,
        history,
        reward_model_path=reward_model.model_path,
        feedback_count=len(rows),
        training_steps=trainer.step,
        last_metrics=last_metrics,
    )
    plot_version_curves(output, history, results, f"{agent_id}: PPO on {config.base_model}")
    timing["saving_seconds"] = round(time.monotonic() - phase_started, 3)
    results.update(
        {
            "unscored_responses": unscored["count"],
            "config": dataclasses.asdict(config),
            "algorithm": "ppo",
            "lineage": {
                "base_model": config.base_model,
                "reward_model_version": reward_model.version,
                "reward_model_path": reward_model.model_path,
                "feedback_watermark": watermark,
                "job_id": spec["job_id"],
            },
            "training_seconds": round(time.monotonic() - started, 2),
            "timed_steps": trainer.step - first_step,  # steps training_seconds covers (a resumed run: fewer)
            # Seconds of each phase of this process, what its steps processed, and the device they ran on.
            "timing": timing,
        }
    )
    write_results(output, results)
    return {
        "output_dir": str(output),
        **{k: v for k, v in results.items() if not k.endswith("_history")},
        "initial_reward_mean": results["reward_history"][0] if results["reward_history"] else 0.0,
        "initial_score_mean": history.reward[0] if history.reward else 0.0,
    }


if __name__ == "__main__":
    main_for("policy", train)
