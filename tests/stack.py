"""A whole stack of real services in threads (feedback, reward, policy, inference) for the training tests."""

from __future__ import annotations

import dataclasses
import pathlib

from feedback_service.app import start as start_feedback
from feedback_service.config import FeedbackServiceConfig
from inference_service.app import start as start_inference
from inference_service.config import InferenceServiceConfig
from policy_service.app import start as start_policy
from policy_service.config import PolicyServiceConfig
from reward_service.app import start as start_reward
from reward_service.config import RewardServiceConfig
from tests.helpers import server_config
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
