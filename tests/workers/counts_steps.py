"""A worker that counts spec["steps"] steps of 0.05 s (default 200), stopping at its next step on a cancel."""

from __future__ import annotations

import time
from typing import Any

from rlhf.runtime.worker import JobContext, main_for


def train(context: JobContext) -> dict[str, Any]:
    steps = int(context.spec.get("steps", 200))
    for step in range(1, steps + 1):
        context.progress(phase="training", step=step, total_steps=steps)
        context.check_cancelled()
        time.sleep(0.05)
    return {"finished": True}


if __name__ == "__main__":
    main_for("test", train)
