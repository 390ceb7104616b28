"""Shared by the benchmarks: machine description, servers in their own processes, results and tables.

Not a benchmark itself (the Makefile runs bench/bench_*.py only).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

if str(ROOT) not in sys.path:  # `python bench/bench_x.py` puts bench/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))
# One tiny model for every benchmark (and every server and worker process they start), built once.
os.environ.setdefault("RLHF_MODEL_CACHE", str(ROOT / ".rlhf" / "bench-model-cache"))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Same OpenMP setting as the services (see rlhf.runtime.environment); the servers the benchmarks start
# inherit it. Run e.g.
# `OMP_WAIT_POLICY=ACTIVE python bench/...` to measure libgomp's own spinning behaviour instead.
from rlhf.runtime.environment import prepare_environment  # noqa: E402

prepare_environment()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    import torch

    return {
        "node": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def print_machine(info: dict[str, Any]) -> None:
    print(
        f"machine: {info['node']} | {info['cpu']} | {info['cores']} cores | torch threads "
        f"{info['torch_threads']} (OMP_WAIT_POLICY={info['omp_wait_policy']}) "
        f"| load avg {info['load_average_at_start']} | python {info['python']} "
        f"| torch {info['torch']}",
        flush=True,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m <module> --port P --data-dir D ...` in its own process (no GIL shared with the client)."""

    def __init__(self, module: str, data_dir: pathlib.Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.module = module
        self.data_dir = data_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = data_dir / f"{module}.log"
        self._args = [sys.executable, "-m", module, "--port", str(self.port), "--data-dir", str(data_dir), *extra]
        self._env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        from rlhf.sdk.clients import wait_until_serving

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self._args, cwd=ROOT, env=self._env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_until_serving(self.address, timeout=120)
        except BaseException:
            self.stop()
            sys.stderr.write(self.log_path.read_text(errors="replace")[-4000:])
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        self._log.close()


@contextlib.contextmanager
def scratch_dir(name: str) -> Iterator[pathlib.Path]:
    """A fresh folder under .rlhf/ (same disk as real data), removed afterwards."""
    base = ROOT / ".rlhf" / "bench-tmp"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=base) as folder:
        yield pathlib.Path(folder)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def write_results(name: str, payload: dict[str, Any]) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**payload}
    payload["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {path.relative_to(ROOT)}  (load avg at end {payload['machine']['load_average_at_end']})")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


# --- a reward model trained through the real services (score and PPO benchmarks) -------------------------


def ensure_tiny_model() -> tuple[pathlib.Path, float]:
    """The shared tiny model's folder and the seconds it took to get it (≈40 s the first time, then ~0)."""
    from rlhf.training.tinymodel import ensure_tiny_model as ensure

    started = time.monotonic()
    path = ensure(pathlib.Path(os.environ["RLHF_MODEL_CACHE"]))
    return path, time.monotonic() - started


def train_reward_model(
    feedback_address: str, reward_address: str, agent_id: str = "bench", ratings: int = 60
) -> tuple[str, str, float]:
    """Submit synthetic ratings, train a reward model with a small fast config; (version, folder, seconds)."""
    import grpc

    from rlhf.reward.v1 import reward_service_pb2 as rw
    from rlhf.sdk.clients import RewardClient
    from tests.helpers import rated_answers, submit_ratings

    started = time.monotonic()
    with grpc.insecure_channel(feedback_address) as channel:
        submit_ratings(channel, agent_id, rated_answers(ratings, seed=1))
    config = rw.RewardModelConfig(
        use_lora=False, num_epochs=1, batch_size=16, learning_rate=5e-4, validation_fraction=0.2, seed=0
    )
    with RewardClient(reward_address, timeout=60) as reward:
        job = reward.create_job(agent_id, config)
        final = [*reward.watch(job.job_id, timeout=300)][-1]
        if final.state != rw.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"reward-model training did not succeed: {rw.JobState.Name(final.state)} {final.error}")
        model = reward.get_model(agent_id, final.reward_model_version)
    return model.version, model.model_path, time.monotonic() - started


@contextlib.contextmanager
def reward_stack(name: str) -> Iterator[tuple[ServerProcess, str, str, float]]:
    """Feedback and reward servers (own processes) with a reward model trained through them:
    yields (the reward server, reward-model version, its model folder, training seconds)."""
    with (
        scratch_dir(name) as data_dir,
        ServerProcess("feedback_service", data_dir / "feedback") as feedback,
        ServerProcess("reward_service", data_dir / "reward", "--feedback-addr", feedback.address) as reward,
    ):
        version, model_path, train_s = train_reward_model(feedback.address, reward.address)
        yield reward, version, model_path, train_s
