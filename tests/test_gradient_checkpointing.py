"""Gradient checkpointing (TrainingConfig.gradient_checkpointing) on the tiny model: a PPO step recomputes
activations and computes the same losses and update as without it, with LoRA and with full fine-tuning."""

from __future__ import annotations

import pytest
import torch

from rlhf.training.config import GRPOTrainingConfig, TrainingConfig
from rlhf.training.ppo_trainer import PPOTrainer

pytestmark = pytest.mark.slow

PROMPTS = ["Where did you go today?", "Tell me something nice.", "What did you see?", "How was the sea?"]


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [min(len(r), 40) / 40 for r in responses]


def trained(tiny_model, use_lora: bool, checkpointing: bool) -> tuple[PPOTrainer, dict, dict]:
    config = TrainingConfig(
        use_lora=use_lora,
        learning_rate=1e-3,
        batch_size=4,
        mini_batch_size=2,
        ppo_epochs=2,
        max_new_tokens=8,
        gradient_checkpointing=checkpointing,
    )
    trainer = PPOTrainer(config, str(tiny_model), "cpu")
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    metrics = trainer.step_on(PROMPTS, length_reward)
    return trainer, before, metrics


def checkpointed_modules(trainer: PPOTrainer) -> int:
    return sum(1 for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", False))


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_a_step_with_gradient_checkpointing_gives_the_losses_and_update_of_one_without(tiny_model, use_lora):
    plain, _, expected = trained(tiny_model, use_lora, checkpointing=False)
    checkpointed, before, got = trained(tiny_model, use_lora, checkpointing=True)

    assert checkpointed_modules(plain) == 0 and checkpointed_modules(checkpointed) > 0
    # The same rollout (sampling runs without checkpointing, in eval mode, with its KV cache)...
    assert got["objective/scores"] == expected["objective/scores"]
    assert got["response_length"] == expected["response_length"]
    # ...and the same losses and weights after two epochs of updates, up to float rounding.
    for name in ("loss/policy_avg", "loss/value_avg", "objective/entropy", "policy/approxkl_avg"):
        assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    weights = dict(plain.model.named_parameters())
    moved = 0
    for name, value in checkpointed.model.named_parameters():
        if value.requires_grad:
            torch.testing.assert_close(value, weights[name], rtol=1e-4, atol=1e-6)
            moved += int(not torch.equal(value, before[name]))
    # Every trainable tensor got a gradient through the recomputed blocks (LoRA's B starts at 0 and moved).
    assert moved == len(before), (moved, len(before))


def test_a_grpo_step_runs_with_gradient_checkpointing_through_trl(tiny_model, tmp_path):
    from rlhf.training.trl_trainers import GroupPolicyTrainer

    config = GRPOTrainingConfig(
        learning_rate=1e-3, batch_size=2, num_generations=2, max_new_tokens=8, max_steps=1, gradient_checkpointing=True
    )
    trainer = GroupPolicyTrainer("grpo", config, str(tiny_model), tmp_path / "trl", "cpu")
    steps: list[dict] = []
    trainer.train(PROMPTS, length_reward, lambda step, metrics: steps.append(metrics))
    assert len(steps) == 1 and trainer.step == 1
    assert trainer.trainer.args.gradient_checkpointing is True
    assert trainer.trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.trainer.model.modules())


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_reward_model_training_with_checkpointing_learns_the_same(tiny_model, tmp_path, use_lora):
    from rlhf.sdk import learning_task
    from rlhf.training.config import RewardModelConfig
    from rlhf.training.reward_training import Rating, prepare_model, train_reward_model

    rated = [Rating(f"question {i}", "yes " * (i % 7 + 1), (i % 7) / 6) for i in range(40)]
    results = {}
    for checkpointing in (False, True):
        config = RewardModelConfig(
            use_lora=use_lora, learning_rate=5e-4, num_epochs=2, batch_size=8, gradient_checkpointing=checkpointing
        )
        if checkpointing:  # the option reaches the model
            model = prepare_model(config, str(tiny_model), learning_task.load_tokenizer(str(tiny_model), "right"))
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        results[checkpointing] = train_reward_model(rated, config, str(tiny_model), tmp_path / str(checkpointing))
    plain, recomputed = results[False]["metrics"], results[True]["metrics"]
    assert recomputed["validation_loss"] == pytest.approx(plain["validation_loss"], rel=1e-4, abs=1e-6)
    assert recomputed["pearson"] == pytest.approx(plain["pearson"], rel=1e-4, abs=1e-6)
