"""One logging setup for every process: a line per event with time, level, component and message."""

from __future__ import annotations

import logging
import os


def setup_logging(component: str, level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("RLHF_LOG_LEVEL", "INFO")).upper(),
        format=f"%(asctime)s %(levelname)s {component} %(name)s: %(message)s",
    )
