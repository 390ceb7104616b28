"""Freed CPU memory goes back to the operating system, so a training process's resident memory follows what
it really holds.

glibc's malloc serves a block of at least M_MMAP_THRESHOLD bytes with its own mapping, unmapped on free. By
default that threshold moves: each time such a block is freed it rises to the block's size (up to 32 MB), and
from then on blocks of a training step's sizes come from the heap, where freed space stays resident and
fragments. A PPO process then keeps the high-water mark of every phase at once: LoRA on the 124M GPT-2 at
the seed's settings peaked at 1.66 GB of training RSS instead of the 1.06 GB it held at most (measured with
bench/bench_memory.py's method). A fixed threshold of 1 MB keeps large tensors in their own mappings; small
ones (most of a tiny model's) are unaffected.

The price is time: every block above the threshold is a fresh mapping whose pages the kernel zeroes on first
touch. Full fine-tuning of the 124M GPT-2 ran 25% slower with 1 MB than with 16 MB (4.35 against 3.25-3.45
s per step at bench_ppo_vs_trl.py's settings) for the same peak RSS (3.2 GB): its memory is mostly weights,
gradients and AdamW's moments, tensors far above either threshold, so the blocks between 1 and 16 MB that
the heap then keeps matter little. LoRA's peak is mostly those blocks (activations, logits), so LoRA keeps 1
MB (`threshold_for`).
"""

from __future__ import annotations

import ctypes
import os

# Blocks of this many bytes or more are mapped on their own (and returned when freed): LoRA and any
# training whose memory is mostly activations.
MMAP_THRESHOLD_BYTES = 1 << 20
# The same for full fine-tuning, whose memory is mostly weights and optimiser state (see the module doc).
FULL_FINE_TUNING_MMAP_THRESHOLD_BYTES = 16 << 20


def threshold_for(use_lora: bool) -> int:
    """The mmap threshold for a training run with or without LoRA."""
    return MMAP_THRESHOLD_BYTES if use_lora else FULL_FINE_TUNING_MMAP_THRESHOLD_BYTES


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold` for this process. True when set; False where malloc is not
    glibc's, or where the user chose a threshold (MALLOC_MMAP_THRESHOLD_), which is kept."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
