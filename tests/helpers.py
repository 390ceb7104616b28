"""Synthetic feedback and service wiring shared by the training tests."""

from __future__ import annotations

import contextlib
import os
import pathlib
import random
import time
import uuid
from collections.abc import Iterator

import grpc

from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.runtime.config import ServerConfig
from rlhf.sdk import rater
from rlhf.training import corpus


def server_config(service: str, data_dir: pathlib.Path) -> ServerConfig:
    return ServerConfig(service=service, port=0, data_dir=data_dir)


def rated_answers(count: int, seed: int = 0) -> list[tuple[str, str, float]]:
    """(prompt, answer, rater score): 1-3 sentences, each on a random topic, so scores are graded."""
    rng = random.Random(seed)
    topics = sorted(corpus.TOPICS)
    out = []
    for _ in range(count):
        answer = " " + " ".join(corpus.sentence(rng, rng.choice(topics)) for _ in range(rng.randint(1, 3)))
        out.append((rng.choice(corpus.QUESTIONS), answer, rater.rate(answer)))
    return out


def submit_ratings(channel: grpc.Channel, agent_id: str, items: list[tuple[str, str, float]]) -> None:
    from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc

    stub = fb_grpc.FeedbackServiceStub(channel)
    requests = (
        fb.StreamFeedbackRequest(
            feedback=fb.SubmitFeedbackRequest(
                agent_id=agent_id, prompt=p, response=r, score=s, request_id=f"{agent_id}-{i}"
            )
        )
        for i, (p, r, s) in enumerate(items)
    )
    acks = list(stub.StreamFeedback(requests, timeout=60))
    assert all(a.accepted for a in acks), [a.reason for a in acks if not a.accepted]


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


@contextlib.contextmanager
def postgres_schema(prefix: str) -> Iterator[str]:
    """A URL of a fresh schema on the test PostgreSQL (RLHF_TEST_POSTGRES_URL, else the test skips): every
    connection of it works in that schema (search_path), dropped afterwards."""
    import pytest
    from sqlalchemy import text

    from rlhf.runtime.db import make_engine

    url = os.environ.get("RLHF_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("RLHF_TEST_POSTGRES_URL is not set")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = make_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {name}"))
    try:
        yield f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{name}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {name} CASCADE"))
        admin.dispose()
