"""Configuration of the policy service and of one policy training run."""

from __future__ import annotations

import dataclasses

from rlhf.config import ServerConfig, env_int, service_address


@dataclasses.dataclass
class TrainingConfig:
    """Knobs of one RL run; defaults are the seed's TrainingConfig, then the extras."""

    # Hub id or local folder of the policy's starting point; "rlhf-tiny" is the project's tiny model.
    base_model: str = "rlhf-tiny"
    # Train LoRA adapters (reference = adapters disabled; merged on save) instead of every weight.
    use_lora: bool = True
    # LoRA rank.
    lora_r: int = 8
    # LoRA scaling numerator (scale = alpha / r).
    lora_alpha: int = 32
    # Dropout on the LoRA path (model dropout is always off in RL).
    lora_dropout: float = 0.1
    # AdamW learning rate of the policy and value head.
    learning_rate: float = 1e-5
    # Prompts per rollout batch (one ScoreBatch call each).
    batch_size: int = 8
    # Rows per PPO minibatch.
    mini_batch_size: int = 4
    # Passes over each rollout batch.
    ppo_epochs: int = 4
    # Rollout + update steps.
    max_steps: int = 1000
    # Initial coefficient of the per-token KL penalty against the reference.
    init_kl_coef: float = 0.2
    # KL (summed over a response) the adaptive controller aims for.
    target_kl: float = 6.0
    # Discount of GAE.
    gamma: float = 1.0
    # Lambda of GAE.
    lam: float = 0.95
    # Clip range of the policy ratio.
    cliprange: float = 0.2
    # Weight of the value loss.
    vf_coef: float = 0.1
    # Longest response sampled.
    max_new_tokens: int = 128
    # Sampling temperature (logits are divided by it in training too).
    temperature: float = 1.0
    # Top-k sampling; 0 disables.
    top_k: int = 50
    # Nucleus sampling.
    top_p: float = 0.95
    # Minibatches accumulated per optimiser step.
    gradient_accumulation_steps: int = 1
    # "auto", "cpu", "cuda", "cuda:N" or "mps".
    device: str = "auto"
    # "no", "fp16" or "bf16" (autocast on GPU only).
    mixed_precision: str = "no"
    # Clip range of the value prediction around its old value.
    cliprange_value: float = 0.2
    # Horizon of the adaptive KL controller; 0 keeps the coefficient fixed.
    kl_horizon: int = 10000
    # Gradient norm clip.
    max_grad_norm: float = 1.0
    # Added to the score of a response that ends without EOS (usually negative); 0 disables.
    missing_eos_penalty: float = 0.0
    # Clip scores to [-reward_clip, reward_clip]; 0 disables.
    reward_clip: float = 0.0
    # Whiten scores per rollout batch.
    whiten_rewards: bool = False
    # Seed of sampling, prompt order and initialisation.
    seed: int = 0
    # Save a checkpoint every this many steps; 0 saves only at the end, on cancel and on failure.
    checkpoint_interval: int = 0
    # Modules that get adapters; empty lets peft pick the architecture's defaults.
    lora_target_modules: list[str] = dataclasses.field(default_factory=list)


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

    @classmethod
    def from_env(cls, **server_overrides) -> "PolicyServiceConfig":
        return cls(server=ServerConfig.from_env("policy", **server_overrides),
                   feedback_address=service_address("feedback"), reward_address=service_address("reward"),
                   max_steps_cap=env_int("RLHF_MAX_STEPS_CAP", 100_000))
