"""A whole stack of real services in threads (feedback, reward, policy, inference) for the training tests."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator

from feedback_service.app import start as start_feedback
from feedback_service.config import FeedbackServiceConfig
from inference_service.app import start as start_inference
from inference_service.config import InferenceServiceConfig
from policy_service.app import start as start_policy
from policy_service.config import PolicyServiceConfig
from reward_service.app import start as start_reward
from reward_service.config import RewardServiceConfig
from tests.helpers import rated_answers, server_config, submit_ratings
from tests.servers import ServerThread


@dataclasses.dataclass
class Stack:
    data_dir: pathlib.Path
    feedback: ServerThread
    reward: ServerThread
    policy: ServerThread
    inference: ServerThread | None

    def stop(self) -> None:
        for server in (self.inference, self.policy, self.reward, self.feedback):
            if server is not None:
                server.stop()


def reward_server(data_dir: pathlib.Path, feedback_address: str) -> ServerThread:
    return ServerThread(
        start_reward, RewardServiceConfig(server=server_config("reward", data_dir), feedback_address=feedback_address)
    ).__enter__()


def policy_server(
    data_dir: pathlib.Path, feedback_address: str, reward_address: str, score_retries: int = 6
) -> ServerThread:
    return ServerThread(
        start_policy,
        PolicyServiceConfig(
            server=server_config("policy", data_dir),
            feedback_address=feedback_address,
            reward_address=reward_address,
            score_retries=score_retries,
        ),
    ).__enter__()


def start_stack(data_dir: pathlib.Path, with_inference: bool = True) -> Stack:
    feedback = ServerThread(
        start_feedback, FeedbackServiceConfig.from_env(server=server_config("feedback", data_dir))
    ).__enter__()
    reward = reward_server(data_dir, feedback.address)
    policy = policy_server(data_dir, feedback.address, reward.address)
    inference = None
    if with_inference:
        inference = ServerThread(
            start_inference, InferenceServiceConfig.from_env(data_dir=data_dir, port=0, policy_addr=policy.address)
        ).__enter__()
    return Stack(data_dir, feedback, reward, policy, inference)


@contextlib.contextmanager
def stack_with_ratings(data_dir: pathlib.Path, ratings: dict[str, int], seed: int) -> Iterator[Stack]:
    """Feedback, reward and policy servers (no inference) with `ratings[agent]` rated answers (seeded) stored
    for each agent; stopped on exit."""
    stack = start_stack(data_dir, with_inference=False)
    try:
        with stack.feedback.channel() as channel:
            for agent_id, count in ratings.items():
                submit_ratings(channel, agent_id, rated_answers(count, seed=seed))
        yield stack
    finally:
        stack.stop()
