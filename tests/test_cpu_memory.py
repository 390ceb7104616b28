"""Freed tensors leave the process (rlhf.training.cpu_memory): with glibc's moving mmap threshold, 256 MB of
freed 8 MB tensors stayed resident between small live ones; with the fixed threshold none does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.servers import ROOT

FRAGMENTS = """
import os, sys, torch
from rlhf.training.cpu_memory import return_freed_memory
from rlhf.training.threads import use_cpu_threads
if sys.argv[1] == "on":
    assert return_freed_memory()
elif sys.argv[1] in ("lora", "full"):  # as a training run sets it
    use_cpu_threads(torch.nn.Linear(2, 2), 1, "cpu", use_lora=sys.argv[1] == "lora")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = torch.ones(4 << 20); del x   # a 16 MB tensor freed: glibc raises its threshold to 16 MB
base = rss()
big, small = [], []
for _ in range(32):
    big.append(torch.ones(2 << 20))      # 8 MB each
    small.append(torch.ones(1 << 10))    # 4 KB kept between them
del big
print((rss() - base) >> 20)
"""


def resident_mb_after_free(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", FRAGMENTS, mode], capture_output=True, text=True, timeout=120, cwd=ROOT, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc: Linux only")
def test_freed_tensors_no_longer_stay_resident():
    assert resident_mb_after_free("off") >= 128  # glibc's default: the freed blocks stay in the heap
    assert resident_mb_after_free("on") <= 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc: Linux only")
def test_lora_runs_return_8_mb_blocks_and_full_fine_tuning_keeps_them_for_speed():
    # Full fine-tuning's threshold is 16 MB (rlhf.training.cpu_memory): 8 MB blocks come from the heap.
    assert resident_mb_after_free("lora") <= 16
    assert resident_mb_after_free("full") >= 128


def test_a_users_own_threshold_is_kept(monkeypatch):
    from rlhf.training.cpu_memory import return_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_memory() is False
