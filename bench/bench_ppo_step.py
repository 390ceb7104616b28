"""PPO step time on the tiny model, and the share of each step spent waiting for rewards.

Setup: a feedback server and a reward server, each in its own process; 60 synthetic ratings are submitted
and a reward model is trained on them through the real services (full fine-tune, 1 epoch, batch 16,
lr 5e-4). Then rlhf.training.ppo_trainer.PPOTrainer runs in this process (batch 16, 32 new tokens, 4 PPO
epochs, minibatch 4, i.e. 16 minibatch updates per step), with full fine-tuning and with LoRA, and with two
reward sources:
  * gRPC: one `RewardClient.score` (ScoreBatch) call per rollout batch, as the policy worker does;
  * baseline, same run: the simulated rater (`rlhf.sdk.rater.rate`) computed locally, i.e. no reward model.
Each (mode, source) gets a fresh trainer with the same seed, one warm-up step, then --steps timed steps.
The score function is wrapped to time its own wall time; the trainer reports time/rollout_and_score_s,
time/step_s and time/score_wait_s (the part of scoring not hidden behind the rollout's forward passes,
which run while the reward service scores: that is the "waiting for rewards" share). Reported: median
seconds per step, the split rollout / scoring / update, and the share of
the step spent waiting for rewards. Roadmap goal: reward waiting <= 5% of the step.

    python bench/bench_ppo_step.py [--quick] [--steps N] [--batch 16] [--new-tokens 32] [--epochs 4]
"""

from __future__ import annotations

import argparse
import time
import warnings

import _common as common  # noqa: E402  (sets sys.path and the environment)

GOAL_REWARD_SHARE = 0.05
warnings.filterwarnings("ignore", category=UserWarning, module="peft")  # fan_in_fan_out note on GPT-2's Conv1D
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def run(mode: str, source: str, score, model_path: str, device: str, args) -> dict:
    from rlhf.training import corpus
    from rlhf.training.config import TrainingConfig
    from rlhf.training.ppo_trainer import PPOTrainer

    config = TrainingConfig(
        use_lora=(mode == "lora"),
        batch_size=args.batch,
        mini_batch_size=args.mini_batch,
        ppo_epochs=args.epochs,
        max_new_tokens=args.new_tokens,
        device=device,
        seed=0,
        learning_rate=1e-5,
    )
    trainer = PPOTrainer(config, model_path, device)
    prompts = corpus.prompts(args.batch * (args.steps + 1), seed=0)
    score_times: list[float] = []

    def timed_score(batch_prompts: list[str], responses: list[str]) -> list[float]:
        started = time.perf_counter()
        values = score(batch_prompts, responses)
        score_times.append(time.perf_counter() - started)
        return values

    steps = []
    for i in range(args.steps + 1):
        metrics = trainer.step_on(prompts[i * args.batch : (i + 1) * args.batch], timed_score)
        if i == 0:
            continue  # warm-up: first generate/backward allocations, first ScoreBatch on a fresh channel
        step_s = metrics["time/step_s"]
        rollout_s = metrics["time/rollout_and_score_s"]
        steps.append(
            {
                "step_s": step_s,
                "rollout_and_score_s": rollout_s,
                "score_s": score_times[-1],
                "update_s": step_s - rollout_s,
                "response_length": metrics["response_length"],
                # What the step waited for its scores: scoring overlaps the rollout's forward passes.
                "score_wait_s": metrics["time/score_wait_s"],
                "reward_share": metrics["time/score_wait_s"] / step_s,
            }
        )
    med = {k: common.median([s[k] for s in steps]) for k in steps[0]}
    return {
        "mode": mode,
        "source": source,
        "steps": steps,
        **{f"median_{k}": v for k, v in med.items()},
        # share of the total time over the timed steps (robust when one step is an outlier)
        "reward_share_total": sum(s["score_wait_s"] for s in steps) / sum(s["step_s"] for s in steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one timed step per combination (a smoke run)")
    parser.add_argument("--steps", type=int, help="timed steps per combination after one warm-up (default 5)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per rollout batch (default 16)")
    parser.add_argument("--mini-batch", type=int, default=4, help="rows per PPO minibatch (default 4)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per response (default 32)")
    parser.add_argument("--epochs", type=int, default=4, help="PPO epochs per step (default 4)")
    parser.add_argument("--modes", default="full,lora", help="comma-separated: full, lora (default both)")
    args = parser.parse_args()
    args.steps = args.steps or (1 if args.quick else 5)

    info = common.machine()
    common.print_machine(info)
    model_path, model_s = common.ensure_tiny_model()

    from rlhf.sdk import rater
    from rlhf.sdk.clients import RewardClient
    from rlhf.training.modeling import pick_device

    device = pick_device("auto")
    rows = []
    with common.reward_stack("ppo") as (reward_server, version, _, train_s):
        print(
            f"setup: tiny model {model_s:.1f}s, reward model {version} trained through the services in "
            f"{train_s:.1f}s; PPO on {device}",
            flush=True,
        )
        with RewardClient(reward_server.address, timeout=60) as client:

            def grpc_score(prompts: list[str], responses: list[str]) -> list[float]:
                # As policy_service.worker does: one ScoreBatch per rollout batch; unscorable -> batch floor.
                answer = client.score("bench", list(zip(prompts, responses, strict=False)), version=version)
                valid = [s.score for s in answer.scores if s.ok]
                floor = min(valid) if valid else 0.0
                return [s.score if s.ok else floor for s in answer.scores]

            def local_score(prompts: list[str], responses: list[str]) -> list[float]:
                return [rater.rate(r) for r in responses]

            for mode in args.modes.split(","):
                for source, fn in (("grpc", grpc_score), ("local", local_score)):
                    row = run(mode, source, fn, str(model_path), device, args)
                    rows.append(row)
                    print(
                        f"{mode:4s} {source:5s}: {row['median_step_s']:.3f} s/step, rewards "
                        f"{1000 * row['median_score_s']:.1f} ms ({100 * row['median_reward_share']:.2f}% "
                        f"of the step)",
                        flush=True,
                    )

    by = {(r["mode"], r["source"]): r for r in rows}
    for r in rows:
        base = by.get((r["mode"], "local"))
        r["step_vs_local"] = r["median_step_s"] / base["median_step_s"] if base else None
    print()
    common.print_table(
        [
            "mode",
            "rewards",
            "s/step",
            "rollout+score s",
            "score ms",
            "update s",
            "reward share %",
            "step / local",
            "resp len",
        ],
        [
            [
                r["mode"],
                "gRPC ScoreBatch" if r["source"] == "grpc" else "local rater (baseline)",
                r["median_step_s"],
                r["median_rollout_and_score_s"],
                1000 * r["median_score_s"],
                r["median_update_s"],
                100 * r["median_reward_share"],
                r["step_vs_local"],
                r["median_response_length"],
            ]
            for r in rows
        ],
    )
    grpc_rows = [r for r in rows if r["source"] == "grpc"]
    met = all(r["median_reward_share"] <= GOAL_REWARD_SHARE for r in grpc_rows)
    worst = max(r["median_reward_share"] for r in grpc_rows)
    print(
        f"\ngoal: waiting for rewards <= {100 * GOAL_REWARD_SHARE:.0f}% of the step: "
        f"{'MET' if met else 'NOT MET'} (worst {100 * worst:.2f}%)"
    )
    common.write_results(
        "ppo_step",
        {
            "benchmark": "ppo_step",
            "machine": info,
            "device": device,
            "config": {
                "batch": args.batch,
                "mini_batch": args.mini_batch,
                "new_tokens": args.new_tokens,
                "ppo_epochs": args.epochs,
                "timed_steps": args.steps,
                "model": "rlhf-tiny",
            },
            "setup_seconds": {"tiny_model": model_s, "reward_model_training": train_s},
            "results": rows,
            "goal": {"max_reward_share": GOAL_REWARD_SHARE, "met": met, "worst_share": worst},
        },
    )


if __name__ == "__main__":
    main()
