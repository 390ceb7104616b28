"""How long-running library calls report progress and learn that they should stop.

A service's job worker passes its JobContext (rlhf.runtime.worker); in-process callers pass nothing
(SilentProgress), LoggedProgress, or their own object with the same two methods.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol


class Progress(Protocol):
    def progress(self, **fields: Any) -> None:
        """Report where the work is (phase, step, total_steps, losses, ...)."""

    def check_cancelled(self) -> None:
        """Raise to stop the work (it is called between steps)."""


class SilentProgress:
    """Reports nothing and never stops the work."""

    def progress(self, **fields: Any) -> None:
        pass

    def check_cancelled(self) -> None:
        pass


class LoggedProgress(SilentProgress):
    """Training steps to the `rlhf` logger (the library's in-process runs: RLHFTrainer, train_reward_model)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def progress(self, **fields: Any) -> None:
        if fields.get("phase") == "training" and fields.get("step"):
            logging.getLogger("rlhf").info("%s: step %s/%s", self.what, fields["step"], fields.get("total_steps", "?"))
