"""Configuration of the library's training runs: the seed's TrainingConfig (RL) and RewardModelConfig.

Both share the model, LoRA and optimiser fields of `ModelTrainingConfig`; each field is documented where
it is declared. Defaults are the seed's.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ModelTrainingConfig:
    """What every training run here needs: a base model, LoRA or full fine-tuning, an optimiser, a device."""

    # Hub id or local folder of the starting point; "rlhf-tiny" is the project's own tiny model.
    base_model: str = "rlhf-tiny"
    # Train LoRA adapters (merged into the saved model) instead of every weight.
    use_lora: bool = True
    # LoRA rank.
    lora_r: int = 8
    # LoRA scaling numerator (scale = alpha / r).
    lora_alpha: int = 32
    # Dropout on the LoRA path (the base model's own dropout is off in RL).
    lora_dropout: float = 0.1
    # Modules that get adapters; empty lets peft pick the architecture's defaults.
    lora_target_modules: list[str] = dataclasses.field(default_factory=list)
    # AdamW learning rate.
    learning_rate: float = 1e-5
    # Examples per batch: prompts per rollout batch (RL), items per optimisation step (reward model).
    batch_size: int = 8
    # Micro-batches per optimiser step: PPO splits each minibatch into this many (still one step per
    # minibatch, as TRL does); the reward model accumulates this many batches.
    gradient_accumulation_steps: int = 1
    # Seed of sampling, data order, splits and initialisation.
    seed: int = 0
    # "auto", "cpu", "cuda", "cuda:N" or "mps".
    device: str = "auto"
    # "no", "fp16" or "bf16" (autocast on GPU only).
    mixed_precision: str = "no"
    # Intra-op CPU threads while training on the CPU; 0 chooses: one for models under 5M parameters
    # (faster: their operations are too short to split), every core otherwise, or OMP_NUM_THREADS when set.
    cpu_threads: int = 0


@dataclasses.dataclass
class TrainingConfig(ModelTrainingConfig):
    """Knobs of one RL run (PPO): the seed's TrainingConfig, then the extras."""

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
    # Longest response sampled; must leave room for a prompt in the model's context (prompts longer than
    # the room left are cut from the left, keeping their end).
    max_new_tokens: int = 128
    # Sampling temperature (logits are divided by it in training too).
    temperature: float = 1.0
    # The seed's top-k; PPO rollouts do not truncate: they sample the full softmax at `temperature`, the
    # distribution their log-probs, KL and entropy are computed under (as TRL does). Kept and recorded.
    top_k: int = 50
    # The seed's nucleus top-p; not applied to PPO rollouts, for the same reason as top_k.
    top_p: float = 0.95
    # Clip range of the value prediction around its old value.
    cliprange_value: float = 0.2
    # Horizon, in rollouts, of the adaptive KL controller (Ziegler et al., TRL's old formula): each step moves
    # the coefficient by up to 20% x batch_size / kl_horizon towards holding target_kl (the mean over a
    # batch of the KL summed over each response). TRL's 10000 suits batches of hundreds; with 8 prompts
    # per step it barely moved (0.2 -> 0.235 in 1,000 steps at 16x the target), so the default is 100
    # (1.6% a step at batch 8). 0 keeps the coefficient fixed.
    kl_horizon: int = 100
    # Gradient norm clip.
    max_grad_norm: float = 1.0
    # Subtracted from the score of a response that ends without EOS (TRL's convention: >= 0); 0 disables.
    missing_eos_penalty: float = 0.0
    # Clip scores to [-reward_clip, reward_clip]; 0 disables.
    reward_clip: float = 0.0
    # Whiten scores per rollout batch.
    whiten_rewards: bool = False
    # Save a checkpoint every this many steps; 0 saves only at the end, on cancel and on failure.
    checkpoint_interval: int = 0
    # Recompute activations in the backward pass instead of keeping them (less memory, ~30% more compute):
    # transformers' gradient checkpointing, non-reentrant, for models that support it
    # (the policy's; PPO's reference and the scoring passes keep no activations anyway).
    gradient_checkpointing: bool = False
    # Reward functions combined into the reward (rlhf.training.reward_functions), each {"name", "weight",
    # "params"}: the reward is the weighted sum of their values. Empty: the reward model's score.
    reward_functions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Data-parallel processes (PPO): the training worker runs under torchrun with this many ranks, each
    # sampling and scoring batch_size / num_processes prompts a step, gradients averaged across ranks, rank 0
    # saving. batch_size and mini_batch_size must divide by it. 1: one process, no torchrun.
    num_processes: int = 1


@dataclasses.dataclass
class RewardModelConfig(ModelTrainingConfig):
    """Knobs of one reward-model training run: the seed's RewardModelConfig."""

    # Passes over the training split.
    num_epochs: int = 3
    # Tokens of prompt + response kept (longest first truncated from the left of the prompt).
    max_length: int = 256
    # Share of items held out for validation metrics (seeded split).
    validation_fraction: float = 0.1
    # Stop after this many epochs without validation-loss improvement; 0 disables early stopping.
    early_stopping_patience: int = 0
    # Recompute the base model's activations in the backward pass instead of keeping them (less memory, about
    # a third more compute), as TrainingConfig.gradient_checkpointing does for the policy.
    gradient_checkpointing: bool = False


@dataclasses.dataclass
class GroupPolicyConfig(ModelTrainingConfig):
    """What GRPO and RLOO share (TRL's GRPOTrainer / RLOOTrainer): each step samples `num_generations`
    answers to each of `batch_size` prompts, scores them in one call, and takes one optimiser step (per
    `num_iterations` pass) on advantages taken within each prompt's group. No value head, no GAE."""

    # Optimiser steps (TRL's global_step); each generates one batch of batch_size x num_generations answers.
    max_steps: int = 1000
    # Longest answer sampled (TRL's max_completion_length; TRL's default 512 exceeds the tiny model's context,
    # so the seed's max_new_tokens default stands). Prompts longer than the room left are cut from the left.
    max_new_tokens: int = 128
    # Sampling temperature (TRL divides the logits by it in training too). Sampling is the full softmax, as PPO's.
    temperature: float = 1.0
    # Gradient norm clip.
    max_grad_norm: float = 1.0
    # Save a checkpoint every this many steps; 0 saves only at the end, on cancel and on failure.
    checkpoint_interval: int = 0
    # Optimisation passes over each generated batch (TRL's num_iterations, the paper's mu).
    num_iterations: int = 1
    # Lower clip of the importance ratio: 1 - epsilon.
    epsilon: float = 0.2
    # Upper clip: 1 + epsilon_high; 0 uses epsilon (TRL's None). DAPO recommends 0.28.
    epsilon_high: float = 0.0
    # Leave answers cut at max_new_tokens out of the loss (DAPO's advice).
    mask_truncated_completions: bool = False
    # Gradient checkpointing (TRL's gradient_checkpointing, non-reentrant), as TrainingConfig's.
    gradient_checkpointing: bool = False
    # Reward functions combined into the reward by the reward service, as for PPO (TrainingConfig's).
    reward_functions: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class GRPOTrainingConfig(GroupPolicyConfig):
    """Knobs of one GRPO run, with TRL 1.16's GRPOConfig defaults."""

    # Answers sampled per prompt (the group); at least 2.
    num_generations: int = 8
    # KL coefficient against the reference (the base weights: adapters off with LoRA); 0 loads no reference.
    beta: float = 0.0
    # Loss aggregation: "dapo" (tokens of the whole batch), "grpo" (per answer, then mean), "dr_grpo"
    # (a constant: max_new_tokens), "bnpo" (tokens of the local batch), "cispo" (clipped weights), "sapo".
    loss_type: str = "dapo"
    # Advantage scaling: "group" (by each group's std), "batch" (by the batch's std) or "none" (Dr. GRPO).
    scale_rewards: str = "group"


@dataclasses.dataclass
class RLOOTrainingConfig(GroupPolicyConfig):
    """Knobs of one RLOO run, with TRL 1.16's RLOOConfig defaults."""

    # Answers sampled per prompt; each one's baseline is the mean score of the others; at least 2.
    num_generations: int = 2
    # KL coefficient: beta x (sequence KL to the reference) is subtracted from each score.
    beta: float = 0.05
    # Whiten the advantages over each generated batch.
    normalize_advantages: bool = False


# GRPO's and RLOO's config classes by algorithm name.
GROUP_CONFIGS: dict[str, type[GroupPolicyConfig]] = {"grpo": GRPOTrainingConfig, "rloo": RLOOTrainingConfig}


def group_config(algorithm: str, config: TrainingConfig, knobs: GroupPolicyConfig | None = None) -> GroupPolicyConfig:
    """GRPO's or RLOO's whole config: the shared fields (model, LoRA, optimiser, batch, steps, sampling) from
    `config`, the algorithm's own from `knobs` (None: TRL's defaults)."""
    cls = GROUP_CONFIGS[algorithm]
    knobs = knobs if knobs is not None else cls()
    shared = {f.name for f in dataclasses.fields(TrainingConfig)}
    return dataclasses.replace(
        knobs, **{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if f.name in shared}
    )
