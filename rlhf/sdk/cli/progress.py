"""Live progress of training jobs on stderr (rich): one bar per phase, each with its own counts.

A policy job first has the reward service train a reward model (its own steps, epochs and loss, read from
the reward job), then loads the base model, then runs its RL steps, then saves. Each phase gets its own
bar; a note on stderr marks each phase's end, so a log (stderr not a terminal) tells the story too.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from rlhf.sdk.cli import output

# How long a reward job may sit in "exporting" before we say what is probably taking the time.
SLOW_PREPARE_SECONDS = 5.0


def state_name(job: Any) -> str:
    """A job's state without the JOB_STATE_ prefix (either service's jobs)."""
    return type(job).DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[job.state].name[10:]


class _Bars:
    """One rich task per phase; starting a phase completes the one before."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.current = ""

    def phase(self, name: str, description: str, total: float | None = None) -> Any:
        if name not in self.tasks:
            if not self.progress.live.is_started:  # started with the first bar: nothing shown before
                self.progress.start()
            self.finish()
            self.tasks[name] = self.progress.add_task(description, total=total, info="", count="")
            self.current = name
        return self.tasks[name]

    def finish(self, complete: bool = True) -> None:
        """End the current phase's bar: full when the phase completed (a later one began, or the job succeeded),
        else left where it stopped."""
        if self.current:
            task = self.tasks[self.current]
            if complete:
                total = self.progress.tasks[task].total or 1
                counted = self.progress.tasks[task].fields.get("count")
                self.progress.update(
                    task, total=total, completed=total, count=f"{total:.0f}/{total:.0f}" if counted else ""
                )
            self.current = ""

    def count(self, name: str, description: str, step: int, total: int, info: str) -> None:
        """A phase with countable steps: its bar, `step/total` and `info`."""
        task = self.phase(name, description, total=total or None)
        count = f"{step}/{total}" if total else ""
        self.progress.update(task, completed=step, total=total or None, info=info, count=count)

    def note(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)


def _progress(disable: bool = False) -> Progress:
    return Progress(
        SpinnerColumn(finished_text="✓"),
        TextColumn("{task.description:<21}"),
        BarColumn(bar_width=30),
        TextColumn("{task.fields[count]:>9}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=output.stderr(),
        disable=disable,
    )


class RewardJobView:
    """Shows a reward-model job's phases: exporting (and preparing the base model), loading, training (steps,
    epochs, loss), saving."""

    def __init__(self, bars: _Bars, prefix: str = "") -> None:
        self.bars = bars
        self.prefix = prefix  # "reward model " inside a policy job (its bars apart from the policy's own)
        self.exporting_since = 0.0

    def show(self, job: Any) -> None:
        p = job.progress
        phase = p.phase or "queued"
        if phase in ("queued", "exporting"):
            task = self.bars.phase(f"{self.prefix}prepare", f"{self.prefix}prepare")
            self.exporting_since = self.exporting_since or time.monotonic()
            info = "queued" if phase == "queued" else "exporting feedback"
            if time.monotonic() - self.exporting_since > SLOW_PREPARE_SECONDS:
                info = "preparing the base model (a first run builds the tiny default model: a minute or more)"
            self.bars.progress.update(task, info=info)
        elif phase == "loading":
            task = self.bars.phase(f"{self.prefix}load", f"{self.prefix}load")
            self.bars.progress.update(task, info=p.message)
        elif phase == "training":
            loss = f"loss {p.train_loss:.4f}"
            if p.HasField("validation_loss"):
                loss += f", validation {p.validation_loss:.4f}"
            info = f"epoch {p.epoch}/{p.total_epochs}  {loss}  eta {p.eta_seconds:.0f}s"
            self.bars.count(f"{self.prefix}train", f"{self.prefix}train", p.step, p.total_steps, info)
        elif phase == "saving":
            self.bars.phase(f"{self.prefix}save", f"{self.prefix}save")


def watch_reward_job(client: Any, job_id: str, disable: bool = False) -> Any:
    """Follow a reward-model job until it ends; the last state."""
    job = None
    progress = _progress(disable)
    try:
        bars = _Bars(progress)
        view = RewardJobView(bars)
        for job in client.watch(job_id):
            view.show(job)
        bars.finish(complete=job is not None and state_name(job) == "SUCCEEDED")
    finally:
        progress.stop()
    return job


def watch_policy_job(client: Any, job_id: str, reward_client: Any | None, disable: bool = False) -> Any:
    """Follow a policy job until it ends; the last state. `reward_client` reads the progress of the reward
    model it trains first (without it, the policy job's own message is shown)."""
    job = None
    progress = _progress(disable)
    try:
        bars = _Bars(progress)
        reward_view = RewardJobView(bars, prefix="reward model ")
        announced: set[str] = set()
        saw_reward_phase = False  # a job watched after its reward phase has nothing to announce about it
        for job in client.watch(job_id):
            p = job.progress
            if p.phase == "reward_model":
                saw_reward_phase = True
                reward_job = _reward_job(reward_client, job.reward_job_id)
                if reward_job is not None:
                    reward_view.show(reward_job)
                else:
                    task = bars.phase("reward", "reward model")
                    progress.update(task, info=p.message)
                continue
            if saw_reward_phase and "reward" not in announced and job.reward_model_version:
                announced.add("reward")
                bars.finish()
                bars.note(f"reward model {job.reward_model_version} trained (reward job {job.reward_job_id})")
            if p.phase == "loading":
                task = bars.phase("load", "load policy")
                progress.update(task, info=p.message)
            elif p.phase == "training":
                m = p.metrics
                info = (
                    f"score {m.get('objective/scores', 0.0):+.3f}  kl {m.get('objective/kl', 0.0):.2f}  "
                    f"{p.steps_per_second:.2f} steps/s  eta {p.eta_seconds:.0f}s"
                )
                bars.count("train", f"train ({_algorithm(job)})", p.step, p.total_steps, info)
            elif p.phase == "saving":
                bars.phase("save", "save")
        bars.finish(complete=job is not None and state_name(job) == "SUCCEEDED")
    finally:
        progress.stop()
    return job


def _algorithm(job: Any) -> str:
    name = type(job).DESCRIPTOR.fields_by_name["algorithm"].enum_type.values_by_number[job.algorithm].name
    return {"ALGORITHM_GRPO": "GRPO", "ALGORITHM_RLOO": "RLOO"}.get(name, "PPO")


def _reward_job(reward_client: Any | None, job_id: str) -> Any | None:
    if reward_client is None or not job_id:
        return None
    try:
        return reward_client.get_job(job_id)
    except grpc.RpcError:
        return None  # the reward service may not be reachable from here: the policy job's message will do
