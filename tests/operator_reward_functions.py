"""Reward functions an operator registers with the reward service in the tests (RLHF_REWARD_FUNCTIONS-style
import paths). The reward service runs in the test process, so CALLS records what it called them with."""

from __future__ import annotations

CALLS: list[dict] = []


def sea_bonus(prompts: list[str], responses: list[str], scores: list[float], bonus: float = 1.0) -> list[float]:
    """The reward model's score, plus `bonus` for a response that mentions the sea."""
    CALLS.append({"prompts": list(prompts), "responses": list(responses), "scores": list(scores), "bonus": bonus})
    return [s + (bonus if "sea" in r else 0.0) for s, r in zip(scores, responses, strict=True)]


def wrong_length(prompts: list[str], responses: list[str], scores: list[float]) -> list[float]:
    """A faulty function: one value for a whole batch."""
    return [1.0]
