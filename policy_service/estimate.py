"""Dry-run estimates of a TrainPolicy job: its wall time phase by phase, and its peak memory.

Time. A job runs four phases one after the other, and the estimate is their sum:

- reward model: with no reward_model_version, the worker first has the reward service train one (a worker
  process of its own: start-up, feedback export, loading, `num_epochs` passes over the feedback, saving);
- loading: the worker's start-up (Python, torch), the prompt export, building the tiny model when it is not
  cached yet, loading the base model (twice with full fine-tuning: the frozen reference);
- training: `max_steps` PPO steps;
- saving: the merged policy, value head, curves and results.

Each phase has a default cost model (`Defaults`, constants measured on this machine as written there). A
PPO step's model counts what a step does at the response length it will actually reach: one generation call
per sampled token, two scoring passes, `ppo_epochs` x minibatches x micro-batches forward+backward passes,
the logits they materialise and their FLOPs, AdamW over the trainable weights, and one ScoreBatch call.

Calibration. Every finished job's results hold the seconds of each phase, measured by its worker apart from
the others (PPO steps apart from loading, the reward model and saving), the device kind, and the response
and prompt widths of its steps. A phase's estimate is its default model's times the ratio measured /
default-predicted over the newest `CALIBRATION_RUNS` finished runs that match it (the PPO phase: same device
kind, base model, LoRA setting and precision; loading and saving: the same; the reward model: same device
kind and reward base model and LoRA setting). A run's own prediction uses the widths it measured, so the
ratio is the per-token cost and nothing else. Runs on another device kind never calibrate (a GPU run says
nothing about a CPU). Without a matching run the default model stands alone; `basis` says which it was.

Response length. Responses usually end well before max_new_tokens, and a step costs what its longest
response costs (generation stops when every row has ended; passes are padded to the longest). The expected
width is taken from the widths measured by earlier runs of the same base model (any device), each step's
width cut at the new max_new_tokens; a step that hit its own run's cap counts as reaching the new cap (it
might have gone on). With no such run: max_new_tokens, a conservative bound.

GRPO and RLOO. Their step (one optimiser step of TRL's trainer) has its own default model
(group_step_seconds: the same per-call, per-logit, per-FLOP and AdamW terms over batch_size x
num_generations answers, the generation shared by num_iterations steps), and their steps are calibrated only on
finished runs of the same algorithm (a PPO run says nothing of a GRPO step, nor the reverse). Loading, saving,
the reward model and the response widths are the algorithm's business only in small part, and are calibrated on
runs of any algorithm.

The estimate depends only on the request, the finished runs and the model cache: the same request gives the
same answer until another run finishes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from rlhf.training.config import GROUP_CONFIGS, GroupPolicyConfig, RewardModelConfig, TrainingConfig
from rlhf.training.logprobs import chunk_positions
from rlhf.training.modeling import TINY_MODEL
from rlhf.training.modelshape import ModelShape

# How many matching finished runs (newest first) calibrate a phase.
CALIBRATION_RUNS = 5


class Defaults:
    """The default cost model's constants (seconds), measured on a 2-core AMD EPYC VM without GPU (other work
    running; torch 2.13 CPU, OMP_WAIT_POLICY=PASSIVE), by these methods:

    PPO step: PPOTrainer.step_on timed (its time/step_s) on the tiny model (309k parameters) over 12
    configurations (batch 4-64, minibatch 2-32, ppo_epochs 1-4, max_new_tokens 8-128, LoRA and full,
    gradient accumulation 1-2) and on a random 11M-parameter GPT-2 (6 layers, width 384) over 4; 3-4 steps
    each after a warm-up step, medians, with a local reward function; then a least-squares fit of the step
    time (relative error) to the four terms of ppo_step_seconds. Every configuration was within 0.86-1.09x
    of the fit (PPOTrainer as of commit ee849b0: the LM head on response positions only, fused AdamW).
    Real jobs through the services then measured 0.9-1.4x the fit per step (ScoreBatch over gRPC, the
    machine's other work): the score_call and loop_per_step terms.
    Reward model: train_reward_model timed in-process on the tiny model (60-400 ratings, 1-3 epochs, batch
    4-64, LoRA and full) for the per-step terms; its fixed part, and the PPO job's start-up, loading and
    saving, from jobs run through the real services (tests/test_estimate.py's setting: feedback, reward and
    policy servers, worker processes), as the worker's phase timings record them.
    Tiny model build: build_info.json's "seconds" of builds on this machine (32-40 s).
    GPU: the per-call terms were fitted to PPO steps on one NVIDIA H200 (bench/bench_gpu.py, 2026-11-26: the
    tiny model and a 124M GPT-2, full and LoRA, fp32 and bf16, batch 8, 128 new tokens; 3 steps each): a step
    there is bound by per-call overhead (kernel launches, Python, one host sync per sampled token), not by
    arithmetic, and the eight configurations lie within 0.83-1.14x of the fit (the default model before read
    4-7x too short). The GPU's logit, flops and adam terms are still assumptions; a first run on the GPU
    calibrates its own estimates.
    """

    # Per transformer layer per model call (Python and kernel-launch overhead of one forward; a backward
    # counts as two calls).
    layer_call_cpu = 8.2e-4
    layer_call_gpu = 6.9e-4
    # Per model call beyond its layers (embeddings, masks, the LM head, sampling's host sync). On the CPU the
    # fit above puts it inside layer_call_cpu.
    model_call_cpu = 0.0
    model_call_gpu = 2.0e-3
    # Per element of logits materialised (softmax, log-softmax, entropy, their gradients).
    logit_cpu = 1.33e-8
    logit_gpu = 2e-11
    # Floating-point operations per second of the model's matrix products.
    flops_cpu = 8.8e10
    flops_gpu = 1.0e14
    # AdamW and gradient clipping, per trainable parameter per optimiser step.
    adam_cpu = 3.3e-9
    adam_gpu = 2e-11
    # One ScoreBatch call to the reward service (gRPC and the reward model's forward of the batch).
    score_call = 0.012
    # PPO loop outside the steps, per step (progress events, cancellation checks).
    loop_per_step = 0.002
    # Gradient all-reduce of data-parallel PPO (num_processes > 1), bytes per second: gloo over loopback on
    # one machine, nccl on GPUs. Assumptions (not yet fitted); the gradients of the trainable parameters
    # travel once per optimiser step.
    allreduce_cpu = 1.0e9
    allreduce_gpu = 5.0e10
    # The first ScoreBatch of a job beyond a step: the reward service loads the new reward model (the tiny
    # model: 0.05-0.1 s; 2.5-3 s instead when that process loads its very first model).
    first_score = 0.2
    # Reward model: per optimiser step beyond its passes (tokenising, loss, clipping); its matrix products run
    # at half the PPO rate (padded sequence-classification batches).
    rm_step = 0.003
    rm_flops_share = 0.5
    # Reward model job: worker start-up, export, loading, saving, registration, and the policy worker noticing
    # (4.4-7.5 s measured, mean 5.8 s, with full fine-tuning); LoRA adds peft's import and the merge.
    rm_fixed = 6.0
    rm_lora = 1.5
    # Tokens of a prompt + response text in reward training when nothing says (capped at max_length).
    rm_pair_tokens = 64
    # Policy worker start-up (Python, torch, transformers), prompt export and model loading (the tiny model:
    # 4.8-8.2 s measured, mean 7.0 s; the job's wall time less its other phases).
    loading_fixed = 7.0
    # Reading weights, per byte (once with LoRA, twice with full fine-tuning), and writing the merged policy:
    # an 11M-parameter GPT-2 (44 MB) loaded in 0.04-0.08 s and saved in 0.02-0.06 s (page cache; a cold disk
    # is slower).
    loading_per_byte = 1.0e-9
    # Saving the merged policy, value head, curves (matplotlib) and results (the tiny model: 0.9-1.9 s).
    saving_fixed = 1.4
    saving_per_byte = 1.0e-9
    # Building the tiny model when it is not cached.
    tiny_build = 36.0
    # Prompt tokens of a rollout batch (its longest prompt) when no run of the model measured it.
    prompt_tokens = 32


@dataclasses.dataclass
class Estimate:
    steps: int
    minutes: float  # the sum of the phases below
    reward_model_minutes: float
    loading_minutes: float
    training_minutes: float
    saving_minutes: float
    # What the figures were calibrated on, phase by phase.
    basis: str
    peak_memory_bytes: int
    # The response width (tokens, a batch's longest) the PPO estimate assumes.
    response_tokens: float
    # peak_memory's parts (bytes).
    memory: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Run:
    """A finished job, as the dry run reads it: its config, its worker's timings and its wall time."""

    job_id: str
    config: dict[str, Any]
    timing: dict[str, Any]
    wall_seconds: float
    # "ppo", "grpo" or "rloo"; GRPO's and RLOO's whole config (their timings use the ppo_* keys too).
    algorithm: str = "ppo"
    algorithm_config: dict[str, Any] | None = None

    @classmethod
    def of(cls, job_id: str, result: dict[str, Any], wall_seconds: float) -> Run | None:
        """None for results without the timings (older runs: their one total is no calibration)."""
        timing = result.get("timing")
        if not isinstance(timing, dict) or "ppo_seconds" not in timing:
            return None
        algorithm = result.get("algorithm", "ppo")
        return cls(job_id, result["config"], timing, wall_seconds, algorithm, result.get("algorithm_config"))


# --- the default cost models -------------------------------------------------------------------------------


def _gpu(device_kind: str) -> bool:
    return not device_kind.startswith("cpu")


def lora_parameters(shape: ModelShape, config) -> int:
    """Trainable LoRA parameters: r x (in + out) per adapted module per layer."""
    outputs = shape.lora_module_outputs
    if config.lora_target_modules:
        outputs = (shape.width,) * len(config.lora_target_modules)  # unknown shapes: square modules
    return shape.layers * sum(config.lora_r * (shape.width + out) for out in outputs)


def trainable_parameters(shape: ModelShape, config) -> int:
    return (shape.parameters if not config.use_lora else lora_parameters(shape, config)) + shape.width + 1


def call_seconds(shape: ModelShape, gpu: bool) -> float:
    """Overhead of one model call (a forward; a backward counts as two): per layer, plus the call itself."""
    d = Defaults
    return (d.layer_call_gpu if gpu else d.layer_call_cpu) * shape.layers + (
        d.model_call_gpu if gpu else d.model_call_cpu
    )


def ppo_step_seconds(
    shape: ModelShape, config: TrainingConfig, response_tokens: float, prompt_tokens: float, device_kind: str
) -> float:
    """Seconds of one PPO step by the default cost model, at the given (batch-longest) widths. With
    num_processes N, each rank runs batch_size / N rows (the same number of passes) and the gradients are
    all-reduced per optimiser step; with gradient checkpointing each update pass runs its forward twice."""
    d = Defaults
    gpu = _gpu(device_kind)
    ranks = max(1, config.num_processes)
    b, epochs = max(1, config.batch_size // ranks), config.ppo_epochs
    mini = max(1, config.mini_batch_size // ranks)
    tokens = response_tokens + prompt_tokens
    minibatches = epochs * math.ceil(b / mini)
    micro = minibatches * min(config.gradient_accumulation_steps, mini)
    update = 4 if config.gradient_checkpointing else 3  # forward (twice when recomputed) + backward (counts 2)
    calls = response_tokens + 2 + update * micro  # generation, 2 scoring passes, the update passes
    passes = 1 + 2 + update * epochs  # over every token: generation, scoring, training
    # The gradients' all-reduce of data-parallel ranks, once per optimiser step.
    trainable = trainable_parameters(shape, config)
    allreduce = 4 * trainable * minibatches / (d.allreduce_gpu if gpu else d.allreduce_cpu) if ranks > 1 else 0.0
    # Logits exist for the response positions only (the LM head skips the prompt's).
    return (
        call_seconds(shape, gpu) * calls
        + (d.logit_gpu if gpu else d.logit_cpu) * b * response_tokens * shape.vocab * passes
        + 2 * shape.parameters * b * tokens * passes / (d.flops_gpu if gpu else d.flops_cpu)
        + (d.adam_gpu if gpu else d.adam_cpu) * minibatches * trainable
        + d.score_call
        + d.loop_per_step
        + allreduce
    )


def group_step_seconds(
    shape: ModelShape, group: GroupPolicyConfig, response_tokens: float, prompt_tokens: float, device_kind: str
) -> float:
    """Seconds of one GRPO / RLOO step (one optimiser step) by the same cost terms as PPO's: each generated
    batch of batch_size x num_generations answers (one generation call per token, the reference's pass when
    beta > 0, the old policy's when its log-probs are kept for several updates, one ScoreBatch call) serves
    num_iterations steps; each step runs forward + backward over gradient_accumulation_steps micro-batches."""
    d = Defaults
    gpu = _gpu(device_kind)
    rows = group.batch_size * group.num_generations
    tokens = response_tokens + prompt_tokens
    ga = group.gradient_accumulation_steps
    extra = (1 if group.beta else 0) + (1 if group.num_iterations > 1 or ga > 1 else 0)
    # Per generated batch, then shared by its num_iterations steps.
    generation = (
        call_seconds(shape, gpu) * (response_tokens + extra * ga)
        + (d.logit_gpu if gpu else d.logit_cpu) * rows * response_tokens * shape.vocab * (1 + extra)
        + 2 * shape.parameters * rows * tokens * (1 + extra) / (d.flops_gpu if gpu else d.flops_cpu)
        + d.score_call
    ) / group.num_iterations
    training = (
        call_seconds(shape, gpu) * 3 * ga
        + (d.logit_gpu if gpu else d.logit_cpu) * rows * response_tokens * shape.vocab * 3
        + 2 * shape.parameters * rows * tokens * 3 / (d.flops_gpu if gpu else d.flops_cpu)
        + (d.adam_gpu if gpu else d.adam_cpu) * trainable_parameters(shape, group)
    )
    return generation + training + d.loop_per_step


def step_seconds(
    algorithm: str,
    config: TrainingConfig,
    group: GroupPolicyConfig | None,
    shape: ModelShape,
    response_tokens: float,
    prompt_tokens: float,
    device_kind: str,
) -> float:
    """One step of `algorithm` by its default cost model."""
    if algorithm == "ppo" or group is None:
        return ppo_step_seconds(shape, config, response_tokens, prompt_tokens, device_kind)
    return group_step_seconds(shape, group, response_tokens, prompt_tokens, device_kind)


def reward_model_seconds(shape: ModelShape, config: RewardModelConfig, items: int, device_kind: str) -> float:
    """Seconds of the reward-model job by the default cost model, `items` feedback items."""
    d = Defaults
    gpu = _gpu(device_kind)
    held = round(items * config.validation_fraction) if items >= 10 else 0
    train = items - held
    batches = math.ceil(train / config.batch_size)
    steps = math.ceil(batches / config.gradient_accumulation_steps)
    tokens = min(config.max_length, d.rm_pair_tokens)
    flops = (d.flops_gpu if gpu else d.flops_cpu) * d.rm_flops_share
    per_epoch = (
        steps * d.rm_step
        + batches * 3 * shape.layers * (d.layer_call_gpu if gpu else d.layer_call_cpu)
        + 6 * shape.parameters * train * tokens / flops
        + steps * (d.adam_gpu if gpu else d.adam_cpu) * trainable_parameters(shape, config)
        + 2 * shape.parameters * held * tokens / flops  # validation
    )
    return d.rm_fixed + (d.rm_lora if config.use_lora else 0.0) + config.num_epochs * per_epoch


def loading_seconds(shape: ModelShape, config: TrainingConfig) -> float:
    copies = 1 if config.use_lora else 2
    return Defaults.loading_fixed + Defaults.loading_per_byte * copies * shape.parameters * shape.weight_bytes


def saving_seconds(shape: ModelShape) -> float:
    return Defaults.saving_fixed + Defaults.saving_per_byte * shape.parameters * shape.weight_bytes


# --- measured lengths ------------------------------------------------------------------------------------


def expected_widths(config: TrainingConfig, runs: Sequence[Run], context: int | None) -> tuple[float, float, str]:
    """(response width, prompt width, where from) of this request's steps, from earlier runs of its base model."""
    cap = config.max_new_tokens
    same = [r for r in runs if r.config["base_model"] == config.base_model and r.timing.get("ppo_steps")]
    same = same[:CALIBRATION_RUNS]
    room = (context - cap) if context else None
    if not same:
        prompt = Defaults.prompt_tokens if room is None else min(Defaults.prompt_tokens, max(1, room))
        return float(cap), float(prompt), f"max_new_tokens ({cap}): no run of {config.base_model} measured it yet"
    total = steps = prompt_sum = 0.0
    for run in same:
        run_cap = run.config["max_new_tokens"]
        for width, count in run.timing["response_widths"].items():
            width = int(width)
            total += count * (min(width, cap) if width < run_cap else cap)
            steps += count
        prompt_sum += run.timing["query_width_sum"]
    prompt = prompt_sum / steps
    if room is not None:
        prompt = min(prompt, max(1, room))
    return total / steps, prompt, f"{total / steps:.1f} tokens, measured over {int(steps)} steps of {len(same)} run(s)"


def _run_widths(run: Run) -> tuple[float, float]:
    steps = sum(run.timing["response_widths"].values())
    widths = sum(int(w) * c for w, c in run.timing["response_widths"].items())
    return widths / steps, run.timing["query_width_sum"] / steps


# --- calibration --------------------------------------------------------------------------------------


def _ratio(pairs: list[tuple[float, float]]) -> float:
    """measured / predicted over the runs (sums: longer runs weigh more)."""
    predicted = sum(p for _, p in pairs)
    return sum(m for m, _ in pairs) / predicted if predicted > 0 else 1.0


def _same_model(run: Run, config: TrainingConfig, kind: str) -> bool:
    c = run.config
    return (
        run.timing.get("device_kind") == kind
        and c["base_model"] == config.base_model
        and bool(c["use_lora"]) == bool(config.use_lora)
        and (kind.startswith("cpu") or c.get("mixed_precision", "no") == config.mixed_precision)
        and c.get("num_processes", 1) == config.num_processes
        and bool(c.get("gradient_checkpointing", False)) == config.gradient_checkpointing
    )


def estimate(
    config: TrainingConfig,
    runs: Sequence[Run],
    shape: ModelShape,
    device_kind: str,
    *,
    reward_config: RewardModelConfig | None = None,
    reward_shape: ModelShape | None = None,
    reward_device_kind: str = "",
    feedback_count: int = 0,
    tiny_model_cached: bool = True,
    algorithm: str = "ppo",
    group: GroupPolicyConfig | None = None,
) -> Estimate:
    """The estimate of a job running `config` on `device_kind` (e.g. "cpu (2 cores)").

    `runs`: finished runs, newest first (Run.of). `reward_config`/`reward_shape`: the reward model the job
    trains first (None: it reuses one). `tiny_model_cached`: False adds the tiny model's build to the phase
    that will build it (the reward model's when it trains on the tiny model, else loading)."""
    basis: list[str] = []
    response, prompt, length_basis = expected_widths(config, runs, shape.context)

    # RL steps, calibrated on finished runs of the same algorithm only. A run's first step is left out of its
    # calibration: it waits for the reward service to load the new reward model (seconds when that process
    # loads its first model), which says nothing of a step.
    name = algorithm.upper()
    ppo_runs = [
        r
        for r in runs
        if r.algorithm == algorithm and _same_model(r, config, device_kind) and r.timing["ppo_steps"] >= 2
    ][:CALIBRATION_RUNS]
    per_step = step_seconds(algorithm, config, group, shape, response, prompt, device_kind)
    if ppo_runs:
        pairs = []
        for run in ppo_runs:
            run_config = TrainingConfig(**run.config)
            run_group = GROUP_CONFIGS[algorithm](**run.algorithm_config) if run.algorithm_config else None
            widths = _run_widths(run)
            steps = run.timing["ppo_steps"] - 1
            predicted = steps * step_seconds(algorithm, run_config, run_group, shape, *widths, device_kind)
            pairs.append((run.timing["ppo_seconds"] - run.timing.get("first_step_seconds", 0.0), predicted))
        factor = _ratio(pairs)
        steps = sum(r.timing["ppo_steps"] for r in ppo_runs)
        names = ", ".join(r.job_id for r in ppo_runs)
        basis.append(
            f"measured: {steps} {name} steps of job{'s' if len(ppo_runs) > 1 else ''} {names} on {device_kind} "
            f"({config.base_model}, {'LoRA' if config.use_lora else 'full'}): {factor:.2f}x the default cost model"
        )
    else:
        factor = 1.0
        basis.append(
            f"default cost model for {shape.parameters:,} parameters on {device_kind} "
            f"(no finished {name} run of {config.base_model} with {'LoRA' if config.use_lora else 'full fine-tuning'} "
            f"on this device kind yet)"
        )
    training = config.max_steps * per_step * factor + Defaults.first_score
    basis.append(f"response length {length_basis}")

    def phase(name: str, default: float, matching: list[Run], measured_of, predicted_of) -> float:
        matching = matching[:CALIBRATION_RUNS]
        if not matching:
            basis.append(f"{name}: default cost model")
            return default
        ratio = _ratio([(measured_of(r), predicted_of(r)) for r in matching])
        basis.append(f"{name}: measured by {len(matching)} run(s), {ratio:.2f}x the default")
        return default * ratio

    model_runs = [r for r in runs if _same_model(r, config, device_kind)]
    build = 0.0 if tiny_model_cached else Defaults.tiny_build
    builds_in_reward = reward_config is not None and reward_config.base_model in ("", TINY_MODEL)
    builds_in_loading = not builds_in_reward and config.base_model in ("", TINY_MODEL)

    # Reward model.
    reward = 0.0
    if reward_config is not None:
        shape_rm = reward_shape or shape
        kind_rm = reward_device_kind or device_kind
        rm_runs = [
            r
            for r in runs
            if r.timing.get("reward_model", {}).get("trained")
            and r.timing["reward_model"].get("device_kind") == kind_rm
            and r.timing["reward_model"]["config"]["base_model"] == reward_config.base_model
            and bool(r.timing["reward_model"]["config"]["use_lora"]) == bool(reward_config.use_lora)
        ]
        reward = phase(
            "reward model",
            reward_model_seconds(shape_rm, reward_config, feedback_count, kind_rm),
            rm_runs,
            lambda r: r.timing["reward_model_seconds"] - r.timing.get("build_seconds_reward", 0.0),
            lambda r: reward_model_seconds(
                shape_rm,
                RewardModelConfig(**r.timing["reward_model"]["config"]),
                r.timing["reward_model"]["items"],
                kind_rm,
            ),
        )
        reward += build if builds_in_reward else 0.0
    else:
        basis.append("reward model: reused (reward_model_version)")

    # Loading: the job's wall time less the phases its worker timed (start-up and loading), less any build.
    def measured_loading(run: Run) -> float:
        t = run.timing
        return max(
            0.0,
            run.wall_seconds
            - t["reward_model_seconds"]
            - t["ppo_seconds"]
            - t["saving_seconds"]
            - t.get("build_seconds", 0.0)
            - t.get("build_seconds_reward", 0.0),
        )

    loading = phase(
        "start-up and loading",
        loading_seconds(shape, config),
        [r for r in model_runs if r.wall_seconds > 0],
        measured_loading,
        lambda r: loading_seconds(shape, TrainingConfig(**r.config)),
    )
    loading += build if builds_in_loading else 0.0
    if build and (builds_in_loading or builds_in_reward):
        basis.append(f"the tiny model is not built yet: {Defaults.tiny_build:.0f} s to build it")
    saving = phase(
        "saving",
        saving_seconds(shape),
        model_runs,
        lambda r: r.timing["saving_seconds"],
        lambda r: saving_seconds(shape),
    )

    phases = [round(seconds / 60.0, 3) for seconds in (reward, loading, training, saving)]
    if group is None:
        memory = peak_memory(shape, config, prompt)
    else:  # PPO's formula over the step's batch_size x num_generations answers (its value head is no matter)
        rows = group.batch_size * group.num_generations
        memory = peak_memory(shape, dataclasses.replace(config, batch_size=rows, mini_batch_size=rows), prompt)
    return Estimate(
        steps=config.max_steps,
        minutes=round(sum(phases), 3),
        reward_model_minutes=phases[0],
        loading_minutes=phases[1],
        training_minutes=phases[2],
        saving_minutes=phases[3],
        basis="; ".join(basis),
        peak_memory_bytes=memory["peak"],
        response_tokens=round(response, 1),
        memory=memory,
    )


# --- memory ----------------------------------------------------------------------------------------------


def peak_memory(shape: ModelShape, config: TrainingConfig, prompt_tokens: float) -> dict[str, int]:
    """Peak memory of a PPO run (bytes) on its device: model, optimiser and activations; not the runtime
    itself (Python and torch's own libraries, ~0.5 GB of RSS on a CPU; the CUDA context on a GPU).

    With P parameters, w bytes per weight (the checkpoint's dtype: fp32 4, fp16/bf16 2; transformers loads a
    checkpoint in its own dtype, and mixed_precision only autocasts activations), width d, L layers, h heads,
    vocabulary V, a = activation bytes (2 under fp16/bf16 autocast on a GPU, else 4), T = the longest prompt
    + max_new_tokens (at most the context), R = max_new_tokens + 1 (the positions that get logits: the LM
    head skips the prompt's), B = batch_size, m = rows of one micro-batch (mini_batch_size /
    gradient_accumulation_steps); with num_processes N the figure is per rank (B and m divided by N); with
    gradient_checkpointing the activations term counts one layer (the one being recomputed) instead of L:

      weights   full: 4·P·w  (policy, its gradients, AdamW's two moments) + F (the frozen reference copy)
                LoRA: F (the reference is the same weights, adapters off) + 16·A (adapter weights,
                      gradients and moments in fp32; A = L x r x (d + d_out) per adapted module)
                F = P·w, less 12·L·d²·(w − 2) under fp16/bf16 autocast on a GPU: the frozen linear layers'
                weights (~12·L·d² of them) are kept in the autocast dtype there
      rollout   2·L·B·T·d·a (KV cache)  +  B·C·V·(a + 3·4)  (a chunk's logits, their fp32 copy,
                log-softmax and gathered log-probs, for the policy and the reference in turn)
      training  m·T·L·17·d·a  (activations kept for backward)  +  (L+1)·m·T·d·a (the hidden
                states the value head reads)  +  m·C·V·(a + 4·4)  (a chunk's logits, fp32 copy, log-softmax,
                the entropy's softmax, their gradient, recomputed chunk by chunk in the backward pass)

    C is the chunk of positions the LM head runs on (rlhf.training.logprobs.chunk_positions: all R while the
    pass's fp32 logits fit 32 MB, else as many as fit).

    The activations kept per token per layer are Korthikanti et al. 2022's count (17·d + 2.5·h·T values for a fused
    implementation) without its 2.5·h·T term, the attention scores kept for backward: torch's flash attention
    (CUDA, and `_scaled_dot_product_flash_attention_for_cpu` on CPUs, masks included, checked with torch 2.13's
    profiler) keeps one log-sum-exp per row instead. With the term the estimate read +29% (fp32 LoRA on an H200,
    before the LM head was chunked) and +25% (LoRA on the 2-vCPU VM at the seed's settings, 2026-11-26); without it,
    +22% and +12%. transformers' GPT-2 blocks keep about twice the count with their GELU written as seven Python
    operations; the trainer swaps it for torch's fused kernel (rlhf.training.modeling.fuse_activations).
    bench/bench_memory.py compares the estimate with the 124M GPT-2 at the seed's settings, tests/test_estimate.py
    with an 11M-parameter GPT-2.

    peak = weights + max(rollout, training), with gradients (full) counted in `weights` throughout: they
    are freed between steps, but a step ends with them allocated. Activations dominate small models at long
    sequences; weights and their optimiser states dominate large ones with full fine-tuning.
    """
    p, w = shape.parameters, shape.weight_bytes
    d, layers, vocab = shape.width, shape.layers, shape.vocab
    gpu_autocast = config.mixed_precision in ("fp16", "bf16") and not config.device.startswith("cpu")
    a = 2 if gpu_autocast else 4
    t = int(round(prompt_tokens)) + config.max_new_tokens
    if shape.context:
        t = min(t, shape.context)
    r = config.max_new_tokens + 1
    ranks = max(1, config.num_processes)  # the figure is per rank: each holds batch_size / N rows
    b = max(1, config.batch_size // ranks)
    m = max(1, math.ceil(config.mini_batch_size // ranks / config.gradient_accumulation_steps))
    # The frozen weights (LoRA's base, the full mode's reference): under GPU autocast their linear layers' ~12·L·d²
    # weights are kept in its 2-byte dtype (rlhf.training.modeling.store_frozen_matrices).
    frozen = p * w
    if gpu_autocast and w > 2:
        frozen -= min(p, 12 * layers * d * d) * (w - 2)
    if config.use_lora:
        weights = frozen + 16 * lora_parameters(shape, config)
    else:
        weights = 4 * p * w + frozen
    weights += 16 * (d + 1)  # value head
    # The LM head runs on a chunk of positions at a time once a pass's whole logits would pass the budget
    # (rlhf.training.logprobs): only one chunk's vocabulary-wide tensors are alive at once.
    rollout_chunk, training_chunk = chunk_positions(b, r, vocab), chunk_positions(m, r, vocab)
    rollout = 2 * layers * b * t * d * a + b * rollout_chunk * vocab * (a + 3 * 4)
    # Activations kept for backward: every layer's, or with gradient checkpointing each layer's input plus
    # one layer's whole set while it is recomputed.
    kept_layers = 1 if config.gradient_checkpointing else layers
    training = (
        m * t * kept_layers * 17 * d * a + (layers + 1) * m * t * d * a + m * training_chunk * vocab * (a + 4 * 4)
    )
    return {
        "weights": int(weights),
        "rollout": int(rollout),
        "training": int(training),
        "peak": int(weights + max(rollout, training)),
    }
