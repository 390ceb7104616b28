"""The maths of PPO for language models, as pure tensor functions ("The N Implementation Details of RLHF
with PPO"): per-token KL penalty plus the score on the last token, GAE, whitening, clipped losses, and
the adaptive KL controller. Shapes are (batch, response_length) with a 0/1 mask of real response tokens.
"""

from __future__ import annotations

import dataclasses

import torch


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, count: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over `dim`, or all); `count`: mask.sum().clamp(min=1) when the caller
    has it already (the losses take several means under one mask)."""
    if dim is None:
        return (values * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over masked entries; with shift_mean=False the mean is added back."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (mask is 1 on a prefix of each row)."""
    return (mask.sum(1).long() - 1).clamp(min=0)


def token_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (logp - ref_logp) on every token, plus the score on the last one.

    Returns (rewards, kl) where kl is the per-token log-ratio (masked)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    Values past the last real token count as 0 (the episode ends there), and the sum restarts after every
    masked token. When each row's mask is a prefix (responses, which end at their first EOS) the sums are one
    matrix product with the discounts (gamma * lam)^(k - t), instead of a Python loop over the positions
    (~6 operations each: 0.7 ms of a tiny-model PPO step at 32 new tokens)."""
    values = values * mask
    length = rewards.shape[1]
    if bool((mask.cumprod(1) == mask).all()):
        next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
        deltas = (rewards + gamma * next_values - values) * mask
        steps = torch.arange(length, device=rewards.device)
        power = steps[:, None] - steps[None, :]  # k - t at [k, t]
        discounts = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0).double(), 0.0)
        advantages = deltas @ discounts.to(deltas.dtype)
        returns = advantages + values
        return advantages * mask, returns * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], device=rewards.device, dtype=rewards.dtype)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]
        advantages[:, t] = last
    returns = advantages + values
    return advantages * mask, returns * mask


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (to minimise), with clip fraction, approximate KL and the mean ratio (no
    gradient)."""
    count = mask.sum().clamp(min=1)
    log_ratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask, count=count)
    with torch.no_grad():  # the three means in one pass (each op costs more than its arithmetic here)
        terms = torch.stack([(clipped > unclipped).to(ratio.dtype), log_ratio**2, ratio])
        clipfrac, squared, mean_ratio = ((terms * mask).flatten(1).sum(1) / count).unbind()
        stats = {"clipfrac": clipfrac, "approxkl": 0.5 * squared, "ratio": mean_ratio}
    return loss, stats


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within cliprange of the old value."""
    count = mask.sum().clamp(min=1)
    clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (new_values - returns) ** 2
    clipped_error = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask, count=count)
    with torch.no_grad():
        terms = torch.stack([(clipped_error > unclipped_error).to(unclipped_error.dtype), unclipped_error])
        clipfrac, error = ((terms * mask).flatten(1).sum(1) / count).unbind()
        stats = {"clipfrac": clipfrac, "error": error}
    return loss, stats


def gather_logprobs(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) from a log-softmax over the vocabulary (batch, length, vocab)."""
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


# Largest number of log-probabilities entropy_from_logprobs turns into probabilities at once (16 MB of fp32:
# ~16 positions of 4 rows of GPT-2's 50,257 ids, as the fixed chunk of 16 positions before).
ENTROPY_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def entropy_from_logprobs(logp: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Per-position entropy from a log-softmax, `chunk` positions at a time (default: as many as keep a chunk
    within ENTROPY_CHUNK_ELEMENTS): the whole batch's probabilities and their products (two more
    vocabulary-wide tensors, 100 MB each for GPT-2 at the seed's settings) never exist at once, and a small
    model's few positions take one chunk. No gradient: it is a metric."""
    if chunk is None:
        per_position = logp.shape[0] * logp.shape[-1]
        chunk = max(1, ENTROPY_CHUNK_ELEMENTS // max(per_position, 1))
    if chunk >= logp.shape[1]:
        return -(logp.exp() * logp).sum(-1)
    return torch.cat([-(part.exp() * part).sum(-1) for part in logp.split(chunk, dim=1)], dim=1)


@dataclasses.dataclass
class AdaptiveKLController:
    """Ziegler et al.'s controller: move the KL coefficient so the measured KL tracks `target`.

    horizon == 0 keeps the coefficient fixed."""

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.horizon <= 0 or self.target <= 0:
            return
        proportional_error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
