"""Dry-run time estimates: a per-token cost, calibrated from runs this server has measured.

A PPO step costs about batch_size * max_new_tokens * (1 generation pass + 2 scoring passes + ppo_epochs
training passes, a training pass counted as 3 forward passes) token-passes. The cost of one token-pass is
taken from the most recent finished run of the same base model and LoRA setting on this server; with no
such run, from a constant measured on a 2-core CPU with the tiny model, scaled by parameter count.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from rlhf.training.config import TrainingConfig
from rlhf.training.modeling import TINY_MODEL

# Seconds per token-pass measured for the tiny model (309k parameters) on a 2-core CPU.
TINY_SECONDS_PER_TOKEN_PASS = 5.9e-5
TINY_PARAMETERS = 309_024


@dataclasses.dataclass
class Estimate:
    steps: int
    minutes: float
    basis: str


def token_passes(config: TrainingConfig) -> float:
    return config.batch_size * config.max_new_tokens * (1 + 2 + 3 * config.ppo_epochs)


def parameter_count(model_path: str) -> int | None:
    config_file = pathlib.Path(model_path) / "config.json"
    if not config_file.exists():
        return None
    cfg = json.loads(config_file.read_text())
    width = cfg.get("n_embd") or cfg.get("hidden_size")
    layers = cfg.get("n_layer") or cfg.get("num_hidden_layers")
    vocab = cfg.get("vocab_size", 0)
    if not width or not layers:
        return None
    return 12 * layers * width * width + vocab * width


def estimate(config: TrainingConfig, history: list[dict]) -> Estimate:
    """`history`: results of finished runs (config, training_seconds, training_steps), newest first."""
    for run in history:
        run_config = TrainingConfig(**run["config"])
        steps = run.get("timed_steps", run.get("training_steps", 0))
        if (run_config.base_model, run_config.use_lora) == (config.base_model, config.use_lora) and steps:
            per_pass = run["training_seconds"] / steps / token_passes(run_config)
            basis = f"measured: job {run['lineage']['job_id']} on this server"
            break
    else:
        params = (
            TINY_PARAMETERS if config.base_model == TINY_MODEL else parameter_count(config.base_model) or 124_000_000
        )
        per_pass = TINY_SECONDS_PER_TOKEN_PASS * max(1.0, params / TINY_PARAMETERS) ** 0.8
        basis = f"default cost model for {params:,} parameters on a 2-core CPU"
    seconds = config.max_steps * token_passes(config) * per_pass
    return Estimate(steps=config.max_steps, minutes=seconds / 60.0, basis=basis)
