"""`python -m reward_service.worker --job-dir DIR`: export the agent's feedback, train, save."""

from __future__ import annotations

import pathlib
from typing import Any

from reward_service.config import RewardModelConfig
from reward_service.training import train_reward_model
from rlhf.clients import FeedbackClient
from rlhf.modeling import resolve_model
from rlhf.worker import JobContext, main_for


def train(context: JobContext) -> dict[str, Any]:
    spec = context.spec
    config = RewardModelConfig(**spec["config"])
    context.progress(phase="exporting", message="exporting feedback")
    with FeedbackClient(spec["feedback_address"]) as feedback:
        rows, watermark = feedback.export(spec["agent_id"])
    base_path = resolve_model(config.base_model, pathlib.Path(spec["data_dir"]))
    result = train_reward_model(context, rows, watermark, config, base_path, context.job_dir / "output")
    result["base_model"] = config.base_model
    return result


if __name__ == "__main__":
    main_for("reward", train)
