"""The seed's RewardModel: a trained reward model in memory (sequence classifier with one scalar head, its
tokenizer and normalisation), with the seed's `forward(input_ids, attention_mask) -> rewards` and
`save_pretrained`. Subclass it and override `forward` to transform rewards (the seed's custom reward
functions); the library's scoring then calls that forward, so RLHFTrainer optimises the transformed reward.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rlhf.training.reward_functions import RewardCombination
from rlhf.training.reward_inputs import CONFIG_FILE, NORMALIZATION_FILE
from rlhf.training.scoring import (
    LoadedRewardModel,
    Scorer,
    Scores,
    apply_reward_functions,
    fill_unscorable,
    load_reward_model,
)

# Files of a reward-model folder besides the weights and tokenizer, kept through load and save.
SIDE_FILES = (CONFIG_FILE, "loss_history.json")


class RewardModel(nn.Module):
    """A reward model as train_reward_model saves it: `forward` gives one reward per row (the model's score,
    in the units it was trained to: normalised ratings or Bradley-Terry logits)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        normalization: dict | None = None,
        max_length: int = 512,
        side_files: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.normalization = normalization or {"kind": "comparison", "mean": 0.0, "std": 1.0}
        self.max_length = max_length
        self.side_files = dict(side_files or {})

    @classmethod
    def from_pretrained(cls, path: str | pathlib.Path, device: str = "cpu") -> RewardModel:
        """Load a folder saved by train_reward_model, the reward service or save_pretrained."""
        folder = pathlib.Path(path)
        loaded = load_reward_model(str(folder), device)
        side = {name: (folder / name).read_text() for name in SIDE_FILES if (folder / name).is_file()}
        return cls(loaded.model, loaded.tokenizer, loaded.normalization, loaded.max_length, side)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()

    def save_pretrained(self, path: str | pathlib.Path) -> pathlib.Path:
        """A folder loadable by AutoModelForSequenceClassification, this class, RLHFTrainer's
        reward_model_path and the reward service's scorer (weights, tokenizer, normalisation)."""
        folder = pathlib.Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        (folder / NORMALIZATION_FILE).write_text(json.dumps(self.normalization))
        for name, text in self.side_files.items():
            (folder / name).write_text(text)
        return folder

    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    @property
    def transforms_rewards(self) -> bool:
        """True for a subclass whose forward is its own: its rewards are not on the 0..1 feedback scale."""
        return type(self).forward is not RewardModel.forward

    def reward_fn(
        self, combination: RewardCombination | None = None, micro_batch: int = 64
    ) -> Callable[[list[str], list[str]], Scores]:
        """`(prompts, responses) -> Scores` for the trainers: this model's forward (a subclass's included)
        through the library's scorer, then the reward functions of `combination` when given. Ratings (the
        0..1 feedback scale) come along unless a subclass transforms the rewards."""
        self.eval()
        loaded = LoadedRewardModel(
            self.tokenizer,
            self.model,
            self.normalization,
            self.device,
            self.max_length,
            forward=lambda enc: self(enc["input_ids"], enc["attention_mask"]),
        )
        scorer = Scorer(self.device, micro_batch, cache_size=1)

        def score(prompts: list[str], responses: list[str]) -> Scores:
            pairs = list(zip(prompts, responses, strict=True))
            scored = scorer.score(loaded, pairs)
            if combination:
                scored = apply_reward_functions(combination, pairs, scored)
            ratings = None if self.transforms_rewards else fill_unscorable([s.rating if s.ok else None for s in scored])
            return Scores(fill_unscorable([s.score if s.ok else None for s in scored]), ratings)

        return score

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Rewards of (prompt, response) pairs through forward (an unscorable, empty one: the lowest)."""
        return self.reward_fn()(list(prompts), list(responses)).scores
