"""The seed's Python library, in-process and with no server: FeedbackDataset, PPODataset, train_reward_model
(the seed's signature), RLHFTrainer and TrainingResult, on the training library (reward_training, PPOTrainer,
scoring, version_folder). `from rlhf import ...` exports these names.

RLHFTrainer writes the version folder the policy service writes (policy/, value_head.pt, curves.png,
training_results.json, and reward_model/ when it trained one), into a temporary name renamed into place
when complete: a finished folder is never overwritten.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rlhf.training.config import GROUP_CONFIGS, GroupPolicyConfig, RewardModelConfig, TrainingConfig, group_config
from rlhf.training.modeling import data_dir_default
from rlhf.training.progress import LoggedProgress
from rlhf.training.reward_functions import RewardFn, RewardFunctionRegistry
from rlhf.training.reward_training import Comparison, Rating, split
from rlhf.training.reward_training import train_reward_model as train_reward_folder
from rlhf.training.version_folder import (
    TrainingResult,
    plot_version_curves,
    version_results,
    write_results,
)

log = logging.getLogger("rlhf")
Item = Rating | Comparison


def feedback_items(feedbacks: Iterable[Any]) -> list[Item]:
    """The seed's feedback dicts ({prompt, response, score, runId?, notes?}), comparison dicts ({prompt,
    chosen, rejected, margin?}), the SDK's feedback records (attributes of the same names) or the library's
    Rating/Comparison, as the library's items. A bad one is a ValueError naming feedbacks[i].field."""
    items: list[Item] = []
    for index, feedback in enumerate(feedbacks):
        if isinstance(feedback, (Rating, Comparison)):
            items.append(feedback)
            continue

        def get(name: str, default: Any = None, row: Any = feedback) -> Any:
            return row.get(name, default) if isinstance(row, Mapping) else getattr(row, name, default)

        where = f"feedbacks[{index}]"
        prompt = get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}.prompt: must be a non-empty string")
        if get("chosen"):
            chosen, rejected = get("chosen"), get("rejected")
            if not isinstance(rejected, str) or not rejected.strip():
                raise ValueError(f"{where}.rejected: a comparison needs the rejected response")
            items.append(Comparison(prompt, chosen, rejected, float(get("margin", 0.0) or 0.0)))
            continue
        response, score = get("response"), get("score")
        if not isinstance(response, str) or not response.strip():
            raise ValueError(f"{where}.response: must be a non-empty string")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise ValueError(f"{where}.score: must be a number between 0 (bad) and 1 (excellent), got {score!r}")
        items.append(Rating(prompt, response, float(score)))
    return items


class FeedbackDataset:
    """The seed's dataset for reward-model training: feedback as ratings and comparisons. With a tokenizer,
    an item is the encoded pair ({input_ids, attention_mask, label}: the score normalised by the dataset's
    mean and std); without, the Rating or Comparison itself."""

    def __init__(self, feedbacks: Iterable[Any], tokenizer: Any = None, max_length: int = 256) -> None:
        self.items = feedback_items(feedbacks)
        self.tokenizer = tokenizer
        self.max_length = max_length
        scores = [i.score for i in self.items if isinstance(i, Rating)]
        self.score_mean = sum(scores) / len(scores) if scores else 0.0
        variance = sum((s - self.score_mean) ** 2 for s in scores) / len(scores) if scores else 1.0
        self.score_std = variance**0.5 if variance > 1e-12 else 1.0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        item = self.items[index]
        if self.tokenizer is None or not isinstance(item, Rating):
            return item
        from rlhf.training.reward_inputs import encode, pair_text

        enc = encode(self.tokenizer, [pair_text(self.tokenizer, item.prompt, item.response)], self.max_length)
        return {
            "input_ids": enc["input_ids"][0],
            "attention_mask": enc["attention_mask"][0],
            "label": (item.score - self.score_mean) / self.score_std,
        }

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple[FeedbackDataset, FeedbackDataset]:
        """(train, validation): a seeded share held out, as the reward service holds it out."""
        train, held = split(self.items, val_fraction, random.Random(seed))
        return FeedbackDataset(train, self.tokenizer, self.max_length), FeedbackDataset(
            held, self.tokenizer, self.max_length
        )


class PPODataset:
    """The seed's dataset for PPO: the distinct prompts of the feedback (or prompts given as strings), in
    first-seen order. With a tokenizer an item is {query, input_ids}; without, the prompt."""

    def __init__(self, feedbacks: Iterable[Any], tokenizer: Any = None) -> None:
        seen: dict[str, None] = {}
        for feedback in feedbacks:
            prompt = feedback if isinstance(feedback, str) else feedback_items([feedback])[0].prompt
            if prompt.strip():
                seen.setdefault(prompt, None)
        self.prompts = list(seen)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Any:
        prompt = self.prompts[index]
        if self.tokenizer is None:
            return prompt
        return {"query": prompt, "input_ids": self.tokenizer(prompt, return_tensors="pt")["input_ids"][0]}


def items_of(dataset: Any) -> list[Item]:
    return dataset.items if isinstance(dataset, FeedbackDataset) else feedback_items(dataset)


def train_reward_model(train_dataset: Any, val_dataset: Any, config: RewardModelConfig, tokenizer: Any = None):
    """The seed's reward-model training: on `train_dataset`, validated on `val_dataset` (FeedbackDatasets or
    feedback lists), from config.base_model. Returns a RewardModel (`save_pretrained(path)` writes a folder
    that RLHFTrainer's reward_model_path and the reward service read). `tokenizer` is taken for the seed's
    signature; the base model's own tokenizer is the one trained with and saved."""
    from rlhf.training.modeling import resolve_model
    from rlhf.training.reward_model import RewardModel

    base_path = resolve_model(config.base_model, data_dir_default())
    with tempfile.TemporaryDirectory(prefix="reward-model-") as folder:
        output = pathlib.Path(folder) / "reward_model"
        train_reward_folder(
            items_of(train_dataset), config, base_path, output, LoggedProgress("reward model"), items_of(val_dataset)
        )
        return RewardModel.from_pretrained(output)


def reward_config_for(config: TrainingConfig) -> RewardModelConfig:
    """The reward model trained for a run when none is given: the run's model, LoRA, device and seed,
    the seed's RewardModelConfig defaults otherwise."""
    shared = {f.name for f in dataclasses.fields(RewardModelConfig)} & {
        "base_model",
        "use_lora",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
        "device",
        "mixed_precision",
        "seed",
    }
    return RewardModelConfig(**{name: getattr(config, name) for name in shared})


class RLHFTrainer:
    """The seed's trainer: a reward model (trained on the feedback unless one is given), then the policy (PPO,
    or GRPO / RLOO through TRL: `algorithm`, with `algorithm_config` their own knobs as a GRPOTrainingConfig /
    RLOOTrainingConfig or a dict of its fields, TRL's defaults unset; the shared fields come from `config`),
    then a version folder. `reward_model_class`: a RewardModel subclass whose forward transforms rewards (the
    seed's custom reward functions); `reward_functions`: functions config.reward_functions may name besides
    the built-ins, {name: callable or "module:function"}."""

    def __init__(
        self,
        config: TrainingConfig | None = None,
        reward_config: RewardModelConfig | None = None,
        *,
        algorithm: str = "ppo",
        algorithm_config: GroupPolicyConfig | Mapping[str, Any] | None = None,
        reward_model_class: type | None = None,
        reward_functions: Mapping[str, str | RewardFn] | None = None,
        data_dir: str | pathlib.Path | None = None,
    ) -> None:
        from rlhf.training.reward_model import RewardModel

        self.algorithm = algorithm.lower()
        if self.algorithm not in ("ppo", *GROUP_CONFIGS):
            raise ValueError(f"algorithm must be 'ppo', 'grpo' or 'rloo', got {algorithm!r}")
        if algorithm_config is not None and self.algorithm == "ppo":
            raise ValueError("algorithm_config is for GRPO and RLOO; PPO takes its knobs in config")
        if isinstance(algorithm_config, Mapping):
            algorithm_config = GROUP_CONFIGS[self.algorithm](**algorithm_config)
        self.algorithm_config = algorithm_config
        self.config = config or TrainingConfig()
        self.reward_config = reward_config or reward_config_for(self.config)
        self.reward_model_class = reward_model_class or RewardModel
        if not issubclass(self.reward_model_class, RewardModel):
            raise TypeError("reward_model_class must be rlhf.RewardModel or a subclass of it")
        self.registry = RewardFunctionRegistry.of(reward_functions or {})
        self.data_dir = pathlib.Path(data_dir) if data_dir else data_dir_default()

    def train(
        self,
        feedbacks: Iterable[Any],
        output_dir: str | pathlib.Path,
        reward_model_path: str | pathlib.Path | None = None,
        *,
        reward_model: Any = None,
        prompts: Sequence[str] | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> TrainingResult:
        """Train and write the version folder `output_dir` (which must not exist yet); returns its result.
        `reward_model_path` (or a loaded `reward_model`) reuses a reward model instead of training one;
        `prompts` default to the feedback's distinct prompts; `on_step(step, metrics)` sees every step."""
        from rlhf.training.modeling import pick_device, resolve_model
        from rlhf.training.ppo_trainer import PPOTrainer
        from rlhf.training.trl_trainers import GroupPolicyTrainer

        config = self.config
        items = feedback_items(feedbacks)
        combination = self.registry.combination(config.reward_functions, "config.reward_functions")
        prompts = list(prompts) if prompts is not None else PPODataset(items).prompts
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompts[{index}]: must be a non-empty string")
        if not prompts:
            raise ValueError("no prompts to train on: the feedback has none and none were given")
        output = pathlib.Path(output_dir).absolute()
        if output.exists():
            raise FileExistsError(f"{output} exists; a version folder is never overwritten: choose a new one")
        started = time.monotonic()
        base_path = resolve_model(config.base_model, self.data_dir)
        device = pick_device(config.device)
        staging = output.parent / f".{output.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            if reward_model is None and reward_model_path is None:
                log.info("training a reward model on %d feedback items", len(items))
                reward_config = dataclasses.replace(self.reward_config, base_model=config.base_model)
                train_reward_folder(
                    items, reward_config, base_path, staging / "reward_model", LoggedProgress("reward model")
                )
                reward_model = self.reward_model_class.from_pretrained(staging / "reward_model", device)
                reward_model_path = output / "reward_model"
            elif reward_model is None:
                reward_model_path = pathlib.Path(reward_model_path).absolute()
                reward_model = self.reward_model_class.from_pretrained(reward_model_path, device)
            score = reward_model.reward_fn(combination)
            name = self.algorithm.upper()
            last: dict[str, float] = {}

            def step_done(step: int, metrics: dict[str, float]) -> None:
                last.update(metrics)
                log.info(
                    "%s step %d/%d: score %.3f, kl %.3f",
                    name,
                    step,
                    config.max_steps,
                    metrics.get("objective/scores", metrics.get("reward", 0.0)),
                    metrics.get("objective/kl", metrics.get("kl", 0.0)),
                )
                if on_step:
                    on_step(step, metrics)

            if self.algorithm == "ppo":
                trainer = PPOTrainer(config, base_path, device)
                history = trainer.train(prompts, score, step_done)
            else:
                group = group_config(self.algorithm, config, self.algorithm_config)
                trainer = GroupPolicyTrainer(self.algorithm, group, base_path, staging / "trl", device)
                history = trainer.train(prompts, score, step_done, resume=False)
                shutil.rmtree(staging / "trl", ignore_errors=True)  # TRL's own checkpoints: not part of a version
            trainer.save(staging)
            results = version_results(
                output,
                history,
                reward_model_path=str(reward_model_path) if reward_model_path else None,
                feedback_count=len(items),
                training_steps=trainer.step,
                last_metrics=last,
            )
            plot_version_curves(staging, history, results, f"{name} on {config.base_model}")
            results.update(
                {
                    "config": dataclasses.asdict(config),
                    "algorithm": self.algorithm,
                    **({"algorithm_config": dataclasses.asdict(group)} if self.algorithm != "ppo" else {}),
                    "lineage": {
                        "base_model": config.base_model,
                        "reward_model_path": results["reward_model_path"],
                        "reward_model_class": f"{type(reward_model).__module__}.{type(reward_model).__qualname__}",
                    },
                    "training_seconds": round(time.monotonic() - started, 2),
                }
            )
            write_results(staging, results)
            staging.rename(output)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return TrainingResult.from_dict(results)
