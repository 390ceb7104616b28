"""PPO learns on the seed's LoRA defaults (only the learning rate and step count changed for the tiny model),
with the KL to the reference held near target_kl. In-process: rlhf.sdk.learning_task."""

from __future__ import annotations

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
