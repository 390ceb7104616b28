"""PPO maths against values computed by hand."""

import math

import pytest
import torch

from rlhf.training import ppo, sequences


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    gamma, lam = 0.9, 0.8
    # deltas: d2 = 1 - 0.7 = 0.3 (episode ends); d1 = 0 + 0.9*0.7 - 0.6 = 0.03; d0 = 0 + 0.9*0.6 - 0.5 = 0.04
    a2 = 0.3
    a1 = 0.03 + 0.9 * 0.8 * a2
    a0 = 0.04 + 0.9 * 0.8 * a1
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2], abs=1e-6)
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.6, a2 + 0.7], abs=1e-6)


def test_gae_ignores_tokens_after_the_end():
    rewards = torch.tensor([[0.0, 2.0, 9.0]])
    values = torch.tensor([[1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # The masked third token's value and reward must not leak into the second token.
    assert advantages[0].tolist() == pytest.approx([2.0 - 1.0, 2.0 - 1.0, 0.0])
    assert returns[0, 2].item() == 0.0


def test_whiten_has_zero_mean_unit_variance_on_masked_entries():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = ppo.whiten(values, mask)
    # mean 2, unbiased std 1 -> [-1, 0, 1]; the masked entry is zeroed
    assert out[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)


def test_token_rewards_put_the_score_on_the_last_real_token():
    scores = torch.tensor([2.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, kl = ppo.token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    assert kl[0].tolist() == pytest.approx([0.5, 0.0, -1.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.0, 0.1 + 2.0])
    assert rewards[1].tolist() == pytest.approx([-1.0, 0.0, 0.0])


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(0.5)]])
    advantages = torch.tensor([[1.0, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = ppo.policy_loss(new, old, advantages, mask, cliprange=0.2)
    # token 0: max(-1*1.5, -1*1.2) = -1.2 (clipped); token 1: max(1*0.5, 1*0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2
    assert stats["approxkl"].item() == pytest.approx(expected_kl)


def test_value_loss_takes_the_larger_of_clipped_and_unclipped_error():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    loss, stats = ppo.value_loss(new, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: unclipped error 0, clipped value 0.2 -> error 0.64; token 1: both 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_response_mask_keeps_the_first_eos_and_drops_the_rest():
    tokens = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 5, 5, 5, 5]])
    mask = sequences.response_mask(tokens, {2})
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_a_sampled_pad_token_is_part_of_the_response_and_any_eos_id_ends_it():
    # pad (0) differs from the EOS ids (2 and 3, as a generation config's list): a pad sampled mid-response
    # used to leave a hole in the mask, so the score landed on the wrong token.
    pad = 0
    tokens = torch.tensor([[5, pad, 6, 3, pad], [5, 6, pad, pad, pad], [pad, 2, pad, pad, pad]])
    mask = sequences.response_mask(tokens, {2, 3})
    assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert ppo.last_token_index(mask).tolist() == [3, 4, 1]


def test_adaptive_kl_controller_moves_towards_the_target():
    ctl = ppo.AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    ctl = ppo.AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=4.5, n_steps=100)  # error -0.25 clipped to -0.2
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 100 / 10000))
    fixed = ppo.AdaptiveKLController(value=0.2, target=6.0, horizon=0)
    fixed.update(100.0, 100)
    assert fixed.value == 0.2


def test_entropy_of_uniform_logits_is_log_vocab():
    logits = torch.zeros(1, 1, 8)
    assert ppo.entropy_from_logprobs(torch.log_softmax(logits, -1)).item() == pytest.approx(math.log(8))
    # Computed in chunks of positions: the same per position as all at once.
    logp = torch.log_softmax(torch.randn(2, 37, 11, generator=torch.Generator().manual_seed(0)), -1)
    whole = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(ppo.entropy_from_logprobs(logp, chunk=5), whole)


def test_the_default_kl_controller_reacts_within_tens_of_steps_at_the_default_batch():
    # With TRL's horizon of 10000 and 8 prompts a step, 16x the target for 1,000 steps only moved the
    # coefficient from 0.2 to 0.235.
    from rlhf.training.config import TrainingConfig

    c = TrainingConfig()
    ctl = ppo.AdaptiveKLController(c.init_kl_coef, c.target_kl, c.kl_horizon)
    for _ in range(100):
        ctl.update(16 * c.target_kl, c.batch_size)
    assert ctl.value > 4 * c.init_kl_coef
    for _ in range(200):
        ctl.update(0.0, c.batch_size)
    assert ctl.value < c.init_kl_coef


def gae_by_recursion(rewards, values, mask, gamma, lam):
    """GAE as the textbook recursion writes it, position by position (the reference for ppo.gae)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        last = (rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
@pytest.mark.parametrize("holes", [False, True], ids=["prefix-masks", "masks-with-holes"])
def test_gae_equals_the_recursion_on_response_masks_and_masks_with_holes(gamma, lam, holes):
    generator = torch.Generator().manual_seed(3)
    rows, length = 6, 40
    rewards = torch.randn((rows, length), generator=generator)
    values = torch.randn((rows, length), generator=generator)
    ends = torch.tensor([1, 5, 17, 39, 40, 23])
    mask = (torch.arange(length)[None, :] < ends[:, None]).float()
    if holes:
        mask[2, 3] = 0.0
        mask[4, 10:12] = 0.0
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = gae_by_recursion(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, expected_advantages, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns, expected_returns, atol=1e-5, rtol=1e-5)


def test_entropy_takes_a_small_models_positions_in_one_chunk_and_a_large_vocabularys_in_several():
    small = torch.log_softmax(torch.randn(4, 33, 631, generator=torch.Generator().manual_seed(1)), -1)
    large = torch.log_softmax(torch.randn(4, 40, 50257, generator=torch.Generator().manual_seed(2)), -1)
    for logp in (small, large):
        torch.testing.assert_close(ppo.entropy_from_logprobs(logp), -(logp.exp() * logp).sum(-1))
    assert ppo.ENTROPY_CHUNK_ELEMENTS // (4 * 631) >= 33 > ppo.ENTROPY_CHUNK_ELEMENTS // (4 * 50257)
