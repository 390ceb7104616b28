"""A worker that stops at its next step once a cancel arrived."""

from __future__ import annotations

import time
from typing import Any

from rlhf.runtime.worker import JobContext, main_for


def train(context: JobContext) -> dict[str, Any]:
    for step in range(1, 200):
        context.progress(phase="training", step=step, total_steps=200)
        context.check_cancelled()
        time.sleep(0.05)
    return {"finished": True}


if __name__ == "__main__":
    main_for("test", train)
