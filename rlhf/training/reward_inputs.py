"""How the reward service turns (prompt, response) into model inputs, and loads a reward model."""

from __future__ import annotations

import json
import pathlib

NORMALIZATION_FILE = "normalization.json"


def join(prompt: str, response: str) -> str:
    """The one text a reward model reads for a pair (training and scoring must agree)."""
    return f"{prompt.rstrip()} {response.lstrip()}"


def encode(tokenizer, texts: list[str], max_length: int):
    """Right-padded batch, truncated from the left so the response's end (what is judged) is kept."""
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def read_normalization(model_path: str) -> dict:
    path = pathlib.Path(model_path) / NORMALIZATION_FILE
    return json.loads(path.read_text()) if path.exists() else {"kind": "comparison", "mean": 0.0, "std": 1.0}


def to_rating(score: float, normalization: dict) -> float:
    """A model output on the 0..1 rating scale: de-normalised for rating-trained models, else a sigmoid."""
    import math

    if normalization.get("kind") == "rating":
        return min(1.0, max(0.0, score * normalization["std"] + normalization["mean"]))
    return 1.0 / (1.0 + math.exp(-score))
