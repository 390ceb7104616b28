"""How the reward service turns (prompt, response) into model inputs, and loads a reward model."""

from __future__ import annotations

import json
import pathlib

NORMALIZATION_FILE = "normalization.json"


CONFIG_FILE = "reward_config.json"
# Tokens a reward model reads when its folder does not say what it was trained with.
DEFAULT_MAX_LENGTH = 512


def join(prompt: str, response: str) -> str:
    """The text of a pair for a model without a chat template."""
    return f"{prompt.rstrip()} {response.lstrip()}"


def pair_text(tokenizer, prompt: str, response: str) -> str:
    """The one text a reward model reads for a pair (training and scoring agree): the conversation through
    the model's chat template when it has one (as rollouts and serving format the prompt), else join()."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
    return join(prompt, response)


def encode(tokenizer, texts: list[str], max_length: int):
    """Right-padded batch, truncated from the left so the response's end (what is judged) is kept. Special
    tokens come from the chat template where there is one, not twice."""
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return tokenizer(
        texts,
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        add_special_tokens=not getattr(tokenizer, "chat_template", None),
    )


def trained_max_length(model_path: str, context: int | None) -> int:
    """The length a saved reward model was trained to read (its reward_config.json), within its context."""
    path = pathlib.Path(model_path) / CONFIG_FILE
    length = json.loads(path.read_text()).get("max_length", DEFAULT_MAX_LENGTH) if path.exists() else DEFAULT_MAX_LENGTH
    return min(length, context) if context else length


def read_normalization(model_path: str) -> dict:
    path = pathlib.Path(model_path) / NORMALIZATION_FILE
    return json.loads(path.read_text()) if path.exists() else {"kind": "comparison", "mean": 0.0, "std": 1.0}


def to_rating(score: float, normalization: dict) -> float:
    """A model output on the 0..1 rating scale: de-normalised for rating-trained models, else a sigmoid."""
    import math

    if normalization.get("kind") == "rating":
        return min(1.0, max(0.0, score * normalization["std"] + normalization["mean"]))
    return 1.0 / (1.0 + math.exp(-score))
