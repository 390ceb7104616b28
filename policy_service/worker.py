"""`python -m policy_service.worker --job-dir DIR`: get a reward model, get prompts, run PPO, GRPO or RLOO, save
a version."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any

import grpc

from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.runtime.protoconfig import from_message
from rlhf.runtime.worker import SERVER_PID_ENV, Cancelled, JobContext, ReportedElsewhere, main_for
from rlhf.sdk.clients import FeedbackClient, RewardClient
from rlhf.training import distributed
from rlhf.training.config import RewardModelConfig, TrainingConfig
from rlhf.training.distributed import Group
from rlhf.training.modeling import pick_device, resolve_model
from rlhf.training.modelshape import device_kind
from rlhf.training.ppo_trainer import PPOTrainer
from rlhf.training.scoring import Scores, fill_unscorable
from rlhf.training.tinymodel import tiny_model_dir
from rlhf.training.trl_trainers import ALGORITHMS as GROUP_ALGORITHMS
from rlhf.training.trl_trainers import GroupPolicyTrainer, config_class, last_checkpoint
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


@dataclasses.dataclass
class Prepared:
    """What every algorithm's run starts from: the reward model, the prompts, the base model's place."""

    reward: RewardClient
    reward_model: rw.RewardModel
    rows: list[Any]
    watermark: int
    prompts: list[str]
    base_path: str
    device: str
    # Seconds of each phase so far (policy_service.estimate calibrates dry runs on them).
    timing: dict[str, Any]
    # When the loading phase started (it ends once the trainer is built).
    loading_started: float


def prepare(context: JobContext, base_model: str, device_preference: str, earlier: dict[str, Any]) -> Prepared:
    """The reward model (the one `earlier` used, a named one, or a new one), the agent's prompts, the base
    model resolved (the tiny model built if needed); each phase timed apart from the others."""
    spec = context.spec
    agent_id = spec["agent_id"]
    reward = RewardClient(spec["reward_address"], timeout=spec["score_timeout_seconds"])
    reward.sleep = context.sleep  # a cancel ends the waits between ScoreBatch retries at once
    if earlier.get("reward_job_id"):
        context.sticky["reward_job_id"] = earlier["reward_job_id"]
    data_dir = pathlib.Path(spec["data_dir"])
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

    loading_started = time.monotonic()
    context.progress(phase="loading", message="exporting prompts")
    with FeedbackClient(spec["feedback_address"]) as feedback:
        rows, watermark = feedback.export(agent_id)
    prompts = sorted({row.prompt for row in rows if row.prompt.strip()})
    if not prompts:
        raise RuntimeError(f"agent '{agent_id}' has no feedback prompts to train on")

    device = pick_device(device_preference)
    tiny_before = tiny_model_built(data_dir)
    base_path = resolve_model(base_model, data_dir)
    timing["build_seconds"] = build_seconds(data_dir) if not tiny_before and tiny_model_built(data_dir) else 0.0
    timing["device"] = device
    timing["device_kind"] = device_kind(device)
    context.progress(phase="loading", message=f"loading {base_path} on {device}")
    return Prepared(reward, reward_model, rows, watermark, prompts, base_path, device, timing, loading_started)


def prepare_ranks(context: JobContext, group: Group, config: TrainingConfig, earlier: dict[str, Any]) -> Prepared:
    """`prepare` on rank 0 alone (one reward model trained, one export, the tiny model built once); the other
    ranks receive what it found and call the reward service with their own client. Each rank gets its device."""
    run = prepare(context, config.base_model, config.device, earlier) if group.is_main else None
    found = None
    if run is not None:
        found = {
            "reward_model": run.reward_model.SerializeToString(),
            "watermark": run.watermark,
            "prompts": run.prompts,
            "base_path": run.base_path,
        }
    found = group.broadcast(found)
    if run is None:
        spec = context.spec
        reward = RewardClient(spec["reward_address"], timeout=spec["score_timeout_seconds"])
        reward.sleep = context.sleep
        reward_model = rw.RewardModel.FromString(found["reward_model"])
        device = pick_device(config.device)
        prompts, base_path = found["prompts"], found["base_path"]
        run = Prepared(reward, reward_model, [], found["watermark"], prompts, base_path, device, {}, time.monotonic())
    run.device = group.rank_device(run.device)
    return run


def score_function(context: JobContext, run: Prepared, unscored: dict[str, int], kept: str):
    """The rewards of a run: one ScoreBatch call to the reward service per batch (retried while it is
    unavailable; past that the job fails, saying `kept`); a cancel stops it before the call."""
    spec = context.spec
    algorithm = spec["algorithm"].upper()

    def score(batch_prompts: list[str], responses: list[str]) -> Scores:
        context.check_cancelled()
        try:
            answer = run.reward.score(
                spec["agent_id"],
                list(zip(batch_prompts, responses, strict=False)),
                version=run.reward_model.version,
                retries=spec["score_retries"],
                functions=spec["config"].get("reward_functions"),  # combined by the reward service
            )
        except grpc.RpcError as error:
            raise RuntimeError(
                f"reward service failed during {algorithm} ({error.code().name}: {error.details()}); {kept}"
            ) from error
        unscored["count"] += sum(1 for s in answer.scores if not s.ok)
        return Scores(
            fill_unscorable([s.score if s.ok else None for s in answer.scores]),
            fill_unscorable([s.rating if s.ok else None for s in answer.scores]),
        )

    return score


class StepReporter:
    """on_step for a trainer: progress events with the step's metrics, the widths the steps ran at (for the
    dry run's cost model), and a cancel check after each step."""

    def __init__(
        self,
        context: JobContext,
        max_steps: int,
        first_step: int,
        timing: dict[str, Any],
        names,
        group: Group | None = None,
    ) -> None:
        self.context = context
        # Data-parallel ranks stop together: a cancel seen by any of them stops every one after the same step.
        self.group = group or Group()
        self.max_steps = max_steps
        self.first_step = first_step
        self.timing = timing
        # The metric names of (step seconds, the step's longest response, its longest prompt).
        self.names = names
        self.started = time.monotonic()
        self.last_metrics: dict[str, float] = {}
        # What the steps of this process processed: widths (tokens) of each step's longest response and prompt.
        self.response_widths: dict[str, int] = {}
        self.step_seconds = 0.0
        self.query_width_sum = 0.0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        seconds, response_name, query_name = self.names
        self.last_metrics = metrics
        width = str(int(metrics.get(response_name, 0.0)))
        self.response_widths[width] = self.response_widths.get(width, 0) + 1
        self.query_width_sum += metrics.get(query_name, 0.0)
        self.step_seconds += metrics.get(seconds, 0.0)
        if step == self.first_step + 1:
            self.timing["first_step_seconds"] = round(metrics.get(seconds, 0.0), 3)
        elapsed = time.monotonic() - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else 0.0
        self.context.progress(
            phase="training",
            step=step,
            total_steps=self.max_steps,
            metrics=metrics,
            steps_per_second=rate,
            eta_seconds=(self.max_steps - step) / rate if rate else 0.0,
        )
        try:
            self.context.check_cancelled()
            stop = False
        except Cancelled:
            stop = True
        if self.group.any(stop):
            raise Cancelled()

    def record(self, steps: int) -> None:
        """The training phase's timings into `timing` (keys named ppo_* for every algorithm: the estimate reads
        them)."""
        self.timing["ppo_seconds"] = round(time.monotonic() - self.started, 3)  # the steps and the loop around
        self.timing["ppo_step_seconds"] = round(self.step_seconds, 3)  # the steps alone
        self.timing["ppo_steps"] = steps
        self.timing["response_widths"] = self.response_widths
        self.timing["query_width_sum"] = self.query_width_sum


def finish(
    context: JobContext,
    run: Prepared,
    trainer: Any,
    history: Any,
    reporter: StepReporter,
    first_step: int,
    max_steps: int,
    base_model: str,
    extra_results: dict[str, Any],
) -> dict[str, Any]:
    """The trained policy saved, curves, training_results.json (the seed's TrainingResult fields, lineage,
    timings) and the job's result. `trainer`: PPO's or TRL's, with step and save(folder)."""
    spec = context.spec
    steps = trainer.step
    reporter.record(steps - first_step)
    saving_started = time.monotonic()
    context.progress(phase="saving", step=steps, total_steps=max_steps, metrics=reporter.last_metrics)
    output = context.job_dir / "output"
    trainer.save(output)
    # The seed's reward fields are on the 0..1 feedback scale (the reward service's ratings: the reward
    # model's saved normalisation undone); the reward model's own units are reported beside them.
    results = version_results(
        output,
        history,
        reward_model_path=run.reward_model.model_path,
        feedback_count=len(run.rows),
        training_steps=steps,
        last_metrics=reporter.last_metrics,
    )
    results.update(extra_results)
    title = f"{spec['agent_id']}: {spec['algorithm'].upper()} on {base_model}"
    # PPO's adaptive KL controller holds target_kl: a line on the KL panel (GRPO and RLOO have none).
    target_kl = spec["config"].get("target_kl") if spec["algorithm"] == "ppo" else None
    plot_version_curves(output, history, results, title, target_kl=target_kl)
    run.timing["saving_seconds"] = round(time.monotonic() - saving_started, 3)
    results.update(
        {
            "config": spec["config"],
            "algorithm": spec["algorithm"],
            "lineage": {
                "base_model": base_model,
                "reward_model_version": run.reward_model.version,
                "reward_model_path": run.reward_model.model_path,
                "feedback_watermark": run.watermark,
                "job_id": spec["job_id"],
            },
            "training_seconds": round(time.monotonic() - reporter.started, 2),
            "timed_steps": steps - first_step,  # steps training_seconds covers (a resumed run: fewer)
            # Seconds of each phase of this process, what its steps processed, and the device they ran on.
            "timing": run.timing,
        }
    )
    write_results(output, results)
    return {
        "output_dir": str(output),
        **{k: v for k, v in results.items() if not k.endswith("_history")},
        "initial_reward_mean": results["reward_history"][0] if results["reward_history"] else 0.0,
        "initial_score_mean": history.reward[0] if history.reward else 0.0,
    }


def train(context: JobContext) -> dict[str, Any]:
    if context.spec["algorithm"] in GROUP_ALGORITHMS:
        return train_group(context)
    return train_ppo(context)


def train_ppo(context: JobContext) -> dict[str, Any]:
    """PPO in this process, or as one rank of several under torchrun (TrainingConfig.num_processes)."""
    config = TrainingConfig(**context.spec["config"])
    group = Group.current(pick_device(config.device))
    try:
        result = train_ppo_rank(context, config, group)
    except Exception as error:
        if group.distributed and distributed.peer_failure(error):
            # Another rank died: its own error event (or torchrun's log) says why, not this lost connection.
            raise ReportedElsewhere(f"another rank stopped: {error}") from error
        raise
    group.close()
    return result


def train_ppo_rank(context: JobContext, config: TrainingConfig, group: Group) -> dict[str, Any]:
    checkpoint_path = context.job_dir / "checkpoint.pt"
    checkpoint = PPOTrainer.read_checkpoint(checkpoint_path, group.rank)  # a resumed job continues from here
    run = prepare_ranks(context, group, config, checkpoint["extra"] if checkpoint else {})
    trainer = PPOTrainer(config, run.base_path, run.device, group)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        context.sticky["resumed_from_step"] = trainer.step
        log.info("resumed from %s at step %d", checkpoint_path, trainer.step)
    run.timing["loading_seconds"] = round(time.monotonic() - run.loading_started, 3)
    extra = {
        "reward_model_version": run.reward_model.version,
        "reward_job_id": context.sticky.get("reward_job_id", ""),
    }
    unscored = {"count": 0}
    score = score_function(context, run, unscored, f"last checkpoint kept at {checkpoint_path}")
    first_step = trainer.step
    reporter = StepReporter(
        context,
        config.max_steps,
        first_step,
        run.timing,
        ("time/step_s", "tokens/response_width", "tokens/query_width"),
        group,
    )

    def save() -> None:
        trainer.save_checkpoint(checkpoint_path, extra)

    try:
        history = trainer.train(run.prompts, score, reporter, save)
    except BaseException:  # cancel, reward service down, anything: keep what was learnt
        save()
        raise
    if not group.is_main:
        return {}  # rank 0 saves the policy and reports the result
    return finish(
        context,
        run,
        trainer,
        history,
        reporter,
        first_step,
        config.max_steps,
        config.base_model,
        {"unscored_responses": unscored["count"]},
    )


def train_group(context: JobContext) -> dict[str, Any]:
    """GRPO or RLOO through TRL (rlhf.training.trl_trainers), with the same reward service, prompts, progress,
    cancel, checkpoints and version folder as PPO. TRL's checkpoints live in job_dir/trl; run.json beside
    them keeps the reward-model version a resumed run must keep using."""
    spec = context.spec
    algorithm = spec["algorithm"]
    config = config_class(algorithm)(**spec["algorithm_config"])
    trl_dir = context.job_dir / "trl"
    run_file = context.job_dir / "run.json"
    checkpoint = last_checkpoint(trl_dir)
    earlier = json.loads(run_file.read_text()) if checkpoint is not None and run_file.is_file() else {}
    run = prepare(context, config.base_model, config.device, earlier)
    run_file.write_text(
        json.dumps(
            {"reward_model_version": run.reward_model.version, "reward_job_id": context.sticky.get("reward_job_id", "")}
        )
    )
    trainer = GroupPolicyTrainer(algorithm, config, run.base_path, trl_dir, run.device)
    first_step = int(checkpoint.name.split("-")[-1]) if checkpoint is not None else 0
    if checkpoint is not None:
        context.sticky["resumed_from_step"] = first_step
        log.info("resuming from %s at step %d", checkpoint, first_step)
    run.timing["loading_seconds"] = round(time.monotonic() - run.loading_started, 3)
    unscored = {"count": 0}
    score = score_function(context, run, unscored, f"last checkpoint kept in {trl_dir}")
    reporter = StepReporter(
        context,
        config.max_steps,
        first_step,
        run.timing,
        ("time/step_s", "completions/max_length", "tokens/query_width"),
    )
    history = trainer.train(run.prompts, score, reporter)  # saves a checkpoint itself when stopped early
    last = reporter.last_metrics
    return finish(
        context,
        run,
        trainer,
        history,
        reporter,
        first_step,
        config.max_steps,
        config.base_model,
        {
            "unscored_responses": unscored["count"],
            "algorithm_config": dataclasses.asdict(config),
            # TRL's names for what PPO calls objective/kl and objective/entropy (kl: only when beta > 0).
            "final_kl": history.kl[-1] if history.kl else 0.0,
            "entropy": last.get("entropy", history.entropy[-1] if history.entropy else 0.0),
        },
    )


def relaunch_under_torchrun(argv: list[str]) -> None:
    """A PPO job configured for several processes (or machines, RLHF_TORCHRUN_ARGS): this process becomes
    torchrun (os.execv keeps its pid and process group, so the job manager's cancel reaches torchrun, which
    passes it on to every rank), running num_processes ranks of this module with the same arguments. Returns
    when one process is wanted."""
    if distributed.under_launcher():
        return
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--job-dir", type=pathlib.Path)
    job_dir = parser.parse_known_args(argv)[0].job_dir
    try:
        spec = json.loads((job_dir / "spec.json").read_text())
    except (TypeError, OSError, ValueError):
        return  # run_worker reports a missing or unreadable job folder
    if spec.get("algorithm") != "ppo":
        return
    processes = int(spec.get("config", {}).get("num_processes", 1))
    # Several machines (RLHF_TORCHRUN_ARGS names the rendezvous) need torchrun even for one rank on each.
    if processes <= 1 and not os.environ.get(distributed.LAUNCHER_ARGS_ENV, "").strip():
        return
    os.environ[SERVER_PID_ENV] = str(os.getppid())
    command = distributed.launcher_argv(processes, "policy_service.worker", argv)
    sys.stdout.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    relaunch_under_torchrun(sys.argv[1:])
    main_for("policy", train)
