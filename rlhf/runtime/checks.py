"""Range checks of training configs shared by the reward and policy services (InvalidArgument names the field)."""

from __future__ import annotations

import re

from rlhf.runtime.errors import InvalidArgument
from rlhf.runtime.validation import int_in, number_in

DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,2})?")  # fullmatch: "$" allows a final "\n"


def device_and_precision(device: str, mixed_precision: str, prefix: str) -> None:
    if not DEVICE_PATTERN.fullmatch(device):
        raise InvalidArgument(f"{prefix}.device", "must be auto, cpu, mps, cuda or cuda:N")
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise InvalidArgument(f"{prefix}.mixed_precision", "must be no, fp16 or bf16")


def lora(config, prefix: str) -> None:
    int_in(config.lora_r, f"{prefix}.lora_r", 1, 1024)
    int_in(config.lora_alpha, f"{prefix}.lora_alpha", 1, 65536)
    number_in(config.lora_dropout, f"{prefix}.lora_dropout", 0.0, 0.9)
    for name in config.lora_target_modules:
        if not re.fullmatch(r"[A-Za-z0-9_.]{1,64}", name):
            raise InvalidArgument(f"{prefix}.lora_target_modules", f"'{name}' is not a module name")


def base_model(name: str, field: str) -> None:
    if not name or len(name) > 1024 or "\x00" in name:
        raise InvalidArgument(field, "must be a hub id or local folder of at most 1024 characters")


def model_training(config, prefix: str) -> None:
    """The fields every training config shares (rlhf.training.config.ModelTrainingConfig)."""
    base_model(config.base_model, f"{prefix}.base_model")
    lora(config, prefix)
    if not 0 < config.learning_rate <= 1:  # also refuses NaN
        raise InvalidArgument(f"{prefix}.learning_rate", f"must be in (0, 1], got {config.learning_rate}")
    int_in(config.batch_size, f"{prefix}.batch_size", 1, 4096)
    int_in(config.gradient_accumulation_steps, f"{prefix}.gradient_accumulation_steps", 1, 1024)
    device_and_precision(config.device, config.mixed_precision, prefix)
    int_in(config.cpu_threads, f"{prefix}.cpu_threads", 0, 1024)


def reward_model_config(config, prefix: str) -> None:
    """A reward-model training config (rlhf.training.config.RewardModelConfig): the reward service's checks,
    which the policy service also makes before a job that will train one."""
    model_training(config, prefix)
    int_in(config.num_epochs, f"{prefix}.num_epochs", 1, 1000)
    int_in(config.max_length, f"{prefix}.max_length", 8, 32768)
    number_in(config.validation_fraction, f"{prefix}.validation_fraction", 0.0, 0.5)
    int_in(config.early_stopping_patience, f"{prefix}.early_stopping_patience", 0, 1000)


def within_context(max_length: int, context: int | None, field: str) -> None:
    """A reward model's max_length fits its base model's context (None: the model does not say)."""
    if context is not None and max_length > context:
        raise InvalidArgument(field, f"{max_length} is longer than the base model's context of {context} tokens")


def leaves_room_for_a_prompt(max_new_tokens: int, context: int | None, field: str) -> None:
    """Responses of max_new_tokens leave at least one token of the context for the prompt."""
    if context is not None and max_new_tokens >= context:
        raise InvalidArgument(
            field,
            f"{max_new_tokens} leaves no room for a prompt in the base model's context of {context} tokens; "
            f"use at most {context - 1}",
        )
