"""The learning task in-process (rlhf.sdk.learning_task), for experiments with PPO settings. Prints one
JSON line. Example: python scripts/learning_check.py --learning-rate 3e-3 --steps 40
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from rlhf.runtime.environment import prepare_environment  # noqa: E402

prepare_environment()

from rlhf.sdk import learning_task  # noqa: E402
from rlhf.training.config import TrainingConfig  # noqa: E402
from rlhf.training.modeling import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=TrainingConfig.max_new_tokens)
    parser.add_argument("--init-kl-coef", type=float, default=TrainingConfig.init_kl_coef)
    parser.add_argument("--target-kl", type=float, default=TrainingConfig.target_kl)
    parser.add_argument("--kl-horizon", type=int, default=TrainingConfig.kl_horizon)
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="learning-"))
    config = TrainingConfig(
        use_lora=not args.full,
        learning_rate=args.learning_rate,
        max_steps=args.steps,
        max_new_tokens=args.max_new_tokens,
        init_kl_coef=args.init_kl_coef,
        target_kl=args.target_kl,
        kl_horizon=args.kl_horizon,
        seed=args.seed,
    )
    outcome = learning_task.run(resolve_model("rlhf-tiny", work), config, work)
    kls = [m["objective/kl"] for m in outcome.steps]
    half = kls[len(kls) // 2 :]
    print(
        json.dumps(
            {
                "base": round(outcome.base_score, 3),
                "trained": round(outcome.trained_score, 3),
                "gain": round(outcome.gain, 3),
                "kl_second_half_mean": round(sum(half) / len(half), 2),
                "kl_max": round(max(kls), 2),
                "kl_coef_last": round(outcome.steps[-1]["kl_coef"], 3),
                "reward_spearman": round(outcome.reward_metrics.get("spearman", 0.0), 3),
                "seconds": round(outcome.seconds, 1),
                "kl_curve": [round(k, 1) for k in kls],
            }
        )
    )


if __name__ == "__main__":
    main()
