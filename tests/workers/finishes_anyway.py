"""A worker that ignores cancellation and delivers its result (like a run cancelled while saving)."""

from __future__ import annotations

import time
from typing import Any

from rlhf.runtime.worker import JobContext, main_for


def train(context: JobContext) -> dict[str, Any]:
    context.progress(phase="saving", step=1, total_steps=1)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and not context.cancel_requested:
        time.sleep(0.05)
    time.sleep(0.3)  # finishes its work after the cancel arrived
    return {"finished": True, "saw_cancel": context.cancel_requested}


if __name__ == "__main__":
    main_for("test", train)
