"""Reward-model training, in-process: ratings by MSE on normalised scores, comparisons by the Bradley-Terry
pairwise loss, both on one scalar head; LoRA optional, merged on save. The reward service's job worker calls
`train_reward_model`; so can a notebook or a test, with no server running."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import random
import time
from typing import Any

from rlhf.training.config import RewardModelConfig
from rlhf.training.errors import NotEnoughData, TrainingError
from rlhf.training.progress import Progress, SilentProgress
from rlhf.training.reward_inputs import CONFIG_FILE, NORMALIZATION_FILE, encode, pair_text, to_rating

MIN_EXAMPLES = 10


@dataclasses.dataclass
class Rating:
    prompt: str
    response: str
    score: float  # 0..1


@dataclasses.dataclass
class Comparison:
    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0  # how much better chosen is; 0 for a plain preference


@dataclasses.dataclass
class Examples:
    """Reward-model training data in the form the model reads: one text per pair (reward_inputs.pair_text)."""

    ratings: list[tuple[str, float]]  # (text, score in 0..1)
    comparisons: list[tuple[str, str, float]]  # (chosen text, rejected text, margin)

    @classmethod
    def of(cls, items: list[Rating | Comparison], tokenizer: Any) -> Examples:
        def text(prompt: str, response: str) -> str:
            return pair_text(tokenizer, prompt, response)

        return cls(
            ratings=[(text(i.prompt, i.response), i.score) for i in items if isinstance(i, Rating)],
            comparisons=[
                (text(i.prompt, i.chosen), text(i.prompt, i.rejected), i.margin)
                for i in items
                if isinstance(i, Comparison)
            ],
        )


def split(items: list, fraction: float, rng: random.Random) -> tuple[list, list]:
    items = list(items)
    rng.shuffle(items)
    held = int(round(len(items) * fraction)) if len(items) >= 10 else 0
    return items[held:], items[:held]


def prepare_model(config: RewardModelConfig, base_path: str, tokenizer: Any) -> Any:
    """The model to train: a one-label sequence classifier on the base model, its own dropout off (as TRL's
    RewardTrainer does), LoRA adapters when asked for (their dropout stays: the regulariser asked for)."""
    from transformers import AutoModelForSequenceClassification

    from rlhf.training.modeling import add_lora, disable_dropout, load_model, use_gradient_checkpointing
    from rlhf.training.sequences import context_length

    model = load_model(AutoModelForSequenceClassification, base_path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    window = context_length(model)
    if window is not None and config.max_length > window:
        raise TrainingError(
            f"max_length {config.max_length} is longer than the base model's context of {window} tokens; "
            f"use at most {window}"
        )
    disable_dropout(model)
    if config.gradient_checkpointing:
        use_gradient_checkpointing(model)
    if config.use_lora:
        model = add_lora(model, config, "SEQ_CLS")
    return model


def train_reward_model(
    items: list[Rating | Comparison],
    config: RewardModelConfig,
    base_path: str,
    output_dir: pathlib.Path,
    context: Progress | None = None,
    validation: list[Rating | Comparison] | None = None,
) -> dict[str, Any]:
    """Train on `items`, save a model folder loadable by AutoModelForSequenceClassification at `output_dir`
    (with normalization.json, reward_config.json, loss_history.json) and return counts, metrics and the
    normalisation. `context` receives progress and may stop the run by raising from check_cancelled.
    `validation`: held-out items chosen by the caller (the seed's train/val datasets); by default a seeded
    share (config.validation_fraction) of `items` is held out."""
    import torch

    from rlhf.training.modeling import autocast_dtype, load_tokenizer, pick_device
    from rlhf.training.threads import use_cpu_threads

    context = context or SilentProgress()
    usable = sum(1 for i in items if isinstance(i, (Rating, Comparison)))
    if usable < MIN_EXAMPLES:
        raise NotEnoughData(f"only {usable} usable feedback items; at least {MIN_EXAMPLES} are needed")
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    amp = autocast_dtype(config.mixed_precision, device)

    context.progress(phase="loading", message=f"loading {base_path}")
    tokenizer = load_tokenizer(base_path, padding_side="right")
    model = prepare_model(config, base_path, tokenizer)
    examples = Examples.of(items, tokenizer)
    if validation is None:
        train_r, val_r = split(examples.ratings, config.validation_fraction, rng)
        train_c, val_c = split(examples.comparisons, config.validation_fraction, rng)
    else:
        held = Examples.of(validation, tokenizer)
        train_r, val_r, train_c, val_c = examples.ratings, held.ratings, examples.comparisons, held.comparisons

    # Normalise ratings so the head regresses a unit-scale target; kept to report 0..1 ratings later.
    # From the training split only: validation items must not leak into what the model is fitted to.
    scores = [s for _, s in train_r]
    mean = sum(scores) / len(scores) if scores else 0.0
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)) if scores else 1.0
    std = std if std > 1e-6 else 1.0
    normalization = {"kind": "rating" if examples.ratings else "comparison", "mean": mean, "std": std}

    model.to(device)
    use_cpu_threads(model, config.cpu_threads, device, config.use_lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate)
    # fp16 needs loss scaling or small gradients underflow to 0.
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp == torch.float16)

    # One list of batches per epoch: rating batches and comparison batches interleaved.
    def batches() -> list[tuple[str, list]]:
        out = [("rating", train_r[i : i + config.batch_size]) for i in range(0, len(train_r), config.batch_size)]
        out += [("comparison", train_c[i : i + config.batch_size]) for i in range(0, len(train_c), config.batch_size)]
        rng.shuffle(out)
        return out

    def forward(texts: list[str]):
        enc = encode(tokenizer, texts, config.max_length).to(device)
        with torch.autocast(device_type=device.split(":")[0], dtype=amp, enabled=amp is not None):
            return model(**enc).logits.squeeze(-1).float()

    def loss_of(kind: str, batch: list):
        if kind == "rating":
            target = torch.tensor([(s - mean) / std for _, s in batch], device=device)
            return torch.nn.functional.mse_loss(forward([t for t, _ in batch]), target)
        rewards = forward([c for c, _, _ in batch] + [r for _, r, _ in batch])
        chosen, rejected = rewards[: len(batch)], rewards[len(batch) :]
        margin = torch.tensor([m for _, _, m in batch], device=device)
        return -torch.nn.functional.logsigmoid(chosen - rejected - margin).mean()

    steps_per_epoch = math.ceil(len(batches()) / config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.num_epochs
    history: list[float] = []
    val_history: list[float] = []
    best_val, stale, step = math.inf, 0, 0
    best_state: dict[str, Any] | None = None
    best_epoch = config.num_epochs
    # Evaluation runs in micro-batches, never the whole validation set in one forward pass.
    eval_batch = max(config.batch_size, 32)
    started = time.monotonic()
    for epoch in range(config.num_epochs):
        model.train()
        for index, (kind, batch) in enumerate(batches()):
            context.check_cancelled()
            loss = loss_of(kind, batch) / config.gradient_accumulation_steps
            scaler.scale(loss).backward()
            if (index + 1) % config.gradient_accumulation_steps == 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
                step += 1
                history.append(loss.item() * config.gradient_accumulation_steps)
                elapsed = time.monotonic() - started
                context.progress(
                    phase="training",
                    step=step,
                    total_steps=total_steps,
                    epoch=epoch + 1,
                    total_epochs=config.num_epochs,
                    train_loss=history[-1],
                    eta_seconds=elapsed / step * (total_steps - step),
                )
        metrics = evaluate(model, forward, val_r, val_c, normalization, eval_batch)
        if "validation_loss" in metrics:
            val_history.append(metrics["validation_loss"])
            context.progress(
                phase="training",
                step=step,
                total_steps=total_steps,
                epoch=epoch + 1,
                total_epochs=config.num_epochs,
                train_loss=history[-1] if history else 0.0,
                validation_loss=metrics["validation_loss"],
            )
            if metrics["validation_loss"] < best_val - 1e-6:
                best_val, stale = metrics["validation_loss"], 0
                best_state = {
                    name: value.detach().clone() for name, value in model.named_parameters() if value.requires_grad
                }
                best_epoch = epoch + 1
            else:
                stale += 1
                if config.early_stopping_patience and stale >= config.early_stopping_patience:
                    break

    if config.early_stopping_patience and best_state is not None:
        # Early stopping keeps the best epoch's weights, not the last (worse) ones.
        with torch.no_grad():
            parameters = dict(model.named_parameters())
            for name, value in best_state.items():
                parameters[name].copy_(value)
    context.progress(phase="saving", step=step, total_steps=total_steps)
    metrics = evaluate(model, forward, val_r, val_c, normalization, eval_batch)
    metrics["best_epoch"] = float(best_epoch)
    if config.use_lora:
        model = model.merge_and_unload()
    output_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / NORMALIZATION_FILE).write_text(json.dumps(normalization))
    (output_dir / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    (output_dir / "loss_history.json").write_text(json.dumps({"train": history, "validation": val_history}))
    return {
        "model_path": str(output_dir),
        "feedback_count": len(items),
        "rating_count": len(examples.ratings),
        "comparison_count": len(examples.comparisons),
        "metrics": metrics,
        "normalization": normalization,
        "training_steps": step,
    }


def evaluate(
    model, forward, ratings: list, comparisons: list, normalization: dict, batch_size: int = 32
) -> dict[str, float]:
    """Validation metrics: MSE/MAE (0..1 scale), Pearson and Spearman for ratings; pairwise accuracy. The
    validation loss is the training loss on held-out items (MSE on normalised scores; Bradley-Terry with
    the margin), computed in batches of `batch_size`."""
    import torch

    def scores_of(texts: list[str]) -> list[float]:
        return [
            v for start in range(0, len(texts), batch_size) for v in forward(texts[start : start + batch_size]).tolist()
        ]

    metrics: dict[str, float] = {}
    model.eval()
    losses = []
    with torch.inference_mode():
        if ratings:
            outputs = scores_of([t for t, _ in ratings])
            predicted = [to_rating(o, normalization) for o in outputs]
            truth = [s for _, s in ratings]
            errors = [p - t for p, t in zip(predicted, truth, strict=True)]
            metrics["mse"] = sum(e * e for e in errors) / len(errors)
            metrics["mae"] = sum(abs(e) for e in errors) / len(errors)
            metrics["pearson"] = correlation(predicted, truth)
            metrics["spearman"] = correlation(ranks(predicted), ranks(truth))
            targets = [(t - normalization["mean"]) / normalization["std"] for t in truth]
            losses.append(sum((o - g) ** 2 for o, g in zip(outputs, targets, strict=True)) / len(truth))
        if comparisons:
            chosen = torch.tensor(scores_of([c for c, _, _ in comparisons]))
            rejected = torch.tensor(scores_of([r for _, r, _ in comparisons]))
            margin = torch.tensor([m for _, _, m in comparisons])
            metrics["pairwise_accuracy"] = (chosen > rejected).float().mean().item()
            losses.append(-torch.nn.functional.logsigmoid(chosen - rejected - margin).mean().item())
    model.train()
    if losses:
        metrics["validation_loss"] = sum(losses) / len(losses)
    metrics["validation_count"] = float(len(ratings) + len(comparisons))
    return metrics


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            result[order[k]] = (i + j) / 2.0
        i = j + 1
    return result


def correlation(a: list[float], b: list[float]) -> float:
    n = len(a)
    if n < 2:
        return 0.0
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=False))
    va = math.sqrt(sum((x - ma) ** 2 for x in a))
    vb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return cov / (va * vb) if va > 0 and vb > 0 else 0.0
