"""GRPO with every reward from our reward service over gRPC, against TRL's GRPO with a local reward function that
computes the same scores in-process: the cost of the service boundary (and of our wrapper around TRL).

Setup: a feedback server and a reward server, each in its own process; 60 synthetic ratings are submitted and a
reward model is trained on them through the real services (full fine-tune, 1 epoch, batch 16, lr 5e-4). Then,
in this process, on the tiny model with LoRA (the seed's r 8, alpha 32), 8 prompts x 8 generations a step, 32
new tokens, TRL 1.16's GRPO defaults otherwise:
  * ours: rlhf.training.trl_trainers.GroupPolicyTrainer (what the policy worker runs) with the worker's reward
    function: one `RewardClient.score` (ScoreBatch) call per generated batch;
  * baseline, same run: TRL's own `GRPOTrainer`, built with the same TRL arguments, with a local reward
    function: the same reward model loaded in this process (`rlhf.training.scoring.reward_function`), so both
    sides optimise the same scores;
  * and, to split the overhead in two, our trainer with that local reward function.
Rounds are interleaved (the sides' order rotates each round), each a fresh trainer with the same seed: one warm-up
step, then --steps timed steps (wall time from TRL's on_step_begin to on_step_end: generation, scoring, loss,
backward, optimiser). Reported: min and median seconds per step of each side, the overhead (median ours /
median TRL - 1) and the share of our step spent in ScoreBatch. Roadmap goal: overhead <= 10%.

    python bench/bench_grpo_overhead.py [--quick] [--rounds 4] [--steps 5] [--generations 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import pathlib
import time
import warnings

import _common as common  # noqa: E402  (sets sys.path and the environment)

GOAL_OVERHEAD = 0.10
OURS = "ours (gRPC rewards)"
WRAPPER = "ours (local rewards)"
TRL = "TRL (local rewards)"
warnings.filterwarnings("ignore", category=UserWarning)  # peft's fan_in_fan_out note, TRL's CPU notes
warnings.filterwarnings("ignore", category=FutureWarning)


def step_timer():
    """A TrainerCallback that records each optimiser step's wall time."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._started)

    return Timer()


def run_ours(config, model_path: str, prompts: list[str], score, work: pathlib.Path) -> list[float]:
    from rlhf.training.trl_trainers import GroupPolicyTrainer

    trainer = GroupPolicyTrainer("grpo", config, model_path, work, "cpu")
    timer = step_timer()
    trainer.train(prompts, score, lambda step, metrics: None, resume=False, callbacks=[timer])
    return timer.seconds


def run_trl(
    config, model_path: str, prompts: list[str], local, work: pathlib.Path, local_seconds: list[float]
) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOTrainer

    from rlhf.training.threads import use_cpu_threads
    from rlhf.training.trl_trainers import _trl_arguments

    tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path)
    # The threads ours runs with (one for the tiny model), and its memory setting.
    use_cpu_threads(model, config.cpu_threads, "cpu", config.use_lora)

    def reward_model(prompts, completions, **_):
        started = time.perf_counter()
        scores = local(prompts, completions).scores
        local_seconds.append(time.perf_counter() - started)
        return scores

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_model,
        args=_trl_arguments("grpo", config, work, "cpu"),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.1),
    )
    trainer.remove_callback(PrinterCallback)
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 2 timed steps (a smoke run)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per side (default 4)")
    parser.add_argument("--steps", type=int, help="timed steps per round after one warm-up (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step (default 8)")
    parser.add_argument("--generations", type=int, default=8, help="answers per prompt (default 8, TRL's)")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per answer (default 32)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 4)
    args.steps = args.steps or (2 if args.quick else 5)

    info = common.machine()
    common.print_machine(info)
    model_path, model_s = common.ensure_tiny_model()

    from rlhf.sdk.clients import RewardClient
    from rlhf.training import corpus
    from rlhf.training.config import GRPOTrainingConfig
    from rlhf.training.scoring import Scores, fill_unscorable, reward_function

    config = GRPOTrainingConfig(
        batch_size=args.batch,
        num_generations=args.generations,
        max_new_tokens=args.new_tokens,
        max_steps=args.steps + 1,
        learning_rate=1e-5,
        device="cpu",
        seed=0,
    )
    prompts = list(corpus.QUESTIONS)
    sides: dict[str, list[float]] = {OURS: [], WRAPPER: [], TRL: []}
    score_seconds: list[float] = []  # our ScoreBatch calls
    local_seconds: list[float] = []  # TRL's side: the same reward model in-process
    with (
        common.reward_stack("grpo") as (reward_server, version, reward_path, train_s),
        common.scratch_dir("grpo") as work,
    ):
        print(
            f"setup: tiny model {model_s:.1f}s, reward model {version} trained through the services in "
            f"{train_s:.1f}s; GRPO on cpu, {args.batch} prompts x {args.generations} answers, "
            f"{args.new_tokens} new tokens, LoRA",
            flush=True,
        )
        local = reward_function(reward_path, "cpu")
        with RewardClient(reward_server.address, timeout=60) as client:

            def grpc_score(batch_prompts: list[str], answers: list[str]) -> Scores:
                # As policy_service.worker does: one ScoreBatch per generated batch; unscorable -> batch floor.
                started = time.perf_counter()
                answer = client.score("bench", list(zip(batch_prompts, answers, strict=False)), version=version)
                score_seconds.append(time.perf_counter() - started)
                return Scores(
                    fill_unscorable([s.score if s.ok else None for s in answer.scores]),
                    fill_unscorable([s.rating if s.ok else None for s in answer.scores]),
                )

            runners = {
                OURS: lambda folder: run_ours(config, str(model_path), prompts, grpc_score, folder),
                WRAPPER: lambda folder: run_ours(config, str(model_path), prompts, local, folder),
                TRL: lambda folder: run_trl(config, str(model_path), prompts, local, folder, local_seconds),
            }
            names = list(runners)
            for round_ in range(args.rounds):
                shift = round_ % len(names)  # each side runs first, second and last in turn
                for name in names[shift:] + names[:shift]:
                    seconds = runners[name](work / f"{len(sides[name])}-{name.split()[0]}-{round_}")
                    sides[name] += seconds[1:]  # the first step warms up
                    print(f"round {round_ + 1} {name:28s}: " + " ".join(f"{s:.3f}" for s in seconds[1:]), flush=True)

    ours, wrapper, trl = sides[OURS], sides[WRAPPER], sides[TRL]
    overhead = common.median(ours) / common.median(trl) - 1
    overhead_min = min(ours) / min(trl) - 1
    # The parts: our wrapper around TRL (same local rewards), then the service boundary (same wrapper).
    wrapper_share = common.median(wrapper) / common.median(trl) - 1
    transport_share = common.median(ours) / common.median(wrapper) - 1
    score_share = common.median(score_seconds) / common.median(ours)
    rows = [[name, min(values), common.median(values), len(values)] for name, values in sides.items()]
    common.print_table(["side", "min s/step", "median s/step", "steps"], rows)
    print(
        f"overhead: median {100 * overhead:+.1f}%, min {100 * overhead_min:+.1f}%; ScoreBatch "
        f"{1000 * common.median(score_seconds):.1f} ms = {100 * score_share:.1f}% of our median step; the "
        f"local reward function {1000 * common.median(local_seconds):.1f} ms"
    )
    print(
        f"of which: our wrapper (local rewards both) {100 * wrapper_share:+.1f}%, rewards over gRPC "
        f"(our wrapper both) {100 * transport_share:+.1f}%"
    )
    met = overhead <= GOAL_OVERHEAD
    print(f"goal: overhead <= {100 * GOAL_OVERHEAD:.0f}%: {'met' if met else 'NOT met'}")
    common.write_results(
        "bench_grpo_overhead",
        {
            "machine": info,
            "settings": {**vars(args), "lora": True, "model": "rlhf-tiny", "trl": __import__("trl").__version__},
            "seconds_per_step": sides,
            "score_batch_seconds": score_seconds,
            "local_reward_seconds": local_seconds,
            "median_overhead": overhead,
            "min_overhead": overhead_min,
            "wrapper_overhead": wrapper_share,
            "transport_overhead": transport_share,
            "score_share_of_step": score_share,
            "goal_overhead": GOAL_OVERHEAD,
            "goal_met": met,
        },
    )


if __name__ == "__main__":
    main()
