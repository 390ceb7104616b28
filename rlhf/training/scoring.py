"""Batch scoring with loaded reward models: sorted by length to cut padding, micro-batched, deadline-aware."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from rlhf.training import fast_decode
from rlhf.training.errors import DeadlinePassed
from rlhf.training.modelcache import ModelCache
from rlhf.training.reward_functions import RewardCombination
from rlhf.training.reward_inputs import encode, pair_text, read_normalization, to_rating, trained_max_length
from rlhf.training.sequences import context_length


@dataclasses.dataclass
class LoadedRewardModel:
    tokenizer: object
    model: object
    normalization: dict
    device: str
    # Tokens read per pair: what the model was trained with, within its context (the end is kept).
    max_length: int
    # (encoded batch) -> one reward per row; None: the sequence classifier's logit. A RewardModel subclass
    # (the seed's custom reward form) puts its own forward here.
    forward: Callable[[Any], Any] | None = None
    # Intra-op CPU threads a scoring call uses (rlhf.training.threads.serving_threads; None: leave torch's).
    cpu_threads: int | None = None


@dataclasses.dataclass
class Scores:
    """What a reward function may return instead of a plain list of scores: the reward model's scores (what
    PPO optimises) and, where known, the same on the 0..1 feedback scale (what users read)."""

    scores: list[float]
    ratings: list[float] | None = None


@dataclasses.dataclass
class Scored:
    score: float = 0.0  # what RL optimises: the reward model's score, or the reward functions' sum of it
    rating: float = 0.0  # the reward model's score on the 0..1 feedback scale
    ok: bool = True
    error: str = ""
    model_score: float = 0.0  # the reward model's own score (before reward functions)


def load_reward_model(model_path: str, device: str) -> LoadedRewardModel:
    from transformers import AutoModelForSequenceClassification

    from rlhf.training.modeling import fuse_activations, load_model, load_tokenizer, pick_device
    from rlhf.training.threads import serving_threads

    device = pick_device(device)
    tokenizer = load_tokenizer(model_path, padding_side="right")
    model = load_model(AutoModelForSequenceClassification, model_path).to(device).eval()
    fuse_activations(model)  # GPT-2's GELU as one kernel instead of seven (the same formula)
    max_length = trained_max_length(model_path, context_length(model))
    normalization = read_normalization(model_path)
    threads = serving_threads(model, device)
    return LoadedRewardModel(tokenizer, model, normalization, device, max_length, cpu_threads=threads)


class Scorer:
    def __init__(self, device: str, micro_batch: int, cache_size: int) -> None:
        self.micro_batch = micro_batch
        self.cache: ModelCache[LoadedRewardModel] = ModelCache(
            lambda path: load_reward_model(path, device), capacity=cache_size
        )

    def score(
        self, loaded: LoadedRewardModel, pairs: list[tuple[str, str]], deadline: float | None = None
    ) -> list[Scored]:
        """Blocking: one Scored per pair, in order; empty texts are reported per item."""
        import torch

        from rlhf.training.threads import run_here_with

        results = [Scored() for _ in pairs]
        texts: list[tuple[int, str]] = []
        for index, (prompt, response) in enumerate(pairs):
            if not response.strip():
                results[index] = Scored(ok=False, error="response is empty")
            elif not prompt.strip():
                results[index] = Scored(ok=False, error="prompt is empty")
            else:
                texts.append((index, pair_text(loaded.tokenizer, prompt, response)))
        texts.sort(key=lambda item: len(item[1]))  # similar lengths share a batch: less padding
        run_here_with(loaded.cpu_threads)  # scoring runs in a pool thread (rlhf.training.threads)
        with torch.inference_mode():
            for start in range(0, len(texts), self.micro_batch):
                if deadline is not None and time.monotonic() > deadline:
                    raise DeadlinePassed(f"scoring stopped at item {start} of {len(texts)}: deadline passed")
                chunk = texts[start : start + self.micro_batch]
                enc = encode(loaded.tokenizer, [t for _, t in chunk], loaded.max_length).to(loaded.device)
                if loaded.forward is not None:
                    values = loaded.forward(enc).float().reshape(-1).tolist()
                else:
                    # GPT-2 reward models without transformers' per-call overhead (~3x faster on the tiny one).
                    logits = fast_decode.sequence_classification_logits(loaded.model, dict(enc))
                    if logits is None:
                        logits = loaded.model(**enc).logits
                    values = logits.squeeze(-1).float().tolist()
                for (index, _), value in zip(chunk, values, strict=False):
                    results[index] = Scored(
                        score=value, rating=to_rating(value, loaded.normalization), model_score=value
                    )
        return results


def apply_reward_functions(
    combination: RewardCombination, pairs: list[tuple[str, str]], scored: list[Scored]
) -> list[Scored]:
    """`scored` with each scorable item's score replaced by the combination of the reward model's scores
    (ratings and model_score stay the reward model's); unscorable items are left out of the functions' batch."""
    if not combination:
        return scored
    kept = [i for i, s in enumerate(scored) if s.ok]
    values = combination(
        [pairs[i][0] for i in kept], [pairs[i][1] for i in kept], [scored[i].model_score for i in kept]
    )
    out = list(scored)
    for i, value in zip(kept, values, strict=True):
        out[i] = dataclasses.replace(scored[i], score=value)
    return out


def fill_unscorable(scores: list[float | None]) -> list[float]:
    """Scores for PPO: an unscorable response (None, e.g. empty) gets the batch's lowest score, never a reward."""
    valid = [s for s in scores if s is not None]
    floor = min(valid) if valid else 0.0
    return [floor if s is None else s for s in scores]


def reward_function(model_path: str, device: str = "auto", micro_batch: int = 64):
    """In-process rewards for PPO with no reward service: `(prompts, responses) -> Scores` (the model's
    scores, and the same on the 0..1 feedback scale) from the reward model saved at `model_path` (by
    train_reward_model or the reward service's registry)."""

    loaded = load_reward_model(model_path, device)
    scorer = Scorer(device, micro_batch, cache_size=1)

    def score(prompts: list[str], responses: list[str]) -> Scores:
        scored = scorer.score(loaded, list(zip(prompts, responses, strict=True)))
        return Scores(
            fill_unscorable([s.score if s.ok else None for s in scored]),
            fill_unscorable([s.rating if s.ok else None for s in scored]),
        )

    return score
