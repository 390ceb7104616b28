"""Configuration of the policy service (one run's knobs are rlhf.training.config.TrainingConfig)."""

from __future__ import annotations

import dataclasses

from rlhf.runtime.config import ServerConfig, env_int, env_str, service_address


@dataclasses.dataclass
class PolicyServiceConfig:
    """How the policy service runs."""

    # Host, port, data dir, database URL, message limits.
    server: ServerConfig
    # Feedback service address: prompts and counts (RLHF_FEEDBACK_ADDR).
    feedback_address: str = dataclasses.field(default_factory=lambda: service_address("feedback"))
    # Reward service address: reward models and every score (RLHF_REWARD_ADDR).
    reward_address: str = dataclasses.field(default_factory=lambda: service_address("reward"))
    # Fewest feedback items a run accepts (the seed's minimum).
    min_feedback: int = 10
    # Largest max_steps a request may ask for (RLHF_MAX_STEPS_CAP).
    max_steps_cap: int = 100_000
    # Largest max_new_tokens a request may ask for.
    max_new_tokens_cap: int = 2048
    # Seconds one ScoreBatch call may take before it is retried.
    score_timeout_seconds: float = 60.0
    # Retries of an unavailable reward service before the job fails (exponential backoff from 0.5 s).
    score_retries: int = 6
    # Seconds a check that a base model can be loaded may take (a hub id: its config.json is fetched, no
    # weights); past it, TrainPolicy answers FAILED_PRECONDITION.
    model_check_timeout_seconds: float = 10.0
    # How policy versions are named (RLHF_POLICY_VERSION_NAMING): "sequential" ("v1", "v2", ...) or
    # "feedback_count", the seed's naming after the feedback count a version was trained on ("v15", then "v25");
    # a name is never reused: a second version on the same count is "v15.2", then "v15.3" (rlhf.runtime.registry).
    version_naming: str = "sequential"

    @classmethod
    def from_env(cls, **server_overrides) -> PolicyServiceConfig:
        return cls(
            server=ServerConfig.from_env("policy", **server_overrides),
            feedback_address=service_address("feedback"),
            reward_address=service_address("reward"),
            max_steps_cap=env_int("RLHF_MAX_STEPS_CAP", 100_000),
            version_naming=env_str("RLHF_POLICY_VERSION_NAMING", "sequential"),
        )
