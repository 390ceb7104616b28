"""Configuration of the REST gateway: where it listens, which services it calls, and what training requests get.

Each field reads an environment variable (named in its comment) and may be overridden by a flag of
`python -m gateway`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rlhf.runtime.config import DEFAULT_PORTS, SecurityConfig, env_int, env_str, service_address


def env_json(name: str) -> dict[str, Any]:
    """A JSON object from the environment variable `name` ({} when unset); anything else is a clear error."""
    raw = env_str(name, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{name} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object of config fields, got {raw!r}")
    return value


@dataclasses.dataclass
class GatewayConfig:
    """How the gateway runs."""

    # Interface to bind (RLHF_HOST); 0.0.0.0 in containers.
    host: str = "127.0.0.1"
    # Port to bind (RLHF_GATEWAY_PORT, default 8000); 0 picks a free one (tests).
    port: int = DEFAULT_PORTS["gateway"]
    # Feedback service address (RLHF_FEEDBACK_ADDR).
    feedback_address: str = dataclasses.field(default_factory=lambda: service_address("feedback"))
    # Policy service address (RLHF_POLICY_ADDR): training, jobs, the policy registry.
    policy_address: str = dataclasses.field(default_factory=lambda: service_address("policy"))
    # Deadline of each call to a service, in seconds, except waiting for a training job.
    call_timeout_seconds: float = 60.0
    # How long a blocking train_policy waits for its job (RLHF_GATEWAY_TRAIN_TIMEOUT, seconds); past it the
    # answer is 504 with the job's URL, and the job goes on.
    train_timeout_seconds: float = 24 * 3600.0
    # Retry-After (seconds) of a 503 or 504 answer, when a service behind the gateway is down or slow.
    retry_after_seconds: int = 5
    # Seconds between keep-alive comments of a job's event stream while the job reports nothing new.
    heartbeat_seconds: float = 15.0
    # How long /healthz waits for each service's health check, in seconds.
    health_timeout_seconds: float = 2.0
    # TrainingConfig fields (snake_case, as in the dry run's modelConfig) that every training request starts
    # from; the request's maxSteps, learningRate and config win (RLHF_GATEWAY_TRAINING_DEFAULTS, a JSON object,
    # e.g. {"base_model": "/models/my-model"}).
    training_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    # TrainingConfig fields set over whatever a request asks (RLHF_GATEWAY_TRAINING_OVERRIDES, a JSON object):
    # an operator's pins, or small runs on a small machine ({"max_steps": 2}); answers report what ran.
    training_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # RewardModelConfig fields of the reward model a run trains first when the request names none
    # (RLHF_GATEWAY_REWARD_MODEL_CONFIG, a JSON object, e.g. {"num_epochs": 2}).
    reward_model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    # TLS of the gateway's own port and of its calls to the services (RLHF_TLS_*: README "Security"). Callers'
    # bearer tokens are forwarded to the services, which decide; the gateway never sends its own RLHF_TOKEN.
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)

    @classmethod
    def from_env(cls, **overrides: Any) -> GatewayConfig:
        values: dict[str, Any] = dict(
            host=env_str("RLHF_HOST", "127.0.0.1"),
            port=env_int("RLHF_GATEWAY_PORT", DEFAULT_PORTS["gateway"]),
            feedback_address=service_address("feedback"),
            policy_address=service_address("policy"),
            train_timeout_seconds=float(env_str("RLHF_GATEWAY_TRAIN_TIMEOUT", str(24 * 3600.0))),
            training_defaults=env_json("RLHF_GATEWAY_TRAINING_DEFAULTS"),
            training_overrides=env_json("RLHF_GATEWAY_TRAINING_OVERRIDES"),
            reward_model_config=env_json("RLHF_GATEWAY_REWARD_MODEL_CONFIG"),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
