"""The shared server bootstrap (rlhf.runtime.server): one server per port, and a clear failure for the second.

gRPC enables SO_REUSEPORT by default on Linux, so a second server (say, a second `rlhf serve` with another data
dir) could bind a port that is already serving and the kernel would split calls between the two. Our servers
turn it off (`("grpc.so_reuseport", 0)` in ServerConfig.grpc_options): the second one must fail to start, with a
message that says the port is taken, and the first must keep answering every call.
"""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
import sys
import time

import grpc
import pytest

from feedback_service.app import start as start_feedback
from feedback_service.config import FeedbackServiceConfig
from rlhf.feedback.v1 import feedback_service_pb2 as pb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from rlhf.runtime.config import ServerConfig
from rlhf.runtime.server import PortInUse, start_server
from tests.servers import ServerThread

ROOT = pathlib.Path(__file__).resolve().parent.parent


def feedback_config(data_dir: pathlib.Path, port: int = 0) -> FeedbackServiceConfig:
    return FeedbackServiceConfig.from_env(server=ServerConfig(service="feedback", port=port, data_dir=data_dir))


@pytest.fixture
def first(tmp_path: pathlib.Path):
    """A real feedback server on a free port (bound by the server itself: port 0)."""
    with ServerThread(start_feedback, feedback_config(tmp_path / "first")) as server:
        yield server


def assert_only_first_answers(first: ServerThread, agent: str, calls: int) -> None:
    """Submit `calls` ratings, each over a new connection: the count goes 1, 2, 3, ... With a second server on
    the port, some connections would reach it (another database) and a count would repeat or lag."""
    for expected in range(1, calls + 1):
        with grpc.insecure_channel(first.address) as channel:
            stub = pb_grpc.FeedbackServiceStub(channel)
            request = pb.SubmitFeedbackRequest(agent_id=agent, prompt="p", response="r", score=0.5)
            stub.SubmitFeedback(request, timeout=10)
            stats = stub.GetFeedbackStats(pb.GetFeedbackStatsRequest(agent_id=agent), timeout=10).stats
        assert stats.feedback_count == expected


def test_start_server_on_a_taken_port_raises_port_in_use(first: ServerThread, tmp_path: pathlib.Path) -> None:
    config = ServerConfig(service="feedback", port=first.running.port, data_dir=tmp_path / "second")

    async def second() -> None:
        running = await start_server(config, [])
        await running.stop(0)  # only reached if the bind wrongly succeeded

    with pytest.raises(PortInUse) as caught:
        asyncio.run(second())
    message = str(caught.value)
    assert "already in use" in message and f"127.0.0.1:{first.running.port}" in message
    assert "--port" in message and "RLHF_FEEDBACK_PORT" in message  # says how to pick another
    assert_only_first_answers(first, "only-first", 3)


def test_a_second_service_on_a_taken_port_fails_and_the_first_keeps_serving(
    first: ServerThread, tmp_path: pathlib.Path
) -> None:
    """The whole service start (database, domain, server): PortInUse, and it leaves nothing running."""
    with pytest.raises(PortInUse, match="already in use"):
        with ServerThread(start_feedback, feedback_config(tmp_path / "second", port=first.running.port)):
            pass
    assert_only_first_answers(first, "still-first", 8)


def test_python_dash_m_on_a_taken_port_exits_with_a_clear_message(first: ServerThread, tmp_path: pathlib.Path) -> None:
    port = first.running.port
    process = subprocess.Popen(
        [sys.executable, "-m", "feedback_service", "--port", str(port), "--data-dir", str(tmp_path / "second")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break  # the process exited (stderr closed)
            lines.append(line)
            assert "listening on" not in line, f"a second server started on port {port}: {''.join(lines)}"
        assert process.wait(timeout=30) != 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = "".join(lines)
    assert "already in use" in stderr and f"127.0.0.1:{port}" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert_only_first_answers(first, "first-after-cli", 3)


def test_work_after_start_runs_once_signals_stop_the_server_gracefully(tmp_path: pathlib.Path) -> None:
    """A service's start-up work after it listens (collecting garbage before freezing start-up objects) runs
    once SIGINT/SIGTERM are handled: a signal in that moment stops the server gracefully. Before, such work ran
    first and a Ctrl-C meanwhile killed the reward service of `rlhf serve all` without its shutdown."""
    import os
    import signal

    from rlhf.runtime.server import serve_until_signal

    stopped: list[bool] = []

    async def note_stop() -> None:
        stopped.append(True)

    async def main() -> None:
        running = await start_server(ServerConfig(service="feedback", data_dir=tmp_path, port=0), [])
        running.on_stop.append(note_stop)
        await serve_until_signal(running, 1.0, when_handled=lambda: os.kill(os.getpid(), signal.SIGINT))

    asyncio.run(main())  # a KeyboardInterrupt here would mean the signal came before its handler
    assert stopped == [True]
