"""`rlhf serve all` supervises (issue 9, defect 12): a service killed with SIGKILL comes back while the others keep
answering; a crash loop is given up on loudly and the others still serve; SIGTERM then stops everything."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.test_cli import _free_ports

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVICES = ["feedback", "reward"]


def serving(port: int, timeout: float = 1.0) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"not in {timeout:.0f} s: {what}")


def child(parent: int, module: str) -> int | None:
    """The pid of `parent`'s child process running `python -m module`, if any."""
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and module.encode() in command:
            return int(entry.name)
    return None


def test_a_killed_service_comes_back_and_a_crash_loop_is_given_up_loudly(tmp_path):
    # Every service of the stack has a port (each is told where the others are); two of them run.
    ports = dict(zip(["feedback", "reward", "policy", "inference"], _free_ports(4), strict=True))
    script = (
        "import pathlib, sys\n"
        "from rlhf.sdk.supervisor import RestartPolicy, Stack, serve\n"
        f"stack = Stack(data_dir=pathlib.Path({str(tmp_path)!r}), ports={ports!r})\n"
        f"policy = RestartPolicy(backoff_seconds=0.2, max_restarts=2, window_seconds=300)\n"
        f"sys.exit(serve(stack, {SERVICES!r}, policy))\n"
    )
    log = open(tmp_path / "serve.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    supervisor = subprocess.Popen(
        [sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        for service in SERVICES:
            up = lambda s=service: serving(ports[s]) or supervisor.poll() is not None  # noqa: E731
            wait_until(up, 120, f"{service} serving")
            assert supervisor.poll() is None, (tmp_path / "serve.log").read_text()
        pids = []
        for restart in range(3):  # the third death is one more than max_restarts allows
            pid = child(supervisor.pid, "feedback_service")
            assert pid is not None and pid not in pids
            pids.append(pid)
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not serving(ports["feedback"], 0.5), 10, "feedback down")
            assert serving(ports["reward"]), "the other service stopped serving"
            if restart < 2:
                wait_until(lambda: serving(ports["feedback"]), 60, "feedback back")
        time.sleep(2.0)  # well past the 0.2-0.8 s backoff: a restart would have happened by now
        assert child(supervisor.pid, "feedback_service") is None and not serving(ports["feedback"])
        assert supervisor.poll() is None and serving(ports["reward"]), "the supervisor stopped the others"
        output = (tmp_path / "serve.log").read_text()
        assert "the feedback service was killed by signal 9; restarting it" in output
        assert "GIVING UP on the feedback service" in output and "crash loop" in output
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 1  # it gave up on a service: not a clean exit
        assert not serving(ports["reward"], 0.5)
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
        log.close()
