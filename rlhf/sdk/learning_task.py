"""The demo's learning task in-process, with no server: the base policy answers training prompts, the
simulated rater rates them, a reward model learns the ratings, PPO trains the policy against it, and the
rater compares base and trained answers on held-out prompts. Tests and scripts/learning_check.py use it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import torch

from rlhf.sdk import rater
from rlhf.training import corpus, sequences
from rlhf.training.config import RewardModelConfig, TrainingConfig
from rlhf.training.modeling import load_model, load_tokenizer
from rlhf.training.ppo_trainer import PPOTrainer
from rlhf.training.reward_training import Rating, train_reward_model
from rlhf.training.scoring import reward_function

# The reward model every run of the task uses (full fine-tuning: a few seconds on the tiny model).
REWARD_CONFIG = RewardModelConfig(
    use_lora=False, learning_rate=5e-4, num_epochs=6, batch_size=16, validation_fraction=0.15
)


@dataclasses.dataclass
class Outcome:
    base_score: float  # the rater's mean score of base answers to held-out prompts
    trained_score: float  # the same for the trained policy
    steps: list[dict]  # PPO metrics per step
    reward_metrics: dict  # the reward model's validation metrics
    seconds: float

    @property
    def gain(self) -> float:
        return self.trained_score - self.base_score


def answers(
    model_path: str, prompts: list[str], samples: int, max_new_tokens: int, seed: int, device: str = "cpu"
) -> list[tuple]:
    """(prompt, text) pairs sampled from the model at `model_path` (full softmax, temperature 1) on `device`
    (fp32; the sampling generator lives on `device`, so a seed's draws differ between devices)."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_path, padding_side="left")
    model = load_model(AutoModelForCausalLM, model_path).to(device).eval()
    eos = sequences.eos_token_ids(model, tokenizer)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = [sequences.encode_prompt(tokenizer, prompt)] * samples
        drawn = sequences.sample(model, ids, max_new_tokens, 1.0, eos, tokenizer.pad_token_id, generator)
        for row, mask in zip(drawn.response, drawn.mask, strict=True):
            tokens = [int(t) for t in row[mask.bool()] if int(t) not in eos]
            out.append((prompt, tokenizer.decode(tokens, skip_special_tokens=True)))
    return out


def mean_rating(pairs: list[tuple]) -> float:
    return sum(rater.rate(text) for _, text in pairs) / len(pairs)


def run(
    base_model: str, config: TrainingConfig, work: pathlib.Path, eval_tokens: int = 32, device: str = "cpu"
) -> Outcome:
    """Run the task with the policy trained by `config` from `base_model` (a folder); files go to `work`.
    `device` runs the policy, the reward model and the evaluation (config.mixed_precision applies on GPUs)."""
    started = time.monotonic()
    questions = list(corpus.QUESTIONS)
    train_prompts, held_out = questions[:12], questions[12:16]
    sampled = answers(base_model, train_prompts, 16, eval_tokens, seed=1, device=device)
    rated = [Rating(prompt, text, rater.rate(text)) for prompt, text in sampled if text.strip()]
    reward_config = dataclasses.replace(REWARD_CONFIG, device=device, mixed_precision=config.mixed_precision)
    reward = train_reward_model(rated, reward_config, base_model, work / "reward")
    trainer = PPOTrainer(config, base_model, device)
    steps: list[dict] = []
    trainer.train(train_prompts, reward_function(reward["model_path"], device), lambda step, m: steps.append(m))
    trainer.save(work / "policy")
    base_score = mean_rating(answers(base_model, held_out, 16, eval_tokens, seed=7, device=device))
    trained = str(work / "policy" / "policy")
    trained_score = mean_rating(answers(trained, held_out, 16, eval_tokens, seed=7, device=device))
    return Outcome(base_score, trained_score, steps, reward["metrics"], time.monotonic() - started)
