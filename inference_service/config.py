"""Settings of the inference service; each field names its environment variable."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from rlhf.runtime.config import ServerConfig, env_int, env_str, service_address


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


@dataclasses.dataclass
class InferenceServiceConfig:
    """How the inference server runs and what it allows."""

    # Host, port, data dir, database URL and message limits of the gRPC server.
    server: ServerConfig
    # Where the policy service listens (RLHF_POLICY_ADDR); versions are looked up there with GetPolicy.
    policy_addr: str = dataclasses.field(default_factory=lambda: service_address("policy"))
    # The model that version "base" serves: hub id, local folder, or "rlhf-tiny" (RLHF_INFERENCE_BASE_MODEL).
    base_model: str = "rlhf-tiny"
    # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" (RLHF_INFERENCE_DEVICE).
    device: str = "auto"
    # Weights' dtype while serving (RLHF_INFERENCE_DTYPE): "auto" (float32 on CPUs; bf16 on a CUDA card that
    # supports it, else fp16), "float32", "bf16" or "fp16".
    dtype: str = "auto"
    # Largest max_new_tokens served; larger requests are clamped to it (RLHF_INFERENCE_MAX_NEW_TOKENS_CAP).
    max_new_tokens_cap: int = 512
    # max_new_tokens when a request leaves it unset (RLHF_INFERENCE_DEFAULT_MAX_NEW_TOKENS).
    default_max_new_tokens: int = 64
    # Loaded models kept in memory, least recently used evicted first (RLHF_INFERENCE_MODEL_CACHE_SIZE).
    model_cache_size: int = 4
    # Also evict while the cached models' parameters exceed this many bytes; 0 = no byte limit
    # (RLHF_INFERENCE_MODEL_CACHE_BYTES). The newest model always stays, even if alone it is larger.
    model_cache_max_bytes: int = 0
    # Longest prompt accepted, in characters (RLHF_INFERENCE_MAX_PROMPT_CHARS).
    max_prompt_chars: int = 32_000
    # Most stop sequences per request, and the longest one in characters.
    max_stop_sequences: int = 16
    max_stop_chars: int = 256
    # Deadline of each call to the policy service, in seconds (RLHF_INFERENCE_POLICY_TIMEOUT).
    policy_timeout_seconds: float = 10.0
    # Concurrent requests to one model version share forward passes (continuous batching); false runs each
    # request alone in its own thread, as before (RLHF_INFERENCE_BATCHING=0).
    batching: bool = True
    # Most sequences decoded together per model version; more requests wait for a free row
    # (RLHF_INFERENCE_MAX_BATCH_SIZE). 1 is the same as batching off.
    max_batch_size: int = 32

    @classmethod
    def from_env(cls, **overrides: Any) -> InferenceServiceConfig:
        """Environment first, then `overrides` (None values are ignored, so CLI flags can pass through).

        Server fields (host, port, data_dir, database_url, max_message_bytes, grace_seconds) go to
        ServerConfig; the rest to this class.
        """
        server_fields = {f.name for f in dataclasses.fields(ServerConfig)} - {"service"}
        server_overrides = {k: v for k, v in overrides.items() if k in server_fields}
        own = {k: v for k, v in overrides.items() if k not in server_fields and v is not None}
        values: dict[str, Any] = dict(
            server=ServerConfig.from_env("inference", **server_overrides),
            policy_addr=service_address("policy"),
            base_model=env_str("RLHF_INFERENCE_BASE_MODEL", "rlhf-tiny"),
            device=env_str("RLHF_INFERENCE_DEVICE", "auto"),
            dtype=env_str("RLHF_INFERENCE_DTYPE", "auto"),
            max_new_tokens_cap=env_int("RLHF_INFERENCE_MAX_NEW_TOKENS_CAP", 512),
            default_max_new_tokens=env_int("RLHF_INFERENCE_DEFAULT_MAX_NEW_TOKENS", 64),
            model_cache_size=env_int("RLHF_INFERENCE_MODEL_CACHE_SIZE", 4),
            model_cache_max_bytes=env_int("RLHF_INFERENCE_MODEL_CACHE_BYTES", 0),
            max_prompt_chars=env_int("RLHF_INFERENCE_MAX_PROMPT_CHARS", 32_000),
            policy_timeout_seconds=_env_float("RLHF_INFERENCE_POLICY_TIMEOUT", 10.0),
            batching=env_str("RLHF_INFERENCE_BATCHING", "1").lower() not in ("0", "false", "no", "off"),
            max_batch_size=env_int("RLHF_INFERENCE_MAX_BATCH_SIZE", 32),
        )
        values.update(own)
        return cls(**values)
