"""Peak memory of PPO on a GPT-2-small-sized (124M) model: full fine-tuning against LoRA r=8, beside the
seed's memory table and the dry run's peak-memory estimate.

Settings are the seed's defaults (batch 8, minibatch 4, 4 PPO epochs, 128 new tokens, LoRA r=8 alpha=32)
on a randomly initialised GPT-2 with GPT-2's exact shape (12 layers, width 768, 50,257 ids; built once by
bench_ppo_vs_trl.py's recipe into .rlhf/bench-models). Each mode runs in a fresh process (so one mode's
freed memory does not hide the other's): it loads the trainer, runs --steps PPO steps with a local
reward function (the reward model lives in another service and is not part of the policy worker's
memory), and reports
  * CPU: peak resident set size of the process (ru_maxrss) and the same less the resident size before the
    trainer was built, after a warm-up step on the tiny model (Python, torch, transformers and peft
    themselves, ~0.3-0.6 GB), which is what the dry run estimates;
  * GPU, when one is present (--device cuda): torch.cuda.max_memory_allocated.
The goal (issue "Use the hardware"): LoRA's peak at most a third of full fine-tuning's; the dry run's
estimate within +-25% of the measured training memory.

    python bench/bench_memory.py [--steps N] [--new-tokens N] [--device cpu|cuda] [--precision no|bf16|fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import _common as common  # noqa: E402  (sets sys.path and the environment)

GOAL_LORA_SHARE = 1 / 3
GOAL_ESTIMATE_ERROR = 0.25
SEED_TABLE_GB = {"full": 8.0, "lora": 2.0}  # the seed's "Memory Usage Estimates" for GPT-2 (124M)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def child(args: argparse.Namespace) -> None:
    """One mode in this process; prints one JSON line."""
    import torch

    from policy_service.estimate import peak_memory
    from rlhf.training import corpus
    from rlhf.training.config import TrainingConfig
    from rlhf.training.modelshape import describe_model
    from rlhf.training.ppo_trainer import PPOTrainer

    config = TrainingConfig(
        use_lora=args.child == "lora",
        lora_r=8,
        lora_alpha=32,
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=4,
        max_new_tokens=args.new_tokens,
        max_steps=args.steps,
        device=args.device,
        mixed_precision=args.precision,
        seed=0,
    )
    gpu = args.device.startswith("cuda")
    # A warm-up step on the tiny model first (as tests/test_estimate.py measures): it loads the code a step
    # runs (transformers' model modules, peft, kernels), which is the runtime's, not this run's memory.
    import gc

    tiny, _ = common.ensure_tiny_model()
    warm = PPOTrainer(
        TrainingConfig(use_lora=config.use_lora, batch_size=2, mini_batch_size=2, ppo_epochs=1, max_new_tokens=4),
        str(tiny),
        args.device,
    )
    warm.step_on(corpus.prompts(2, seed=1), lambda _p, responses: [0.0 for _ in responses])
    del warm
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the peak of this run, not the warm-up's
    before = rss_bytes()
    started = time.monotonic()
    trainer = PPOTrainer(config, args.model, args.device)
    prompts = corpus.prompts(config.batch_size * args.steps, seed=0)
    metrics: dict[str, float] = {}
    for step in range(args.steps):
        batch = prompts[step * config.batch_size : (step + 1) * config.batch_size]
        metrics = trainer.step_on(batch, lambda _p, responses: [len(r) / 100 for r in responses])
    peak = peak_rss_bytes()
    estimate = peak_memory(describe_model(args.model), config, metrics["tokens/query_width"])
    print(
        json.dumps(
            {
                "mode": args.child,
                "seconds": time.monotonic() - started,
                "rss_before_bytes": before,
                "peak_rss_bytes": peak,
                "training_rss_bytes": peak - before,
                "gpu_peak_bytes": torch.cuda.max_memory_allocated() if gpu else None,
                "estimate": estimate,
                "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                "response_length": metrics["response_length"],
                "query_width": metrics["tokens/query_width"],
                "threads": torch.get_num_threads(),
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1, help="PPO steps per mode (the peak is reached in the first)")
    parser.add_argument("--new-tokens", type=int, default=128, help="max_new_tokens (the seed's default 128)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="no", help="mixed_precision: no, bf16 or fp16 (GPU only)")
    parser.add_argument("--quick", action="store_true", help="16 new tokens (a smoke run, ~1 min)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.new_tokens = 16
    if args.child:
        child(args)
        return

    from bench_ppo_vs_trl import prepare_models

    info = common.machine()
    common.print_machine(info)
    model = prepare_models(["gpt2"], common.ROOT / ".rlhf" / "bench-models")["gpt2"]["policy"]
    rows = {}
    for mode in ("full", "lora"):
        command = [sys.executable, __file__, "--child", mode, "--model", model, "--steps", str(args.steps)]
        command += ["--new-tokens", str(args.new_tokens), "--device", args.device, "--precision", args.precision]
        print(f"running {mode} ...", flush=True)
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[mode] = json.loads(out.strip().splitlines()[-1])

    gb = 1024**3
    table = []
    for mode, row in rows.items():
        measured = row["gpu_peak_bytes"] if row["gpu_peak_bytes"] is not None else row["training_rss_bytes"]
        row["estimate_error"] = row["estimate"]["peak"] / measured - 1
        table.append(
            [
                mode,
                row["peak_rss_bytes"] / gb,
                row["training_rss_bytes"] / gb,
                (row["gpu_peak_bytes"] or 0) / gb,
                row["estimate"]["peak"] / gb,
                f"{row['estimate_error']:+.0%}",
                SEED_TABLE_GB[mode],
                row["seconds"],
            ]
        )
    print(f"\nPPO on a 124M GPT-2, batch 8, minibatch 4, {args.new_tokens} new tokens, {args.device}:")
    common.print_table(
        ["mode", "peak RSS GB", "training GB", "GPU peak GB", "dry-run GB", "estimate", "seed's table GB", "s"], table
    )
    measure = "gpu_peak_bytes" if args.device.startswith("cuda") else "training_rss_bytes"
    share = rows["lora"][measure] / rows["full"][measure]
    share_peak = rows["lora"]["peak_rss_bytes"] / rows["full"]["peak_rss_bytes"]
    worst = max((r["estimate_error"] for r in rows.values()), key=abs)
    print(
        f"\nLoRA / full: {share:.2f} of the training memory ({share_peak:.2f} of the whole process's peak); "
        f"goal <= {GOAL_LORA_SHARE:.2f}: {'MET' if share <= GOAL_LORA_SHARE else 'NOT MET'}"
    )
    print(
        f"dry-run estimate: worst error {worst:+.0%}; goal within +-{GOAL_ESTIMATE_ERROR:.0%}: "
        f"{'MET' if abs(worst) <= GOAL_ESTIMATE_ERROR else 'NOT MET'}"
    )
    common.write_results(
        "bench_memory",
        {
            "machine": info,
            "settings": vars(args) | {"batch": 8, "mini_batch": 4, "epochs": 4},
            "modes": rows,
            "lora_share_of_training_memory": share,
            "lora_share_of_peak_rss": share_peak,
            "goal_lora_share": GOAL_LORA_SHARE,
            "worst_estimate_error": worst,
        },
    )


if __name__ == "__main__":
    main()
