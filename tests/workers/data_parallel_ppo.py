"""One rank of a data-parallel PPO run on the tiny model (or the whole run, outside torchrun), for
tests/test_data_parallel.py: `python -m torch.distributed.run --standalone --nproc-per-node 2
tests/workers/data_parallel_ppo.py SPEC.json`. The spec: {"model", "out", "config": {...}, "resume_from"?,
"keep_at"?}. Each rank writes out/rank<r>.json: a checksum of its trainable weights, its curves, the prompts
it was given and the texts it sampled."""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import sys

import torch

from rlhf.training.config import TrainingConfig
from rlhf.training.distributed import Group
from rlhf.training.ppo_trainer import PPOTrainer, rank_path

PROMPTS = [
    "Where did you go today?",
    "Tell me something nice.",
    "What did you see?",
    "How was the sea?",
    "What is your name?",
    "Who made the bread?",
    "Why is the sky blue?",
    "When does the boat leave?",
]


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Shorter answers score higher: a reward the tiny model learns in a few steps (it learns to end early).
    Its answers start near 60 characters, so rewarding longer ones (as this did first) left little to learn:
    with 4 sampling seeds, 12 steps gained -0.09 to +0.11, against +0.20 to +0.30 for this one at lr 1e-2."""
    return [1 - min(len(r), 60) / 60 for r in responses]


def checksum(trainer: PPOTrainer) -> str:
    digest = hashlib.sha256()
    for name, parameter in sorted(trainer.model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(spec_path: str) -> None:
    spec = json.loads(pathlib.Path(spec_path).read_text())
    out = pathlib.Path(spec["out"])
    config = TrainingConfig(**spec["config"])
    group = Group.current("cpu")
    trainer = PPOTrainer(config, spec["model"], "cpu", group)
    checkpoint = out / "checkpoint.pt"
    if spec.get("resume_from"):
        trainer.restore(PPOTrainer.read_checkpoint(pathlib.Path(spec["resume_from"]), group.rank))
    initial = checksum(trainer)
    seen: list[str] = []
    sampled: list[str] = []
    step_on = trainer.step_on

    def recording_step(prompts, score_fn):
        seen.extend(prompts)
        return step_on(prompts, lambda p, r: (sampled.extend(r), score_fn(p, r))[1])

    trainer.step_on = recording_step

    def save() -> None:
        trainer.save_checkpoint(checkpoint)
        if trainer.step == spec.get("keep_at"):  # a copy to resume from later
            kept = out / f"kept{trainer.step}.pt"
            shutil.copy(
                checkpoint if group.is_main else rank_path(checkpoint, group.rank),
                rank_path(kept, group.rank) if group.rank else kept,
            )

    history = trainer.train(PROMPTS, length_reward, lambda step, metrics: None, save)
    result = {
        "rank": group.rank,
        "world_size": group.world_size,
        "steps": trainer.step,
        "initial_checksum": initial,
        "checksum": checksum(trainer),
        "kl_coef": trainer.kl_ctl.value,
        "reward": history.reward,
        "kl": history.kl,
        "loss": history.loss,
        "prompts": seen,
        "texts": sampled,
        "lr": trainer.scheduler.get_last_lr()[0],
        "exp_avg_sum": float(sum(s["exp_avg"].double().sum() for s in trainer.optimizer.state.values())),
    }
    (out / f"rank{group.rank}.json").write_text(json.dumps(result))
    group.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
