"""Configuration of the reward service and of one reward-model training run."""

from __future__ import annotations

import dataclasses

from rlhf.config import ServerConfig, env_int, env_str, service_address


@dataclasses.dataclass
class RewardModelConfig:
    """Knobs of one reward-model training run; defaults are the seed's RewardModelConfig."""

    # Hub id or local folder; "rlhf-tiny" is the project's own tiny model.
    base_model: str = "rlhf-tiny"
    # Train LoRA adapters (merged into the saved model) instead of every weight.
    use_lora: bool = True
    # LoRA rank.
    lora_r: int = 8
    # LoRA scaling numerator (scale = alpha / r).
    lora_alpha: int = 32
    # Dropout on the LoRA path.
    lora_dropout: float = 0.1
    # Modules that get adapters; empty lets peft pick the architecture's attention projections.
    lora_target_modules: list[str] = dataclasses.field(default_factory=list)
    # Items per optimisation step (before accumulation).
    batch_size: int = 8
    # Passes over the training split.
    num_epochs: int = 3
    # AdamW learning rate.
    learning_rate: float = 1e-5
    # Micro-batches accumulated per optimiser step.
    gradient_accumulation_steps: int = 1
    # Tokens of prompt + response kept (longest first truncated from the left of the prompt).
    max_length: int = 256
    # Share of items held out for validation metrics (seeded split).
    validation_fraction: float = 0.1
    # Seed of the split, the head's initialisation and the batch order.
    seed: int = 0
    # Stop after this many epochs without validation-loss improvement; 0 disables early stopping.
    early_stopping_patience: int = 0
    # "auto", "cpu", "cuda", "cuda:N" or "mps".
    device: str = "auto"
    # "no", "fp16" or "bf16" (autocast on GPU only).
    mixed_precision: str = "no"


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

    @classmethod
    def from_env(cls, **server_overrides) -> "RewardServiceConfig":
        return cls(server=ServerConfig.from_env("reward", **server_overrides),
                   feedback_address=service_address("feedback"),
                   score_max_batch=env_int("RLHF_SCORE_MAX_BATCH", 4096),
                   device=env_str("RLHF_REWARD_DEVICE", "auto"))
