"""`rlhf serve all`: the four services and the REST gateway as separate processes, wired to each other, stopped
together."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time

from rlhf.runtime.config import DEFAULT_PORTS

MODULES = {
    "feedback": "feedback_service",
    "reward": "reward_service",
    "policy": "policy_service",
    "inference": "inference_service",
}
# The REST gateway (the seed's HTTP API over the four): `rlhf serve all` starts it beside them when the stack
# has a port for it.
GATEWAY = "gateway"


@dataclasses.dataclass
class Stack:
    """Ports and data dir of a whole local stack."""

    data_dir: pathlib.Path
    host: str = "127.0.0.1"
    ports: dict[str, int] = dataclasses.field(default_factory=lambda: dict(DEFAULT_PORTS))

    def address(self, service: str) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{host}:{self.ports[service]}"

    def env(self) -> dict[str, str]:
        """Environment that points every service (and client) at this stack."""
        env = {"RLHF_DATA_DIR": str(self.data_dir), "RLHF_HOST": self.host}
        for service in MODULES:
            env[f"RLHF_{service.upper()}_ADDR"] = self.address(service)
            env[f"RLHF_{service.upper()}_PORT"] = str(self.ports[service])
        # Feedback citing a generation id is attributed to the version that generated it.
        env["RLHF_FEEDBACK_INFERENCE_ADDRESS"] = self.address("inference")
        if GATEWAY in self.ports:
            env["RLHF_GATEWAY_PORT"] = str(self.ports[GATEWAY])
        return env


def start_stack(stack: Stack, services: list[str], log_dir: pathlib.Path | None = None) -> dict[str, subprocess.Popen]:
    env = {**os.environ, **stack.env(), "PYTHONUNBUFFERED": "1"}
    processes = {}
    for service in services:
        output = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            output = open(log_dir / f"{service}.log", "ab")
        processes[service] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                MODULES.get(service, service),
                "--port",
                str(stack.ports[service]),
                "--host",
                stack.host,
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
        )
    return processes


def stop_stack(processes: dict[str, subprocess.Popen], timeout: float = 30.0) -> None:
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in processes.values():
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(stack: Stack, services: list[str]) -> int:
    """Run until SIGINT/SIGTERM or until a service dies; then stop the rest. Returns an exit code."""
    stop_requested = {"flag": False}

    def on_signal(_signum, _frame) -> None:
        stop_requested["flag"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if set(MODULES) <= set(services) and GATEWAY in stack.ports and GATEWAY not in services:
        services = [*services, GATEWAY]  # the whole stack: its REST API too
    processes = start_stack(stack, services)
    names = ", ".join(f"{s} on {stack.address(s)}" for s in services)
    if GATEWAY in services:
        names += f" (REST API docs: http://{stack.address(GATEWAY)}/docs)"
    print(f"rlhf: serving {names} (data dir {stack.data_dir}); Ctrl-C stops", flush=True)
    code = 0
    try:
        while not stop_requested["flag"]:
            dead = [s for s, p in processes.items() if p.poll() is not None]
            if dead == [GATEWAY]:
                # The REST API is an extra over the gRPC services (its port is often taken, 8000 being popular):
                # without it the stack still serves; its own error line said why it stopped.
                print(
                    f"rlhf: the REST gateway exited (code {processes.pop(GATEWAY).returncode}); the gRPC services go "
                    f"on (--gateway-port picks another port)",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            if dead:
                print(
                    f"rlhf: {', '.join(dead)} service exited "
                    f"(code {processes[dead[0]].returncode}); stopping the others",
                    file=sys.stderr,
                )
                code = 1
                break
            time.sleep(0.2)
    finally:
        stop_stack(processes)
    return code
