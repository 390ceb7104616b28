"""How many CPU threads a model's matrix maths uses: in training runs, and in the threads that serve models
(generation, reward scoring).

A small model's operations are too short to split: with two or more intra-op threads each one pays the
fan-out and wake-up of the thread pool, and on 2 cores the threads also fight the reward service's process.
A tiny-model PPO step ran 2.3 times faster on one thread than on torch's default of one per core
(bench/bench_ppo_vs_trl.py); a 124M-parameter model needs every core.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from rlhf.training.cpu_memory import return_freed_memory, threshold_for

# Below this many parameters one thread is faster than several. Measured with PPO steps on 2 cores: the tiny
# model (0.3M) ran 1.1-2.3x faster on one thread; an 11M-parameter GPT-2 (6 layers, width 384) ran 1.4x faster
# on two. The boundary lies between them.
SMALL_MODEL_PARAMETERS = 5_000_000
# torch's own choice for this process (one per core), before any run changed it.
DEFAULT_THREADS = torch.get_num_threads()


def cpu_threads_for(model: nn.Module, configured: int) -> int:
    """Threads to run with: `configured` when > 0; else 1 for small models and torch's default for the
    rest. A user's OMP_NUM_THREADS or MKL_NUM_THREADS is their choice and is kept."""
    if configured > 0:
        return configured
    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return DEFAULT_THREADS
    parameters = sum(p.numel() for p in model.parameters())
    return 1 if parameters < SMALL_MODEL_PARAMETERS else DEFAULT_THREADS


def use_cpu_threads(model: nn.Module, configured: int, device: str, use_lora: bool) -> int:
    """Set the intra-op thread count for training `model` (with LoRA or not) on `device` (CPU only); returns
    it. Training runs in the worker process's main thread, one job per process."""
    if device.split(":")[0] != "cpu":
        return torch.get_num_threads()
    # The other CPU setting of a training process: see rlhf.training.cpu_memory.
    return_freed_memory(threshold_for(use_lora))
    threads = cpu_threads_for(model, configured)
    run_here_with(threads)
    return threads


def serving_threads(model: nn.Module, device: str) -> int | None:
    """The intra-op threads to serve `model` with (generation, scoring): cpu_threads_for's choice on a CPU,
    None elsewhere (leave torch's setting)."""
    return cpu_threads_for(model, 0) if device.split(":")[0] == "cpu" else None


def run_here_with(threads: int | None) -> None:
    """Make the calling thread's CPU operations use `threads` intra-op threads (None: leave them).

    OpenMP and MKL keep this count per calling thread, and a thread that torch did not start runs on every
    core whatever torch.set_num_threads said in another one. With OMP_WAIT_POLICY=PASSIVE (the services'
    setting, rlhf.runtime.environment) each parallel region then pays the sleeping workers' wake-up, ~70 µs
    on the 2-vCPU VM: the tiny model decoded 2.6x slower in the inference engine's thread than on one
    thread. So every thread that runs a model calls this first (cheap: call it per step where a loop may
    move between threads)."""
    if threads is not None:
        torch.set_num_threads(threads)
