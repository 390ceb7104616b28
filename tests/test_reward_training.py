"""Reward-model training and scoring in-process: the defects a review found, each pinned by a test."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from rlhf.runtime.errors import InvalidArgument
from rlhf.sdk import rater
from rlhf.training import corpus
from rlhf.training.config import RewardModelConfig
from rlhf.training.errors import TrainingError
from rlhf.training.modeling import load_tokenizer
from rlhf.training.reward_training import (
    Comparison,
    Examples,
    Rating,
    evaluate,
    prepare_model,
    split,
    train_reward_model,
)
from rlhf.training.scoring import Scorer, load_reward_model

QUICK = dict(use_lora=False, num_epochs=1, batch_size=16, learning_rate=5e-4)


def ratings(count: int, seed: int = 0) -> list[Rating]:
    rng = random.Random(seed)
    topics = sorted(corpus.TOPICS)
    answers = [" ".join(corpus.sentence(rng, rng.choice(topics)) for _ in range(2)) for _ in range(count)]
    return [Rating(rng.choice(corpus.QUESTIONS), answer, rater.rate(answer)) for answer in answers]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reward") / "model"
    result = train_reward_model(ratings(40), RewardModelConfig(**QUICK), str(tiny_model), out)
    return out, result


@pytest.mark.slow
def test_scoring_reads_as_many_tokens_as_the_model_was_trained_with(trained):
    # The scorer used a hard-coded 512 tokens: beyond the tiny model's 256 positions ScoreBatch broke.
    folder, _ = trained
    loaded = load_reward_model(str(folder), "cpu")
    assert loaded.max_length == json.loads((folder / "reward_config.json").read_text())["max_length"] == 256
    long_answer = "The sea was calm and the boats came home. " * 25  # ~1,000 characters, > 256 tokens
    scored = Scorer("cpu", micro_batch=8, cache_size=1).score(loaded, [("Q?", long_answer), ("Q?", "The sea.")])
    assert all(s.ok and math.isfinite(s.score) for s in scored)


@pytest.mark.slow
def test_a_max_length_beyond_the_context_is_refused_up_front(tiny_model, tmp_path):
    # Up front: against the context the request's model check reads (tests/test_servicers.py: over the RPC).
    from rlhf.runtime import checks
    from rlhf.training.modelshape import describe_model

    with pytest.raises(InvalidArgument) as error:
        checks.within_context(1024, describe_model("rlhf-tiny", tmp_path).context, "config.max_length")
    assert error.value.field == "config.max_length" and "256" in error.value.description
    # And the library itself, for callers that skip the service.
    with pytest.raises(TrainingError, match="context of 256"):
        train_reward_model(ratings(12), RewardModelConfig(**QUICK, max_length=1024), str(tiny_model), tmp_path / "m")


@pytest.mark.slow
def test_normalisation_comes_from_the_training_split_only(trained, tiny_model):
    _, result = trained
    config = RewardModelConfig(**QUICK)
    examples = Examples.of(ratings(40), load_tokenizer(str(tiny_model), padding_side="right"))
    train, held_out = split(examples.ratings, config.validation_fraction, random.Random(config.seed))
    assert held_out, "the test needs a validation split"
    train_mean = sum(s for _, s in train) / len(train)
    all_mean = sum(s for _, s in examples.ratings) / len(examples.ratings)
    assert abs(train_mean - all_mean) > 1e-6  # the two differ, so the test tells them apart
    assert result["normalization"]["mean"] == pytest.approx(train_mean)


def test_validation_bradley_terry_loss_counts_the_margin_and_runs_in_batches():
    seen: list[int] = []

    def forward(texts: list[str]) -> torch.Tensor:
        seen.append(len(texts))
        return torch.tensor([2.0 if t.startswith("good") else 1.0 for t in texts])

    comparisons = [("good answer", "bad answer", 1.0)] * 10  # chosen - rejected = 1 = margin
    metrics = evaluate(torch.nn.Linear(1, 1), forward, [], comparisons, {"kind": "comparison"}, batch_size=4)
    assert metrics["validation_loss"] == pytest.approx(math.log(2))  # -log sigmoid(1 - 1 - 0)
    assert metrics["pairwise_accuracy"] == 1.0
    assert max(seen) <= 4  # never the whole validation set in one forward pass


@pytest.mark.slow
def test_early_stopping_keeps_the_best_epoch(tiny_model, tmp_path):
    # A learning rate this high makes validation loss worse after the first epoch.
    config = RewardModelConfig(
        use_lora=False, num_epochs=4, batch_size=8, learning_rate=0.05, early_stopping_patience=1, seed=1
    )
    result = train_reward_model(ratings(60, seed=3), config, str(tiny_model), tmp_path / "m")
    history = json.loads((tmp_path / "m" / "loss_history.json").read_text())["validation"]
    best = min(history)
    assert history.index(best) < len(history) - 1, history  # a later epoch was worse
    assert result["metrics"]["validation_loss"] == pytest.approx(best, rel=1e-4)
    assert result["metrics"]["best_epoch"] == history.index(best) + 1


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_the_base_models_dropout_is_off_and_only_loras_own_stays(tiny_model, use_lora):
    tokenizer = load_tokenizer(str(tiny_model), padding_side="right")
    model = prepare_model(RewardModelConfig(use_lora=use_lora, lora_dropout=0.1), str(tiny_model), tokenizer)
    active = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert all("lora_dropout" in name for name in active), active
    assert bool(active) == use_lora


def test_comparison_examples_keep_their_margin(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model), padding_side="right")
    examples = Examples.of([Comparison("Q?", "yes", "no", 0.5), Rating("Q?", "maybe", 0.3)], tokenizer)
    assert examples.comparisons == [("Q? yes", "Q? no", 0.5)] and examples.ratings == [("Q? maybe", 0.3)]
