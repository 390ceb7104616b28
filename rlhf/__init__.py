"""The RLHF platform: contracts, services' runtime, client SDK, the `rlhf` CLI, and the seed's Python library.

`from rlhf import TrainingConfig, RewardModelConfig, train_reward_model, RLHFTrainer, TrainingResult,
FeedbackDataset, PPODataset, RewardModel` runs training in-process, no server needed. The names load on first
use (module __getattr__): `import rlhf` alone, as the client-only install does, never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# The seed's library names and the module each lives in.
_LAZY = {
    "TrainingConfig": "rlhf.training.config",
    "RewardModelConfig": "rlhf.training.config",
    "TrainingResult": "rlhf.training.version_folder",
    "train_reward_model": "rlhf.training.seed_api",
    "RLHFTrainer": "rlhf.training.seed_api",
    "FeedbackDataset": "rlhf.training.seed_api",
    "PPODataset": "rlhf.training.seed_api",
    "RewardModel": "rlhf.training.reward_model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise ImportError(
            f"rlhf.{name} needs the training stack (torch, transformers): install the server extra, "
            f"e.g. pip install 'rlhf-platform[server]' ({error})"
        ) from error
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
