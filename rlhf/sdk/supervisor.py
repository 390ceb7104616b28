"""`rlhf serve all`: the four services and the REST gateway as separate processes, wired to each other, stopped
together; a service that dies is restarted (with backoff, given up on in a crash loop) while the others serve."""

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


@dataclasses.dataclass
class RestartPolicy:
    """How `serve` brings back a service that died while the others keep serving."""

    # Wait before the first restart; it doubles with each restart in a row, up to max_backoff_seconds.
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0
    # A crash loop: more than max_restarts restarts within window_seconds, and `serve` gives up on the service
    # (loudly: it says so on stderr and exits 1 when stopped) while the others go on.
    max_restarts: int = 5
    window_seconds: float = 120.0
    # A service that ran this long before it died starts again from backoff_seconds.
    stable_seconds: float = 60.0


def start_stack(stack: Stack, services: list[str], log_dir: pathlib.Path | None = None) -> dict[str, subprocess.Popen]:
    return {service: start_service(stack, service, log_dir) for service in services}


def start_service(stack: Stack, service: str, log_dir: pathlib.Path | None = None) -> subprocess.Popen:
    """One service of the stack as its own process (output to log_dir/<service>.log, else inherited)."""
    env = {**os.environ, **stack.env(), "PYTHONUNBUFFERED": "1"}
    output = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        output = open(log_dir / f"{service}.log", "ab")
    return subprocess.Popen(
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


def serve(stack: Stack, services: list[str], restarts: RestartPolicy | None = None) -> int:
    """Run until SIGINT/SIGTERM, then stop every service. A service that dies is restarted with backoff while the
    others keep serving; one in a crash loop is given up on, loudly (RestartPolicy). Returns an exit code: 1 when
    a service was given up on."""
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
    supervision = Supervision(stack, restarts or RestartPolicy(), processes)
    try:
        while not stop_requested["flag"]:
            if GATEWAY in processes and processes[GATEWAY].poll() is not None:
                # The REST API is an extra over the gRPC services (its port is often taken, 8000 being popular):
                # without it the stack still serves; its own error line said why it stopped.
                print(
                    f"rlhf: the REST gateway exited (code {processes.pop(GATEWAY).returncode}); the gRPC services go "
                    f"on (--gateway-port picks another port)",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            supervision.tend()
            if not processes and not supervision.pending:
                print("rlhf: no service is left running; stopping", file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
    finally:
        stop_stack(processes)
    return 1 if supervision.given_up else 0


class Supervision:
    """Restarts the services of `processes` (updated in place) that died, per the RestartPolicy."""

    def __init__(self, stack: Stack, policy: RestartPolicy, processes: dict[str, subprocess.Popen]) -> None:
        self.stack = stack
        self.policy = policy
        self.processes = processes
        now = time.monotonic()
        self.started = {service: now for service in processes}
        # Per service: when it died (and was restarted) within the policy's window.
        self.deaths: dict[str, list[float]] = {}
        # Services waiting out their backoff: when each starts again.
        self.pending: dict[str, float] = {}
        self.given_up: list[str] = []

    def tend(self) -> None:
        """Notice deaths (schedule a restart, or give up on a crash loop) and start what is due."""
        now = time.monotonic()
        policy = self.policy
        for service, process in list(self.processes.items()):
            if service == GATEWAY or process.poll() is None:
                continue
            del self.processes[service]
            code = process.returncode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            recent = [t for t in self.deaths.get(service, []) if now - t < policy.window_seconds]
            if now - self.started[service] >= policy.stable_seconds:
                recent = []  # it had been running well: a fresh start, not a loop
            if len(recent) >= policy.max_restarts:
                self.given_up.append(service)
                print(
                    f"rlhf: GIVING UP on the {service} service: it {how} after {len(recent)} restarts within "
                    f"{policy.window_seconds:.0f} s (a crash loop). The other services keep serving. Its output "
                    f"above says why; fix that, then start `rlhf serve all` again.",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            delay = min(policy.backoff_seconds * 2 ** len(recent), policy.max_backoff_seconds)
            self.deaths[service] = [*recent, now]
            self.pending[service] = now + delay
            print(
                f"rlhf: the {service} service {how}; restarting it in {delay:.1f} s (the others keep serving)",
                file=sys.stderr,
                flush=True,
            )
        for service, due in list(self.pending.items()):
            if now >= due:
                del self.pending[service]
                self.processes[service] = start_service(self.stack, service)
                self.started[service] = now
                print(f"rlhf: {service} restarted on {self.stack.address(service)}", file=sys.stderr, flush=True)
