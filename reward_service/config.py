"""Configuration of the reward service (one run's knobs are rlhf.training.config.RewardModelConfig)."""

from __future__ import annotations

import dataclasses

from rlhf.runtime.config import ServerConfig, env_int, env_str, service_address
from rlhf.training.reward_functions import parse_registrations


@dataclasses.dataclass
class RewardServiceConfig:
    """How the reward service runs."""

    # Host, port, data dir, database URL, message limits.
    server: ServerConfig
    # Feedback service address for exports and counts (RLHF_FEEDBACK_ADDR).
    feedback_address: str = dataclasses.field(default_factory=lambda: service_address("feedback"))
    # Fewest usable feedback items a training job accepts (the seed's minimum).
    min_feedback: int = 10
    # Most items one ScoreBatch request may carry (RLHF_SCORE_MAX_BATCH).
    score_max_batch: int = 4096
    # Items per forward pass when scoring.
    score_micro_batch: int = 64
    # Reward models kept loaded for scoring (least recently used evicted).
    model_cache_size: int = 4
    # Device for scoring: "auto", "cpu", "cuda", ...
    device: str = "auto"
    # Seconds a job request may spend checking that its base model can be loaded (config only; a hub id
    # that does not answer in time is FAILED_PRECONDITION).
    model_check_timeout_seconds: float = 10.0
    # Operator reward functions requests may name beside the built-ins, {name: "package.module:function"}
    # (RLHF_REWARD_FUNCTIONS="name=package.module:function,..."); imported at start, so a bad entry stops
    # the service with the reason. Each takes (prompts, responses, scores, **params), returns one number each.
    reward_functions: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_env(cls, **server_overrides) -> RewardServiceConfig:
        return cls(
            server=ServerConfig.from_env("reward", **server_overrides),
            feedback_address=service_address("feedback"),
            score_max_batch=env_int("RLHF_SCORE_MAX_BATCH", 4096),
            device=env_str("RLHF_REWARD_DEVICE", "auto"),
            reward_functions=parse_registrations(env_str("RLHF_REWARD_FUNCTIONS", "")),
        )
