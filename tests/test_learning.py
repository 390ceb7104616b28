"""PPO learns on the seed's LoRA defaults (only the learning rate and step count changed for the tiny model),
with the KL to the reference held near target_kl. In-process: rlhf.sdk.learning_task. GRPO and RLOO (TRL's
trainers) learn the same task on the same defaults with TRL's own, their KL to the base bounded."""

from __future__ import annotations

import dataclasses

import pytest

from rlhf.sdk import learning_task
from rlhf.training.config import TrainingConfig

pytestmark = pytest.mark.slow


def test_lora_defaults_raise_the_held_out_rater_score_with_kl_near_the_target(tiny_model, tmp_path):
    config = TrainingConfig(learning_rate=3e-3, max_steps=40)
    defaults = TrainingConfig()
    assert (config.use_lora, config.lora_r, config.lora_alpha, config.lora_dropout) == (True, 8, 32, 0.1)
    assert (config.batch_size, config.mini_batch_size, config.ppo_epochs) == (8, 4, 4)
    assert (config.max_new_tokens, config.init_kl_coef, config.target_kl) == (128, 0.2, 6.0)
    assert config.kl_horizon == defaults.kl_horizon

    outcome = learning_task.run(str(tiny_model), config, tmp_path)

    assert outcome.gain >= 0.3, (outcome.base_score, outcome.trained_score)
    kls = [m["objective/kl"] for m in outcome.steps]
    second_half = kls[len(kls) // 2 :]
    mean_kl = sum(second_half) / len(second_half)
    # Held within a small factor of the target once the controller has had time (single steps are noisy).
    assert config.target_kl / 3 <= mean_kl <= 2 * config.target_kl, kls
    coefficients = [m["kl_coef"] for m in outcome.steps]
    assert max(abs(c - config.init_kl_coef) for c in coefficients) > 0.02, coefficients  # the controller acts


# --- GRPO and RLOO (TRL's trainers) on the same task ---------------------------------------------------------

# Mean KL per answer token of a trained policy to its base (nats), measured on held-out prompts. Measured at
# these settings: GRPO 0.71 (beta 0: nothing holds it), RLOO 0.32 (TRL's own kl at most 0.97 in a step).
KL_PER_TOKEN_BOUND = 1.5


def group_run(algorithm: str, base_model: str, config, work):
    """learning_task.run with TRL's GRPO or RLOO instead of PPO: the same prompts, reward model and rater.
    Returns (base score, trained score, per-step metrics, per-token KL of the trained policy to the base)."""
    from rlhf.sdk import rater
    from rlhf.training import corpus
    from rlhf.training.reward_training import Rating, train_reward_model
    from rlhf.training.scoring import reward_function
    from rlhf.training.trl_trainers import GroupPolicyTrainer

    questions = list(corpus.QUESTIONS)
    train_prompts, held_out = questions[:12], questions[12:16]
    sampled = learning_task.answers(base_model, train_prompts, 16, 32, seed=1)
    rated = [Rating(prompt, text, rater.rate(text)) for prompt, text in sampled if text.strip()]
    reward = train_reward_model(rated, learning_task.REWARD_CONFIG, base_model, work / "reward")
    trainer = GroupPolicyTrainer(algorithm, config, base_model, work / "trl", "cpu")
    steps: list[dict] = []
    trainer.train(train_prompts, reward_function(reward["model_path"], "cpu"), lambda step, m: steps.append(m))
    trainer.save(work / "policy")
    trained = str(work / "policy" / "policy")
    base_score = learning_task.mean_rating(learning_task.answers(base_model, held_out, 16, 32, seed=7))
    trained_score = learning_task.mean_rating(learning_task.answers(trained, held_out, 16, 32, seed=7))
    return base_score, trained_score, steps, token_kl(trained, base_model, held_out)


def token_kl(policy_path: str, base_path: str, prompts: list[str], samples: int = 16, max_new_tokens: int = 32):
    """Mean per-token KL(policy || base) over answers the policy samples (full softmax) to `prompts`:
    sum over answers of log p_policy - log p_base, divided by their tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.training import sequences
    from rlhf.training.modeling import load_model, load_tokenizer

    tokenizer = load_tokenizer(policy_path, padding_side="left")
    policy = load_model(AutoModelForCausalLM, policy_path).eval()
    base = load_model(AutoModelForCausalLM, base_path).eval()
    eos = sequences.eos_token_ids(policy, tokenizer)
    generator = torch.Generator().manual_seed(11)
    total = tokens = 0.0
    with torch.no_grad():
        for prompt in prompts:
            ids = [sequences.encode_prompt(tokenizer, prompt)] * samples
            drawn = sequences.sample(policy, ids, max_new_tokens, 1.0, eos, tokenizer.pad_token_id, generator)
            full = torch.cat([drawn.query, drawn.response], 1)
            mask = torch.cat([drawn.query_mask, drawn.mask.long()], 1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            width = drawn.response.shape[1]

            def logprobs(model, full=full, mask=mask, positions=positions, width=width, drawn=drawn):
                logits = model(input_ids=full, attention_mask=mask, position_ids=positions).logits
                logits = logits[:, -width - 1 : -1].float().log_softmax(-1)
                return logits.gather(-1, drawn.response.unsqueeze(-1)).squeeze(-1)

            total += ((logprobs(policy) - logprobs(base)) * drawn.mask).sum().item()
            tokens += drawn.mask.sum().item()
    return total / tokens


@pytest.mark.parametrize(
    "algorithm, learning_rate, max_steps",
    [("grpo", 3e-3, 20), ("rloo", 3e-3, 30)],
)
def test_grpo_and_rloo_on_lora_defaults_raise_the_held_out_rater_score_with_kl_bounded(
    tiny_model, tmp_path, algorithm, learning_rate, max_steps
):
    from rlhf.training.config import GROUP_CONFIGS

    cls = GROUP_CONFIGS[algorithm]
    config = cls(learning_rate=learning_rate, max_steps=max_steps)
    defaults = cls()
    # The seed's LoRA and batch defaults, TRL's own for the algorithm: only lr and steps changed.
    assert (config.use_lora, config.lora_r, config.lora_alpha, config.lora_dropout) == (True, 8, 32, 0.1)
    assert (config.batch_size, config.max_new_tokens, config.temperature) == (8, 128, 1.0)
    assert dataclasses.replace(config, learning_rate=defaults.learning_rate, max_steps=defaults.max_steps) == defaults
    assert (config.num_generations, config.beta) == ((8, 0.0) if algorithm == "grpo" else (2, 0.05))

    base_score, trained_score, steps, kl = group_run(algorithm, str(tiny_model), config, tmp_path)

    assert trained_score - base_score >= 0.3, (base_score, trained_score)
    assert len(steps) == max_steps and all("reward" in m for m in steps)
    # Bounded: the trained policy's answers stay within KL_PER_TOKEN_BOUND nats per token of the base model's
    # distribution (the gain is not bought by collapsing onto a few answers the base model would never write).
    assert 0.0 < kl < KL_PER_TOKEN_BOUND, kl
    if algorithm == "rloo":  # TRL's own KL (beta 0.05) stays small throughout
        assert max(m["kl"] for m in steps) < KL_PER_TOKEN_BOUND, [m["kl"] for m in steps]
