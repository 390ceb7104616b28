"""The GPU paths, run and measured on a CUDA card: PPO learning in bf16, PPO step time and peak memory in
fp32 and bf16, fp16 with its gradient scaler, reward-model training, and generation in float32 and bf16.

CI has no GPU; run this wherever one is lent (the figures and the card go to bench/README.md). Each part runs
in its own process with its own time limit, so one failure does not hide the others:

  * learning: the demo's learning task in-process (rlhf.sdk.learning_task) on the seed's LoRA defaults with
    only the learning rate and step count changed (tests/test_learning.py's settings), on the GPU with
    mixed_precision bf16: the held-out rater score of base and trained policy, and the KL;
  * ppo: PPO step time at the seed's defaults (batch 8, minibatch 4, 4 epochs, 128 new tokens) on the tiny
    model and on a randomly initialised GPT-2-small-sized (124M) model, full fine-tuning and LoRA r=8, fp32
    and bf16, with a local reward function (the policy's own cost); also the peak allocated GPU memory;
  * fp16: three PPO steps in fp16 (GradScaler) full and LoRA on the tiny model, and reward-model training in
    fp16 and bf16: everything finite;
  * generation: the inference engine (continuous batching) on the GPU in float32 and bf16, one request and 16
    concurrent ones, against one-at-a-time generation (the sequential engine), on both models;
  * memory: bench/bench_memory.py --device cuda in bf16 and fp32 (LoRA against full fine-tuning, the dry run's
    estimate);
  * sampling: PPO's rollout sampling on the fast GPT-2 path (rlhf.training.fast_decode) against the model's own
    forward, fp32 and bf16, both models: time per decoding step and whether one seed gives the same tokens.

    python bench/bench_gpu.py [--parts learning,ppo,fp16,generation,memory,sampling] [--steps 3] [--limit-scale 1]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings

import _common as common  # noqa: E402  (sets sys.path and the environment)

PARTS = ("learning", "ppo", "fp16", "generation", "memory", "sampling")
# The device every part runs on; RLHF_BENCH_DEVICE=cpu makes a (slow) smoke run of the script itself.
# Seconds each part may run before it counts as failed (a GPU takes a fraction of these).
LIMITS = {"learning": 150, "ppo": 180, "fp16": 60, "generation": 120, "memory": 150, "sampling": 120}
DEVICE = os.environ.get("RLHF_BENCH_DEVICE", "cuda")
GPU = DEVICE.startswith("cuda")
warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def _models(names: list[str]) -> dict[str, str]:
    from bench_ppo_vs_trl import prepare_models

    built = prepare_models(names, common.ROOT / ".rlhf" / "bench-models")
    return {name: built[name]["policy"] for name in names}


def part_learning(args: argparse.Namespace) -> dict:
    from rlhf.sdk import learning_task
    from rlhf.training.config import TrainingConfig

    model = _models(["tiny"])["tiny"]
    steps = 2 if args.smoke else 40
    config = TrainingConfig(learning_rate=3e-3, max_steps=steps, device=DEVICE, mixed_precision="bf16")
    with tempfile.TemporaryDirectory() as work:
        outcome = learning_task.run(model, config, pathlib.Path(work), device=DEVICE)
    kls = [m["objective/kl"] for m in outcome.steps]
    second_half = kls[len(kls) // 2 :]
    return {
        "settings": {"learning_rate": 3e-3, "max_steps": steps, "mixed_precision": "bf16", "use_lora": True},
        "base_score": outcome.base_score,
        "trained_score": outcome.trained_score,
        "gain": outcome.gain,
        "goal_gain": 0.3,
        "mean_kl_second_half": sum(second_half) / len(second_half),
        "target_kl": config.target_kl,
        "kl_coef_last": outcome.steps[-1]["kl_coef"],
        "reward_metrics": outcome.reward_metrics,
        "seconds": outcome.seconds,
    }


def _ppo_run(model: str, mode: str, precision: str, steps: int, new_tokens: int) -> dict:
    import torch

    from rlhf.training import corpus
    from rlhf.training.config import TrainingConfig
    from rlhf.training.ppo_trainer import PPOTrainer

    if GPU:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = TrainingConfig(
        use_lora=mode == "lora",
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=4,
        max_new_tokens=new_tokens,
        device=DEVICE,
        mixed_precision=precision,
        seed=0,
    )
    trainer = PPOTrainer(config, model, DEVICE)
    prompts = corpus.prompts(config.batch_size * (steps + 1), seed=0)
    timed = []
    for i in range(steps + 1):
        if GPU:
            torch.cuda.synchronize()
        started = time.perf_counter()
        metrics = trainer.step_on(prompts[i * 8 : (i + 1) * 8], lambda _p, responses: [len(r) / 100 for r in responses])
        if GPU:
            torch.cuda.synchronize()
        if i:
            timed.append({"step_s": time.perf_counter() - started, "response_length": metrics["response_length"]})
        if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
            raise RuntimeError(f"non-finite metrics in {mode} {precision}: {metrics}")
    step_s = common.median([t["step_s"] for t in timed])
    length = common.median([t["response_length"] for t in timed])
    row = {
        "step_s_median": step_s,
        "step_s_min": min(t["step_s"] for t in timed),
        "response_length": length,
        "response_tokens_per_s": 8 * length / step_s,
        "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1024**3 if GPU else None,
    }
    del trainer
    return row


def part_ppo(args: argparse.Namespace) -> dict:
    models = _models(["tiny"] if args.smoke else ["tiny", "gpt2"])
    new_tokens = 8 if args.smoke else 128
    rows = {}
    for name, path in models.items():
        for mode in ("full", "lora"):
            for precision in ("no", "bf16"):
                key = f"{name}/{mode}/{'fp32' if precision == 'no' else precision}"
                rows[key] = _ppo_run(path, mode, precision, args.steps, new_tokens)
                print(key, json.dumps(rows[key]), flush=True)
    for name in models:
        for mode in ("full", "lora"):
            base, fast = rows[f"{name}/{mode}/fp32"], rows[f"{name}/{mode}/bf16"]
            fast["speedup_over_fp32"] = base["step_s_median"] / fast["step_s_median"]
    return {
        "settings": {"batch": 8, "mini_batch": 4, "epochs": 4, "new_tokens": new_tokens, "steps": args.steps},
        "rows": rows,
    }


def part_fp16(args: argparse.Namespace) -> dict:
    from rlhf.sdk import learning_task, rater
    from rlhf.training import corpus
    from rlhf.training.reward_training import Rating, train_reward_model

    model = _models(["tiny"])["tiny"]
    out: dict = {"ppo": {}, "reward": {}}
    for mode in ("full", "lora"):
        out["ppo"][mode] = _ppo_run(model, mode, "fp16", 2, 64)
    sampled = learning_task.answers(model, list(corpus.QUESTIONS)[:8], 8, 32, seed=1, device=DEVICE)
    rated = [Rating(prompt, text, rater.rate(text)) for prompt, text in sampled if text.strip()]
    for precision in ("fp16", "bf16"):
        config = dataclasses.replace(learning_task.REWARD_CONFIG, device=DEVICE, mixed_precision=precision)
        with tempfile.TemporaryDirectory() as work:
            result = train_reward_model(rated, config, model, pathlib.Path(work))
        metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
        if not all(math.isfinite(v) for v in metrics.values()):
            raise RuntimeError(f"non-finite reward metrics in {precision}: {metrics}")
        out["reward"][precision] = metrics
    return out


async def _generate_all(engine, prompts: list[str], params) -> tuple[float, int]:
    started = time.perf_counter()
    results = await asyncio.gather(*(engine.submit(p, params).result() for p in prompts))
    return time.perf_counter() - started, sum(r.completion_tokens for r in results)


def part_generation(args: argparse.Namespace) -> dict:
    from inference_service.engine import BatchingEngine, SequentialEngine
    from inference_service.generation import SamplingParams
    from inference_service.models import load_for_inference
    from rlhf.training import corpus

    prompts = corpus.prompts(16, seed=3)
    params = SamplingParams(max_new_tokens=64, temperature=5.0, top_k=0, seed=1)  # near-uniform: full length
    rows = {}
    for name, path in _models(["tiny"] if args.smoke else ["tiny", "gpt2"]).items():
        for dtype in ("float32", "bf16"):
            loaded = load_for_inference(path, DEVICE, dtype)
            batching, sequential = BatchingEngine(loaded, 32), SequentialEngine(loaded)
            asyncio.run(_generate_all(batching, prompts[:2], params))  # warm-up
            lone_s, lone_tokens = asyncio.run(_generate_all(batching, prompts[:1], params))
            many_s, many_tokens = asyncio.run(_generate_all(batching, prompts, params))
            started, seq_tokens = time.perf_counter(), 0
            for prompt in prompts:
                seq_tokens += asyncio.run(_generate_all(sequential, [prompt], params))[1]
            seq_s = time.perf_counter() - started
            rows[f"{name}/{dtype}"] = {
                "lone_tokens_per_s": lone_tokens / lone_s,
                "batched_16_tokens_per_s": many_tokens / many_s,
                "one_at_a_time_16_tokens_per_s": seq_tokens / seq_s,
                "batched_over_one_at_a_time": (many_tokens / many_s) / (seq_tokens / seq_s),
            }
            print(name, dtype, json.dumps(rows[f"{name}/{dtype}"]), flush=True)
    return {"settings": {"requests": 16, "max_new_tokens": 64, "temperature": 5.0}, "rows": rows}


def part_memory(args: argparse.Namespace) -> dict:
    out = {}
    for precision in ("bf16", "no"):
        command = [sys.executable, str(common.ROOT / "bench" / "bench_memory.py"), "--device", DEVICE]
        command += ["--precision", precision] + (["--quick"] if args.smoke else [])
        subprocess.run(command, check=True)
        out[precision] = json.loads((common.RESULTS / "bench_memory.json").read_text())
    return out


def _timed_sample(model, prompts: list[list[int]], new_tokens: int, precision: str, fast: bool):
    """One call of sequences.sample at temperature 1 with a fixed seed: (seconds, what it sampled)."""
    import contextlib

    import torch

    from rlhf.training import sequences

    generator = torch.Generator(device=DEVICE).manual_seed(11)
    bf16 = torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16)
    if GPU:
        torch.cuda.synchronize()
    started = time.perf_counter()
    autocast = bf16 if precision == "bf16" else contextlib.nullcontext()
    out = sequences.sample(model, prompts, new_tokens, 1.0, set(), 0, generator, autocast, True, fast=fast)
    if GPU:
        torch.cuda.synchronize()
    return time.perf_counter() - started, out


def part_sampling(args: argparse.Namespace) -> dict:
    """PPO's rollout sampling (sequences.sample) on the fast GPT-2 path against the model's own forward: the
    same seed on both, so the tokens should match; where GPU kernels round differently they may part ways,
    and the row says at which step and how far the log-probs of the shared prefix differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.training import corpus, fast_decode, sequences

    new_tokens = 8 if args.smoke else 128
    rows = {}
    for name, path in _models(["tiny"] if args.smoke else ["tiny", "gpt2"]).items():
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompts = [sequences.encode_prompt(tokenizer, p) for p in corpus.prompts(8, seed=5)]
        model = AutoModelForCausalLM.from_pretrained(path).to(DEVICE).eval()
        assert fast_decode.refusal(model) is None, fast_decode.refusal(model)
        for precision in ("fp32", "bf16"):
            timings: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(3):  # interleaved; the first round warms up
                for fast in (False, True):
                    timings[fast].append(_timed_sample(model, prompts, new_tokens, precision, fast)[0])
            generic = _timed_sample(model, prompts, new_tokens, precision, False)[1]
            fast_out = _timed_sample(model, prompts, new_tokens, precision, True)[1]
            same = (generic.response == fast_out.response).all(0)
            parted = int((~same).nonzero()[0]) if not bool(same.all()) else None
            shared = slice(0, parted if parted is not None else generic.response.shape[1])
            steps = generic.response.shape[1]
            generic_s, fast_s = common.median(timings[False][1:]), common.median(timings[True][1:])
            rows[f"{name}/{precision}"] = {
                "steps": steps,
                "generic_ms_per_step": 1000 * generic_s / steps,
                "fast_ms_per_step": 1000 * fast_s / steps,
                "speedup": generic_s / fast_s,
                "same_tokens": parted is None,
                "first_differing_step": parted,
                "logprob_max_diff_shared": float((generic.logprobs - fast_out.logprobs)[:, shared].abs().max()),
            }
            print(name, precision, json.dumps(rows[f"{name}/{precision}"]), flush=True)
        del model
    return {"settings": {"batch": 8, "new_tokens": new_tokens, "temperature": 1.0}, "rows": rows}


def run_part(name: str, args: argparse.Namespace) -> None:
    import torch

    if GPU and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    started = time.monotonic()
    result = globals()[f"part_{name}"](args)
    result["seconds_total"] = time.monotonic() - started
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"bench_gpu_{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps per case after one warm-up (3)")
    parser.add_argument("--limit-scale", type=float, default=1.0, help="multiplies each part's time limit")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (e.g. on a CPU)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        run_part(args.part, args)
        return

    import torch

    if GPU and not torch.cuda.is_available():
        # `make bench` runs every benchmark; without a GPU this one has nothing to measure.
        print(
            "SKIPPED: no CUDA device here. On a GPU machine: python bench/bench_gpu.py; to check the script on "
            "a CPU: RLHF_BENCH_DEVICE=cpu python bench/bench_gpu.py --smoke"
        )
        return
    info = common.machine()
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["transformers"] = __import__("transformers").__version__
    common.print_machine(info)
    print(f"gpu: {info['gpu']}", flush=True)
    summary: dict = {"machine": info, "parts": {}}
    for name in args.parts.split(","):
        print(f"\n=== {name} ===", flush=True)
        command = [sys.executable, __file__, "--part", name, "--steps", str(args.steps)]
        command += ["--smoke"] if args.smoke else []
        started = time.monotonic()
        try:
            code = subprocess.run(command, timeout=LIMITS[name] * args.limit_scale).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        path = common.RESULTS / f"bench_gpu_{name}.json"
        ok = code == 0 and path.exists()
        summary["parts"][name] = json.loads(path.read_text()) if ok else {"failed": code}
        print(f"=== {name}: {'ok' if ok else f'FAILED ({code})'} in {time.monotonic() - started:.0f}s", flush=True)
    print(json.dumps({k: v for k, v in summary["parts"].get("learning", {}).items() if k != "reward_metrics"}))
    common.write_results("bench_gpu", summary)


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
