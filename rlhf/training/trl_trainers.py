"""GRPO and RLOO through TRL's GRPOTrainer / RLOOTrainer, with rewards from any `(prompts, answers) -> scores`
function (the policy worker's calls the reward service: one ScoreBatch per generated batch).

What this adds around TRL: prompts formatted as serving formats them (the chat template when the tokenizer has
one, else the plain text) and cut from the left to fit the context beside max_new_tokens; LoRA through
`peft_config` from ModelTrainingConfig; dropout off (as PPO); reporting off and every file TRL writes inside
`output_dir`; TRL's own metric names forwarded to `on_step` each step; checkpoints (TRL's checkpoint-N
folders: adapter or weights, optimizer, scheduler, RNG states, trainer state) every `checkpoint_interval`
steps and whenever training stops early; resume from the newest of them; the policy saved merged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

from rlhf.training import sequences
from rlhf.training.config import GROUP_CONFIGS, GroupPolicyConfig
from rlhf.training.errors import TrainingError
from rlhf.training.scoring import Scores
from rlhf.training.threads import use_cpu_threads

log = logging.getLogger(__name__)

ALGORITHMS = ("grpo", "rloo")
# The name TRL gives the reward function in its metrics: rewards/reward_model/mean, rewards/reward_model/std.
REWARD_NAME = "reward_model"
# (prompts, answers) -> one score per pair: a list, or Scores with the 0..1 feedback-scale ratings beside.
ScoreFn = Callable[[list[str], list[str]], "list[float] | Scores"]
# (step, metrics) -> None; raising stops training (cancel), after a checkpoint is saved.
StepCallback = Callable[[int, dict[str, float]], None]


@dataclasses.dataclass
class History:
    """Per-step curves (from TRL's log history, so a resumed run has its earlier steps too)."""

    reward: list[float] = dataclasses.field(default_factory=list)  # reward-model scores
    reward_std: list[float] = dataclasses.field(default_factory=list)
    rating: list[float] = dataclasses.field(default_factory=list)  # the same on the 0..1 feedback scale
    rating_std: list[float] = dataclasses.field(default_factory=list)
    kl: list[float] = dataclasses.field(default_factory=list)  # empty when beta is 0 (TRL computes none)
    loss: list[float] = dataclasses.field(default_factory=list)
    entropy: list[float] = dataclasses.field(default_factory=list)
    response_length: list[float] = dataclasses.field(default_factory=list)
    # PPO's curves that GRPO and RLOO have not (no value head, a fixed KL coefficient): empty.
    value_loss: list[float] = dataclasses.field(default_factory=list)
    kl_coef: list[float] = dataclasses.field(default_factory=list)


def config_class(algorithm: str) -> type[GroupPolicyConfig]:
    return GROUP_CONFIGS[algorithm]


def fit_prompt(tokenizer: Any, prompt: str, room: int | None) -> tuple[str, bool]:
    """The prompt, its start cut (whole tokens) so that it fits `room` tokens as the model reads it; and
    whether it was cut. The chat template's own tokens count against the room."""
    if room is None:
        return prompt, False
    ids = sequences.encode_prompt(tokenizer, prompt)
    if len(ids) <= room:
        return prompt, False
    own = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    overhead = len(ids) - len(own)  # the chat template's tokens
    return tokenizer.decode(sequences.keep_end(own, room - overhead)), True


def _trl_arguments(algorithm: str, config: GroupPolicyConfig, output_dir: pathlib.Path, device: str):
    """TRL's GRPOConfig / RLOOConfig for `config`: a step is one generated batch of batch_size prompts x
    num_generations answers and one optimiser step on it (split into gradient_accumulation_steps micro-batches)."""
    from trl import GRPOConfig, RLOOConfig

    completions = config.batch_size * config.num_generations
    common = {
        "output_dir": str(output_dir),
        "report_to": "none",
        "disable_tqdm": True,
        "push_to_hub": False,
        "save_strategy": "steps" if config.checkpoint_interval else "no",
        "save_steps": config.checkpoint_interval or 500,
        "save_total_limit": 1,
        "logging_steps": 1,
        "max_steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "per_device_train_batch_size": completions // config.gradient_accumulation_steps,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "num_generations": config.num_generations,
        "max_completion_length": config.max_new_tokens,
        "temperature": config.temperature,
        "top_k": 0,  # the full softmax at `temperature`: the distribution the loss is computed under
        "top_p": 1.0,
        "beta": config.beta,
        "num_iterations": config.num_iterations,
        "epsilon": config.epsilon,
        "epsilon_high": config.epsilon_high or None,
        "mask_truncated_completions": config.mask_truncated_completions,
        "max_grad_norm": config.max_grad_norm,
        "seed": config.seed,
        "disable_dropout": True,  # as PPO: two passes over the same tokens must agree
        "gradient_checkpointing": config.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "bf16": config.mixed_precision == "bf16" and not device.startswith("cpu"),
        "fp16": config.mixed_precision == "fp16" and not device.startswith("cpu"),
        "use_cpu": device.startswith("cpu"),
        "dataloader_pin_memory": not device.startswith("cpu"),
        "log_completions": False,
    }
    if algorithm == "grpo":
        return GRPOConfig(**common, loss_type=config.loss_type, scale_rewards=config.scale_rewards)
    return RLOOConfig(**common, normalize_advantages=config.normalize_advantages)


def last_checkpoint(output_dir: pathlib.Path) -> pathlib.Path | None:
    """The newest checkpoint-N folder TRL saved in `output_dir`, if any."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


class GroupPolicyTrainer:
    """GRPO or RLOO on `model_path` (a folder or hub id); TRL's files go to `output_dir`."""

    def __init__(
        self, algorithm: str, config: GroupPolicyConfig, model_path: str, output_dir: pathlib.Path, device: str
    ) -> None:
        from transformers import AutoModelForCausalLM

        from rlhf.training.modeling import load_model, load_tokenizer, pick_device

        if algorithm not in ALGORITHMS:
            raise TrainingError(f"unknown algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
        self.algorithm = algorithm
        self.config = config
        self.device = pick_device(device)
        self.output_dir = output_dir
        self.tokenizer = load_tokenizer(model_path, padding_side="left")
        self.model = load_model(AutoModelForCausalLM, model_path)
        self.n_ctx = sequences.context_length(self.model)
        if self.n_ctx is not None and config.max_new_tokens >= self.n_ctx:
            raise TrainingError(
                f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in this model's context of "
                f"{self.n_ctx} tokens; use at most {self.n_ctx - 1} (prompts are cut from the left to fit)"
            )
        if (config.batch_size * config.num_generations) % config.gradient_accumulation_steps:
            raise TrainingError(
                f"batch_size x num_generations ({config.batch_size * config.num_generations} answers a step) must "
                f"divide into gradient_accumulation_steps ({config.gradient_accumulation_steps}) micro-batches"
            )
        # Small models run faster on one CPU thread (rlhf.training.threads), as PPO's do.
        self.cpu_threads = use_cpu_threads(self.model, config.cpu_threads, device, config.use_lora)
        self.truncated_prompts = 0
        self.trainer = None  # TRL's, built by train()

    @property
    def prompt_room(self) -> int | None:
        """Tokens a prompt may take beside max_new_tokens (None: the model does not say its context)."""
        return self.n_ctx - self.config.max_new_tokens if self.n_ctx is not None else None

    @property
    def step(self) -> int:
        return self.trainer.state.global_step if self.trainer is not None else 0

    def _dataset(self, prompts: list[str]):
        """Prompts as TRL takes them (conversations when the tokenizer has a chat template, which TRL applies
        as serving does), and `query`: the prompt text the reward service scores answers against."""
        from datasets import Dataset

        fitted = []
        for prompt in prompts:
            text, cut = fit_prompt(self.tokenizer, prompt, self.prompt_room)
            self.truncated_prompts += cut
            fitted.append(text)
        if getattr(self.tokenizer, "chat_template", None):
            shown: list[Any] = [[{"role": "user", "content": text}] for text in fitted]
        else:
            shown = fitted
        return Dataset.from_dict({"prompt": shown, "query": list(prompts)})

    def _reward_function(self, score_fn: ScoreFn):
        """TRL's reward function: one call per generated batch; logs the feedback-scale ratings, the prompt
        width and the seconds the scores took beside TRL's own metrics."""
        tokenizer, room = self.tokenizer, self.prompt_room

        def reward_model(prompts, completions, query, log_metric=None, **_: Any) -> list[float]:
            answers = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
            started = time.monotonic()
            answer = score_fn(list(query), answers)
            waited = time.monotonic() - started
            scores, ratings = (answer.scores, answer.ratings) if isinstance(answer, Scores) else (answer, None)
            if len(scores) != len(answers):
                raise TrainingError(f"the reward function returned {len(scores)} scores for {len(answers)} answers")
            bad = sum(1 for s in scores if not math.isfinite(s))
            if bad:
                raise TrainingError(
                    f"the reward model returned {bad} non-finite score(s) (NaN or infinity); check the reward "
                    f"model (retrain it, or use another version)"
                )
            if log_metric is not None:
                if ratings:
                    mean = sum(ratings) / len(ratings)
                    log_metric("ratings/mean", mean)
                    log_metric("ratings/std", statistics.stdev(ratings) if len(ratings) > 1 else 0.0)
                widest = max(len(sequences.encode_prompt(tokenizer, p)) for p in set(query))
                log_metric("tokens/query_width", float(min(widest, room) if room is not None else widest))
                log_metric("time/score_s", waited)
            return [float(s) for s in scores]

        reward_model.__name__ = REWARD_NAME
        return reward_model

    def train(
        self, prompts: list[str], score_fn: ScoreFn, on_step: StepCallback, resume: bool = True, callbacks=()
    ) -> History:
        """Train to max_steps, from the newest checkpoint in output_dir when `resume` and there is one;
        `callbacks`: more transformers TrainerCallbacks (e.g. timers).
        Whatever stops training early (on_step or score_fn raising: a cancel, the reward service gone) leaves
        a checkpoint of the last finished step, then propagates."""
        from peft import LoraConfig
        from transformers import PrinterCallback, TrainerCallback
        from trl import GRPOTrainer, RLOOTrainer

        c = self.config
        args = _trl_arguments(self.algorithm, c, self.output_dir, self.device)
        peft_config = None
        if c.use_lora:
            peft_config = LoraConfig(
                task_type="CAUSAL_LM",
                r=c.lora_r,
                lora_alpha=c.lora_alpha,
                lora_dropout=c.lora_dropout,
                target_modules=c.lora_target_modules or None,
            )
        trainer_class = GRPOTrainer if self.algorithm == "grpo" else RLOOTrainer
        self.trainer = trainer = trainer_class(
            model=self.model,
            reward_funcs=self._reward_function(score_fn),
            args=args,
            train_dataset=self._dataset(prompts),
            processing_class=self.tokenizer,
            peft_config=peft_config,
        )
        truncated = self.truncated_prompts

        class Forward(TrainerCallback):
            """TRL's logs of each step to on_step, with the step's seconds; a raise there stops training."""

            step_started = time.monotonic()

            def on_step_begin(self, args, state, control, **kwargs):
                Forward.step_started = time.monotonic()

            def on_log(self, args, state, control, logs=None, **kwargs):
                if not logs or "train_runtime" in logs:  # the run's summary, not a step
                    return
                metrics = {
                    k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float)) and v is not None
                }
                metrics["time/step_s"] = time.monotonic() - Forward.step_started
                metrics["prompts_truncated"] = float(truncated)
                on_step(state.global_step, metrics)

        trainer.remove_callback(PrinterCallback)  # logs go to on_step, not stdout
        trainer.add_callback(Forward())
        for callback in callbacks:
            trainer.add_callback(callback)
        checkpoint = last_checkpoint(self.output_dir) if resume else None
        if checkpoint is not None:
            log.info("%s resumes from %s", self.algorithm.upper(), checkpoint)
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except BaseException:
            self.save_checkpoint()
            raise
        if c.checkpoint_interval:
            self.save_checkpoint()  # the final step too, so that a resume after it has nothing left to do
        return self.history()

    def save_checkpoint(self) -> pathlib.Path | None:
        """A TRL checkpoint of the last finished step (nothing before the first)."""
        trainer = self.trainer
        if trainer is None or trainer.state.global_step == 0:
            return None
        folder = self.output_dir / f"checkpoint-{trainer.state.global_step}"
        if not (folder / "trainer_state.json").is_file():
            trainer._save_checkpoint(trainer.model, trial=None)  # TRL's own: weights, optimizer, RNG, state
        return folder

    def history(self) -> History:
        h = History()
        rows = [row for row in self.trainer.state.log_history if "reward" in row] if self.trainer else []
        for row in rows:
            h.reward.append(row["reward"])
            h.reward_std.append(row.get("reward_std", 0.0))
            if "ratings/mean" in row:
                h.rating.append(row["ratings/mean"])
                h.rating_std.append(row.get("ratings/std", 0.0))
            if "kl" in row:
                h.kl.append(row["kl"])
            h.loss.append(row.get("loss", 0.0))
            h.entropy.append(row.get("entropy", 0.0))
            h.response_length.append(row.get("completions/mean_length", 0.0))
        return h

    def save(self, folder: pathlib.Path) -> None:
        """policy/: the trained model, merged, loadable by AutoModelForCausalLM, with its tokenizer."""
        model = self.trainer.model if self.trainer is not None else self.model
        model = self.trainer.accelerator.unwrap_model(model) if self.trainer is not None else model
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        policy_dir = folder / "policy"
        policy_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(policy_dir)
        self.tokenizer.save_pretrained(policy_dir)
