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

from rlhf.runtime.environment import prepare_environment  # noqa: E402

prepare_environment()  # servers run in this process: set before torch loads


@pytest.fixture(scope="session")
def tiny_model() -> pathlib.Path:
    from rlhf.training.tinymodel import ensure_tiny_model

    return ensure_tiny_model(pathlib.Path(os.environ["RLHF_MODEL_CACHE"]))


# ----------------------------------------------------------------------------------------------------
# CI runs the PostgreSQL test cases (.ci/run starts a server and sets RLHF_TEST_POSTGRES_URL). There, a
# missing URL fails them instead of letting them skip; locally they still skip without a server.


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Runs before the item's fixtures are set up, so before any fixture can skip it.
    if (
        item.get_closest_marker("postgres")
        and os.environ.get("CI") == "true"
        and not os.environ.get("RLHF_TEST_POSTGRES_URL")
    ):
        pytest.fail(
            "CI=true but RLHF_TEST_POSTGRES_URL is not set: the PostgreSQL test cases must run in CI "
            "(.ci/run starts a server with .ci/postgres.sh)",
            pytrace=False,
        )
