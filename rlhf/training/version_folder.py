"""The results a policy version folder holds (training_results.json, curves.png): written the same way by the
policy service's worker and by the library's RLHFTrainer, and read back as the seed's TrainingResult."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from rlhf.training.plotting import plot_curves

RESULTS_FILE = "training_results.json"
CURVES_FILE = "curves.png"
# The seed's final_reward_* average the last steps' rewards (one step alone is noisy).
FINAL_TAIL = 5


def version_results(
    output: pathlib.Path,
    history: Any,
    *,
    reward_model_path: str,
    feedback_count: int,
    training_steps: int,
    last_metrics: dict[str, float],
) -> dict[str, Any]:
    """The seed's TrainingResult fields (rewards on the 0..1 feedback scale when the reward function gave
    ratings, else in the reward's own units), then the other curves and final metrics. `history` is the
    trainer's History."""
    rewards, reward_stds = (
        (history.rating, history.rating_std) if history.rating else (history.reward, history.reward_std)
    )
    tail = max(1, min(FINAL_TAIL, len(rewards)))
    score_tail = max(1, min(FINAL_TAIL, len(history.reward)))
    return {
        # The seed's TrainingResult fields.
        "model_path": str(output / "policy"),
        "reward_model_path": reward_model_path,
        "feedback_count": feedback_count,
        "final_reward_mean": sum(rewards[-tail:]) / tail,
        "final_reward_std": sum(reward_stds[-tail:]) / tail,
        "training_steps": training_steps,
        "reward_history": rewards,
        "kl_history": history.kl,
        "loss_history": history.loss,
        # More curves. Scores in the reward model's own units:
        "final_score_mean": sum(history.reward[-score_tail:]) / score_tail,
        "final_score_std": sum(history.reward_std[-score_tail:]) / score_tail,
        "score_history": history.reward,
        "value_loss_history": history.value_loss,
        "entropy_history": history.entropy,
        "kl_coef_history": history.kl_coef,
        "response_length_history": history.response_length,
        "value_error": last_metrics.get("val/error", 0.0),
        "entropy": last_metrics.get("objective/entropy", 0.0),
        "final_kl": last_metrics.get("objective/kl", 0.0),
    }


def plot_version_curves(
    output: pathlib.Path, history: Any, results: dict[str, Any], title: str, target_kl: float | None = None
) -> pathlib.Path:
    """curves.png in `output`: the reward as reported (results' reward_history) with its ±1 std band, the
    trainer's curves, and `target_kl` (PPO's adaptive KL target) as a line on the KL panel."""
    reward_name = "reward (0..1 feedback scale)" if history.rating else "reward"
    curves = {
        reward_name: results["reward_history"],
        "reward-model score": history.reward if history.rating else [],
        "KL to reference": history.kl,
        "loss": history.loss,
        "entropy": history.entropy,
        "value loss": history.value_loss,
        "kl_coef": history.kl_coef,
    }
    # Per-step spread across the batch, where the trainer recorded it (a band of another length is skipped).
    reward_std = getattr(history, "reward_std", [])
    bands = {
        reward_name: getattr(history, "rating_std", []) if history.rating else reward_std,
        "reward-model score": reward_std,
    }
    targets = {"KL to reference": target_kl} if target_kl is not None else {}
    return plot_curves(curves, output / CURVES_FILE, title, bands=bands, targets=targets)


def write_results(output: pathlib.Path, results: dict[str, Any]) -> pathlib.Path:
    """training_results.json in `output` (what TrainingResult.load reads)."""
    path = output / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2))
    return path


@dataclasses.dataclass
class TrainingResult:
    """The seed's result of a policy training run; `details` holds the rest of training_results.json
    (more curves, config, lineage, timing)."""

    model_path: str
    reward_model_path: str | None
    feedback_count: int
    final_reward_mean: float
    final_reward_std: float
    training_steps: int
    reward_history: list[float]
    kl_history: list[float]
    loss_history: list[float]
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, results: dict[str, Any]) -> TrainingResult:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "details"]
        missing = [name for name in names if name not in results]
        if missing:
            raise ValueError(f"not a training_results.json of a policy version: no {', '.join(missing)}")
        return cls(
            **{name: results[name] for name in names},
            details={k: v for k, v in results.items() if k not in names},
        )

    @classmethod
    def load(cls, path: str | pathlib.Path) -> TrainingResult:
        """From a version's training_results.json, or the version folder that holds it."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / RESULTS_FILE
        return cls.from_dict(json.loads(path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}
        return {**out, **self.details}
