"""How many CPU threads a training run's matrix maths uses.

A small model's operations are too short to split: with two or more intra-op threads each one pays the
fan-out and wake-up of the thread pool, and on 2 cores the threads also fight the reward service's process.
A tiny-model PPO step ran 2.3 times faster on one thread than on torch's default of one per core
(bench/bench_ppo_vs_trl.py); a 124M-parameter model needs every core.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from rlhf.training.cpu_memory import return_freed_memory

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


def use_cpu_threads(model: nn.Module, configured: int, device: str) -> int:
    """Set the process's intra-op thread count for training `model` on `device` (CPU only); returns it.
    Process-wide: the worker runs one training job per process."""
    if device.split(":")[0] != "cpu":
        return torch.get_num_threads()
    return_freed_memory()  # the other CPU setting of a training process: see rlhf.training.cpu_memory
    threads = cpu_threads_for(model, configured)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
