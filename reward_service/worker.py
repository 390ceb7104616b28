"""`python -m reward_service.worker --job-dir DIR`: export the agent's feedback, train (the library), save."""

from __future__ import annotations

import pathlib
from typing import Any

from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.runtime.worker import JobContext, main_for
from rlhf.sdk.clients import FeedbackClient
from rlhf.training.config import RewardModelConfig
from rlhf.training.modeling import resolve_model
from rlhf.training.reward_training import Comparison, Rating, train_reward_model


def training_items(rows: list[fb.Feedback]) -> list[Rating | Comparison]:
    """Exported feedback rows as the library's training items."""
    items: list[Rating | Comparison] = []
    for row in rows:
        if row.kind == fb.FEEDBACK_KIND_RATING:
            items.append(Rating(row.prompt, row.response, row.score))
        elif row.kind == fb.FEEDBACK_KIND_COMPARISON:
            items.append(
                Comparison(row.prompt, row.chosen, row.rejected, row.margin if row.HasField("margin") else 0.0)
            )
    return items


def train(context: JobContext) -> dict[str, Any]:
    spec = context.spec
    config = RewardModelConfig(**spec["config"])
    context.progress(phase="exporting", message="exporting feedback")
    with FeedbackClient(spec["feedback_address"]) as feedback:
        rows, watermark = feedback.export(spec["agent_id"])
    base_path = resolve_model(config.base_model, pathlib.Path(spec["data_dir"]))
    result = train_reward_model(training_items(rows), config, base_path, context.job_dir / "output", context)
    result["feedback_count"] = len(rows)
    result["feedback_watermark"] = watermark
    result["base_model"] = config.base_model
    return result


if __name__ == "__main__":
    main_for("reward", train)
