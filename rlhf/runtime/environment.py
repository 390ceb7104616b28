"""Process-wide settings every service and worker applies before torch and transformers load."""

from __future__ import annotations

import os
from collections.abc import MutableMapping


def prepare_environment(env: MutableMapping[str, str] = os.environ) -> None:
    """OpenMP threads sleep instead of spinning while they wait for work (unless the user chose otherwise).

    Several torch processes share a machine here (reward service, policy worker, inference service); with
    spinning threads they steal each other's cores and a tiny-model PPO step went from ~0.5 s to 2-28 s on
    2 cores (measured by bench/bench_ppo_step.py). Must run before torch is imported.
    """
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Service and worker logs are one line per event: no tqdm bars from transformers / huggingface_hub.
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
