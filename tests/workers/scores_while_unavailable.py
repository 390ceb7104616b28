"""A worker that scores against a reward service that is down, as the policy worker does: ScoreBatch retried with
backoff (about 30 s in all), the waits being the JobContext's, so a cancel ends them at once."""

from __future__ import annotations

from typing import Any

from rlhf.runtime.worker import JobContext, main_for
from rlhf.sdk.clients import RewardClient


def train(context: JobContext) -> dict[str, Any]:
    with RewardClient("127.0.0.1:1", timeout=2.0) as reward:  # nothing listens on port 1
        reward.sleep = context.sleep
        context.progress(phase="scoring", step=1)
        reward.score("agent", [("prompt", "response")], retries=6)
    return {"scored": True}


if __name__ == "__main__":
    main_for("test", train)
