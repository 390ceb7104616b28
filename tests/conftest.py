"""Shared fixtures: one tiny-model cache for the whole run, and real servers on 127.0.0.1:0."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Every data dir in the tests (and every worker process) shares one built tiny model.
os.environ.setdefault("RLHF_MODEL_CACHE", str(ROOT / ".rlhf" / "test-model-cache"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# No model hub is reachable here: fail hub look-ups at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlhf.runtime import prepare_environment  # noqa: E402

prepare_environment()  # servers run in this process: set before torch loads


@pytest.fixture(scope="session")
def tiny_model() -> pathlib.Path:
    from rlhf.tinymodel import ensure_tiny_model

    return ensure_tiny_model(pathlib.Path(os.environ["RLHF_MODEL_CACHE"]))
