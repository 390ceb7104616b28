"""PPO update steps per second: our trainer (rewards over gRPC) against TRL 1.12's PPOTrainer.

Both sides run the same PPO step (sample a rollout batch, score it, reference log-probs and values, GAE,
then `epochs` passes of clipped-PPO updates over `batch / mini_batch` minibatches, one optimiser step per
minibatch) at the same model, batch size, new tokens, PPO epochs, minibatches, temperature 1.0, learning
rate and seed, in fp32 on the CPU:

  * ours: rlhf.training.ppo_trainer.PPOTrainer in this process; every rollout batch is scored by one
    `ScoreBatch` call to a reward service in its own process (`python -m reward_service`), as the policy
    worker does;
  * TRL: trl.experimental.ppo.PPOTrainer (TRL 1.12.0) in a subprocess run by TRL's own interpreter
    (--trl-python; the project never imports TRL), scoring in-process with the same reward-model folder.

Models: (a) the project's tiny model (rlhf-tiny, full fine-tuning); (b) a randomly initialised
GPT-2-small-sized model (GPT2Config defaults: 124M parameters, 12 layers, width 768, vocabulary 50,257,
1,024 positions) with a byte-level BPE tokenizer trained here to exactly 50,257 ids, full fine-tuning and
LoRA (r=8, alpha=32, dropout 0, peft's default GPT-2 target c_attn). The reward model of each is the base
model as AutoModelForSequenceClassification (num_labels=1, seeded random score head), saved once; our
reward service has that folder registered, TRL loads it as its reward model and (as TRL's own example
does) as the starting point of its value model. Models are built once into --models-dir.

Each round runs a fresh trainer on each side, ours then TRL, alternating; each run does one warm-up
step and then --steps timed steps. Reported per (model, mode): wall seconds per PPO step (min and median
over all timed steps of all rounds), TRL / ours (our speed-up); beside it CPU seconds per step (ours:
this process + the reward server), the share of our step spent waiting for rewards
(time/score_wait_s / time/step_s), the share of TRL's step in its own gc.collect() calls, response
lengths and trainable parameters.
Goals (the issue "Training you can trust"): >= 8x TRL on the tiny model; >= 1.5x (full) and >= 2x (LoRA)
on the 124M model; reward waiting <= 5% of our step.

    python bench/bench_ppo_vs_trl.py [--quick] [--models tiny,gpt2] [--rounds N] [--threads N]
                                     [--trl-python PATH]   (default bench/.trl-venv/bin/python)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import pathlib
import random
import subprocess
import sys
import time
import warnings

import _common as common  # noqa: E402  (sets sys.path and the environment)

GOALS = {("tiny", "full"): 8.0, ("gpt2", "full"): 1.5, ("gpt2", "lora"): 2.0}
GOAL_REWARD_SHARE = 0.05
MODELS_VERSION = 1  # bump when the recipes below change so the cached folders rebuild
DEFAULT_TRL_PYTHON = os.environ.get(
    "RLHF_BENCH_TRL_PYTHON", str(common.ROOT / "bench" / ".trl-venv" / "bin" / "python")
)
warnings.filterwarnings("ignore", category=UserWarning, module="peft")  # fan_in_fan_out note on GPT-2's Conv1D
warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


@dataclasses.dataclass
class Case:
    model: str  # "tiny" or "gpt2"
    mode: str  # "full" or "lora"
    batch: int
    mini_batch: int
    epochs: int
    new_tokens: int

    @property
    def name(self) -> str:
        return f"{self.model}/{self.mode}"


LORA = {"r": 8, "alpha": 32, "dropout": 0.0}


# --- models -------------------------------------------------------------------------------------------------


def build_gpt2_small(folder: pathlib.Path, seed: int = 0) -> None:
    """A randomly initialised GPT-2-small-sized model and a byte-level BPE tokenizer with exactly its 50,257
    ids, trained (~5 s) on the project's corpus plus generated pseudo-words: every id the model can sample
    decodes to text, prompts tokenize as ordinary words, and the LM head has GPT-2's full width."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.training.corpus import documents
    from rlhf.training.tinymodel import gpt2_style_tokenizer

    vocab = GPT2Config().vocab_size  # 50,257
    rng = random.Random(seed)
    consonants = "b c d f g h j k l m n p r s t v w z ch sh th st tr br pl gr".split()
    vowels = "a e i o u ai ea oo ou ie".split()
    syllables = [c + v for c in consonants for v in vowels] + [
        c + v + e for c in consonants for v in vowels for e in "nrstlm"
    ]
    words = ["".join(rng.choice(syllables) for _ in range(min(int(rng.paretovariate(1.2)), 4))) for _ in range(200_000)]
    lines = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(40_000)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        documents(6000, seed=seed) + lines,
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        show_progress=False,
    )
    if bpe.get_vocab_size() != vocab:
        raise RuntimeError(f"the tokenizer has {bpe.get_vocab_size()} ids, not {vocab}")
    tokenizer = gpt2_style_tokenizer(bpe, GPT2Config().n_positions)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_reward_model(base: pathlib.Path, folder: pathlib.Path, seed: int = 0) -> None:
    """`base` as AutoModelForSequenceClassification (num_labels=1, seeded random score head), with its
    tokenizer: the reward model both sides score with."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the last real token is scored in a padded batch
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def cached(folder: pathlib.Path, build) -> pathlib.Path:
    """`folder`, built by `build(tmp)` first if absent (written to a temporary folder, then renamed)."""
    if not (folder / "config.json").exists():
        import shutil

        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        tmp.rename(folder)
    return folder


def prepare_models(models: list[str], models_dir: pathlib.Path) -> dict[str, dict[str, str]]:
    """{model: {"policy": folder, "reward": folder}} for each of `models`."""
    found: dict[str, dict[str, str]] = {}
    for model in models:
        started = time.monotonic()
        if model == "tiny":
            base, _ = common.ensure_tiny_model()
        else:
            base = cached(models_dir / f"gpt2-small-random-v{MODELS_VERSION}", build_gpt2_small)
        reward = cached(
            models_dir / f"{base.name}-reward-v{MODELS_VERSION}", lambda t, b=base: build_reward_model(b, t)
        )
        found[model] = {"policy": str(base), "reward": str(reward)}
        print(
            f"model {model}: {base} (reward model {reward.name}) ready in {time.monotonic() - started:.1f}s", flush=True
        )
    return found


def register_reward_models(data_dir: pathlib.Path, folders: dict[str, str]) -> None:
    """Register each reward-model folder in the reward service's registry (its own code and database, as
    tests/test_cli.py seeds registries) before the server starts: agent `bench-<model>`, version v1."""
    from rlhf.runtime.config import ServerConfig
    from rlhf.runtime.db import make_engine
    from rlhf.runtime.training_store import TrainingStore

    data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(ServerConfig.from_env("reward", data_dir=data_dir).resolved_database_url())
    registry = TrainingStore(engine, "reward_models", "reward model").registry
    for model, folder in folders.items():
        registry.register(f"bench-{model}", lambda _n, f=folder: f, "bench", {"source": "bench_ppo_vs_trl"})
    engine.dispose()


# --- one run on each side ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (/proc, 10 ms ticks)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_ours(case: Case, paths: dict[str, str], client, server_pid: int, warmup: int, steps: int) -> dict:
    from rlhf.training import corpus
    from rlhf.training.config import TrainingConfig
    from rlhf.training.ppo_trainer import PPOTrainer
    from rlhf.training.scoring import Scores, fill_unscorable

    agent = f"bench-{case.model}"

    calls: list[float] = []

    def score(prompts: list[str], responses: list[str]) -> Scores:
        # As policy_service.worker does: one ScoreBatch per rollout batch; unscorable -> the batch's floor.
        started = time.perf_counter()
        answer = client.score(agent, list(zip(prompts, responses, strict=True)), version="v1")
        calls.append(time.perf_counter() - started)  # the whole call, most of it overlapped by the trainer
        return Scores(
            fill_unscorable([s.score if s.ok else None for s in answer.scores]),
            fill_unscorable([s.rating if s.ok else None for s in answer.scores]),
        )

    config = TrainingConfig(
        use_lora=case.mode == "lora",
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        batch_size=case.batch,
        mini_batch_size=case.mini_batch,
        ppo_epochs=case.epochs,
        max_new_tokens=case.new_tokens,
        temperature=1.0,
        learning_rate=1e-5,
        max_steps=warmup + steps,
        device="cpu",
        seed=0,
    )
    started = time.perf_counter()
    trainer = PPOTrainer(config, paths["policy"], "cpu")
    setup_s = time.perf_counter() - started
    prompts = corpus.prompts(case.batch * (warmup + steps), seed=0)
    rows = []
    for i in range(warmup + steps):
        cpu, server_cpu = time.process_time(), cpu_seconds(server_pid)
        started = time.perf_counter()
        metrics = trainer.step_on(prompts[i * case.batch : (i + 1) * case.batch], score)
        wall = time.perf_counter() - started
        cpu, server_cpu = time.process_time() - cpu, cpu_seconds(server_pid) - server_cpu
        rows.append(
            {
                "wall_s": wall,
                # CPU seconds of this process (every thread) and of the reward server during the step
                "cpu_s": cpu + server_cpu,
                "server_cpu_s": server_cpu,
                "step_s": metrics["time/step_s"],
                "rollout_and_score_s": metrics["time/rollout_and_score_s"],
                "score_wait_s": metrics["time/score_wait_s"],
                "score_call_s": calls[-1],
                "response_length": metrics["response_length"],
            }
        )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    del trainer
    gc.collect()
    return {"setup_s": setup_s, "warmup": rows[:warmup], "steps": rows[warmup:], "trainable_parameters": trainable}


def run_trl(case: Case, paths: dict[str, str], prompt_ids: list[list[int]], warmup: int, steps: int, args) -> dict:
    with common.scratch_dir("trl") as folder:
        spec = {
            "policy_path": paths["policy"],
            "reward_path": paths["reward"],
            "prompt_ids": prompt_ids,
            "batch": case.batch,
            "mini_batch": case.mini_batch,
            "epochs": case.epochs,
            "new_tokens": case.new_tokens,
            "lora": LORA if case.mode == "lora" else None,
            "learning_rate": 1e-5,
            "seed": 0,
            "warmup": warmup,
            "steps": steps,
            "output_dir": str(folder / "out"),
        }
        (folder / "spec.json").write_text(json.dumps(spec))
        env = {
            k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
        }  # TRL's interpreter sees nothing of ours
        env.update(HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", HF_DATASETS_OFFLINE="1")
        log = folder / "trl.log"
        with open(log, "wb") as out:
            code = subprocess.call(
                [args.trl_python, str(common.ROOT / "bench" / "_trl_ppo.py"), "spec.json", "result.json"],
                cwd=folder,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if code != 0:
            sys.stderr.write(log.read_text(errors="replace")[-6000:])
            raise RuntimeError(f"TRL run failed with exit code {code} (log above)")
        result = json.loads((folder / "result.json").read_text())
    result["warmup_s"] = result["step_s"][:warmup]
    result["steps_s"] = result["step_s"][warmup:]
    result["steps_gc_s"] = result["gc_s"][warmup:]
    result["steps_cpu_s"] = result["cpu_s"][warmup:]
    result["steps_response_length"] = result["response_length"][warmup:]
    return result


# --- main -------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model only, 2 rounds of 2 timed steps")
    parser.add_argument("--models", help="comma-separated: tiny, gpt2 (default both; --quick: tiny)")
    parser.add_argument("--rounds", type=int, help="fresh-trainer rounds per side and case (default 3; --quick 2)")
    parser.add_argument("--steps", type=int, help="timed steps per round on the tiny model (default 5; --quick 2)")
    parser.add_argument("--gpt2-steps", type=int, default=3, help="timed steps per round on the 124M model (3)")
    parser.add_argument(
        "--trl-python", default=DEFAULT_TRL_PYTHON, help="TRL's interpreter (env RLHF_BENCH_TRL_PYTHON)"
    )
    parser.add_argument(
        "--models-dir",
        type=pathlib.Path,
        default=common.ROOT / ".rlhf" / "bench-models",
        help="where the 124M model and the reward models are built once (default .rlhf/bench-models)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op threads on both sides and in the reward server (OMP_NUM_THREADS; default: one per core)",
    )
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads here; inherited by the subprocesses
    models = (args.models or ("tiny" if args.quick else "tiny,gpt2")).split(",")
    rounds = args.rounds or (2 if args.quick else 3)
    tiny_steps = args.steps or (2 if args.quick else 5)

    if not pathlib.Path(args.trl_python).exists():
        print(
            f"SKIPPED: no TRL interpreter at {args.trl_python}. Create it with `make bench-trl-venv` (or "
            f"`python3 -m venv bench/.trl-venv && bench/.trl-venv/bin/pip install torch==2.13.0 trl==1.12.0 peft`) "
            f"or pass --trl-python / RLHF_BENCH_TRL_PYTHON."
        )
        return
    info = common.machine()
    common.print_machine(info)
    trl_version = subprocess.run(
        [
            args.trl_python,
            "-c",
            "import trl, torch, transformers; print(trl.__version__, torch.__version__, transformers.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"},
    ).stdout.split()
    import transformers

    print(
        f"TRL side: {args.trl_python}: trl {trl_version[0]}, torch {trl_version[1]}, transformers {trl_version[2]}; "
        f"ours: transformers {transformers.__version__}",
        flush=True,
    )

    cases = []
    if "tiny" in models:
        cases.append(Case("tiny", "full", batch=16, mini_batch=4, epochs=4, new_tokens=32))
    if "gpt2" in models:
        cases.append(Case("gpt2", "full", batch=4, mini_batch=2, epochs=2, new_tokens=16))
        cases.append(Case("gpt2", "lora", batch=4, mini_batch=2, epochs=2, new_tokens=16))
    paths = prepare_models(models, args.models_dir)

    from transformers import AutoTokenizer

    from rlhf.sdk.clients import RewardClient
    from rlhf.training import corpus, sequences

    results = []
    with common.scratch_dir("ppo-vs-trl") as data_dir:
        register_reward_models(data_dir / "reward", {m: p["reward"] for m, p in paths.items()})
        with (
            common.ServerProcess("reward_service", data_dir / "reward") as reward,
            RewardClient(reward.address, timeout=120) as client,
        ):
            for case in cases:
                steps = tiny_steps if case.model == "tiny" else args.gpt2_steps
                tokenizer = AutoTokenizer.from_pretrained(paths[case.model]["policy"])
                # The same prompts, encoded as our trainer encodes them, for TRL's dataset.
                prompt_ids = [
                    sequences.encode_prompt(tokenizer, p) for p in corpus.prompts(case.batch * (1 + steps), seed=0)
                ]
                row = {"case": dataclasses.asdict(case), "ours": [], "trl": []}
                for r in range(rounds):
                    ours = run_ours(case, paths[case.model], client, reward.process.pid, warmup=1, steps=steps)
                    row["ours"].append(ours)
                    trl = run_trl(case, paths[case.model], prompt_ids, warmup=1, steps=steps, args=args)
                    row["trl"].append(trl)
                    print(
                        f"{case.name} round {r + 1}/{rounds}: ours "
                        + " ".join(f"{s['wall_s']:.2f}" for s in ours["steps"])
                        + " s | TRL "
                        + " ".join(f"{s:.2f}" for s in trl["steps_s"])
                        + f" s  (warm-up ours {ours['warmup'][0]['wall_s']:.2f}, TRL {trl['warmup_s'][0]:.2f}; "
                        f"load avg {os.getloadavg()[0]:.2f})",
                        flush=True,
                    )
                results.append(summarise(row))

    label = {"tiny": "rlhf-tiny", "gpt2": "GPT-2-small 124M"}
    print("\nwall seconds per PPO step (rollout + update), min / median over all timed steps; TRL/ours = our speed-up")
    common.print_table(
        ["model", "mode", "batch x new tokens", "epochs x minibatches", "ours min", "ours median", "TRL min"]
        + ["TRL median", "TRL/ours (median)", "TRL/ours (min)", "goal", "met?"],
        [
            [label[r["model"]], r["mode"], r["shape"][0], r["shape"][1], r["ours_min"], r["ours_median"]]
            + [r["trl_min"], r["trl_median"], r["speedup"], r["speedup_min"], f">= {r['goal']:g}x"]
            + ["yes" if r["met"] else "NO"]
            for r in results
        ],
    )
    print(
        "\nbeside it (medians over the timed steps): CPU seconds per step (ours: this process + the reward "
        "server; TRL: its process),\nour reward wait (time/score_wait_s / time/step_s) and the ScoreBatch call "
        "it overlaps, TRL's share in its own gc.collect() calls,\nmean response length (tokens through the first "
        "EOS), trainable parameters"
    )
    common.print_table(
        ["model", "mode", "ours CPU s", "TRL CPU s", "TRL/ours (CPU)", "reward wait %", "ScoreBatch ms"]
        + ["TRL gc %", "resp len ours/TRL", "trainable ours", "trainable TRL"],
        [
            [label[r["model"]], r["mode"], r["ours_cpu"], r["trl_cpu"], r["speedup_cpu"], 100 * r["reward_share"]]
            + [1000 * r["score_call_s"], 100 * r["trl_gc_share"]]
            + [f"{r['response_length']['ours']:.1f}/{r['response_length']['trl']:.1f}"]
            + [f"{r['trainable_parameters']['ours']:,}", f"{r['trainable_parameters']['trl']:,}"]
            for r in results
        ],
    )
    share_met = all(r["reward_share"] <= GOAL_REWARD_SHARE for r in results)
    worst = max(r["reward_share"] for r in results)
    print(
        f"\ngoal: waiting for rewards <= {100 * GOAL_REWARD_SHARE:.0f}% of our step: "
        f"{'MET' if share_met else 'NOT MET'} (worst {100 * worst:.2f}%)"
    )
    for r in results:
        print(
            f"goal {r['model']}/{r['mode']}: >= {r['goal']}x TRL: {'MET' if r['met'] else 'NOT MET'} "
            f"({r['speedup']:.2f}x on medians)"
        )
    common.write_results(
        "ppo_vs_trl",
        {
            "benchmark": "ppo_vs_trl",
            "machine": info,
            "trl": {"python": args.trl_python, "versions": trl_version},
            "rounds": rounds,
            "timed_steps_per_round": {"tiny": tiny_steps, "gpt2": args.gpt2_steps},
            "warmup_steps_per_round": 1,
            "models": paths,
            "results": results,
            "goal": {"speedups": {f"{m}/{k}": v for (m, k), v in GOALS.items()}, "max_reward_share": GOAL_REWARD_SHARE},
        },
    )


def summarise(row: dict) -> dict:
    case = row["case"]
    ours = [s["wall_s"] for run in row["ours"] for s in run["steps"]]
    trl = [s for run in row["trl"] for s in run["steps_s"]]
    ours_cpu = [s["cpu_s"] for run in row["ours"] for s in run["steps"]]
    trl_cpu = [s for run in row["trl"] for s in run["steps_cpu_s"]]
    waits = [s["score_wait_s"] / s["step_s"] for run in row["ours"] for s in run["steps"]]
    calls = [s["score_call_s"] for run in row["ours"] for s in run["steps"]]
    lengths = [s["response_length"] for run in row["ours"] for s in run["steps"]]
    trl_lengths = [x for run in row["trl"] for x in run["steps_response_length"]]
    trl_gc = [g / t for run in row["trl"] for g, t in zip(run["steps_gc_s"], run["steps_s"], strict=True)]
    speedup = common.median(trl) / common.median(ours)
    goal = GOALS[(case["model"], case["mode"])]
    return {
        "model": case["model"],
        "mode": case["mode"],
        "shape": [
            f"{case['batch']} x {case['new_tokens']}",
            f"{case['epochs']} x {case['batch'] // case['mini_batch']}",
        ],
        "ours_min": min(ours),
        "ours_median": common.median(ours),
        "trl_min": min(trl),
        "trl_median": common.median(trl),
        "speedup": speedup,
        "speedup_min": min(trl) / min(ours),
        "ours_cpu": common.median(ours_cpu),
        "trl_cpu": common.median(trl_cpu),
        "speedup_cpu": common.median(trl_cpu) / common.median(ours_cpu),
        "reward_share": common.median(waits),
        "score_call_s": common.median(calls),
        "response_length": {"ours": common.median(lengths), "trl": common.median(trl_lengths)},
        "trl_gc_share": common.median(trl_gc),
        "trainable_parameters": {
            "ours": row["ours"][0]["trainable_parameters"],
            "trl": row["trl"][0]["trainable_parameters"],
        },
        "goal": goal,
        "met": speedup >= goal,
        "raw": row,
    }


if __name__ == "__main__":
    main()
