"""Run a real service on 127.0.0.1:0 for tests: in a background thread with its own event loop (ServerThread),
or as its own process (ServiceProcess)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from rlhf.runtime.server import RunningServer


class ServerThread:
    """Starts `start(config)` (a service's app.start) in a thread; `address` is where it listens."""

    def __init__(self, start: Callable[[Any], Awaitable[RunningServer]], config: Any) -> None:
        self._start = start
        self._config = config
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.running: RunningServer | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.running = self._loop.run_until_complete(self._start(self._config))
        except BaseException as error:  # surfaced to the test in __enter__
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(120)
        if self._error:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, grace: float = 1.0) -> None:
        if self.running is None:
            return
        future = asyncio.run_coroutine_threadsafe(self.running.stop(grace), self._loop)
        future.result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self.running = None

    @property
    def address(self) -> str:
        assert self.running is not None
        return self.running.address

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)


ROOT = pathlib.Path(__file__).resolve().parent.parent


class ServiceProcess:
    """`python -m <module> --port 0 --data-dir DIR [args]` as a real process. The port is read from its own
    'listening on' log line (no port bound and released first, which another process could take meanwhile).
    The service's own RLHF_<SERVICE>_* variables are not passed on, so only `args` (and `env`) configure it;
    without a data dir (the gateway has none) no --data-dir is passed."""

    def __init__(
        self,
        module: str,
        data_dir: pathlib.Path | None,
        *args: str,
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        prefix = f"RLHF_{module.removesuffix('_service').upper()}_"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(prefix)}
        where = ["--data-dir", str(data_dir)] if data_dir is not None else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--port", "0", *where, *args],
            cwd=ROOT,
            env={**inherited, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec,  # e.g. resource limits, inherited by the service's workers
        )
        self.lines: list[str] = []
        self.port = 0
        assert self.process.stderr is not None
        deadline = time.monotonic() + 60
        while not self.port and time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if "listening on" in line:
                self.port = int(line.rsplit(":", 1)[1])
        if not self.port:
            self.kill()
            raise AssertionError(f"the server never said where it listens:\n{''.join(self.lines)}")
        # Keep reading its log, so a full pipe never blocks the server.
        self._reader = threading.Thread(target=self.lines.extend, args=(self.process.stderr,), daemon=True)
        self._reader.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def feedback_thread(data_dir: pathlib.Path, port: int = 0) -> ServerThread:
    """The feedback service in this process on 127.0.0.1:port (0: a free one), its SQLite file in data_dir
    (use as a context)."""
    from feedback_service.app import start
    from feedback_service.config import FeedbackServiceConfig
    from rlhf.runtime.config import ServerConfig

    config = FeedbackServiceConfig.from_env(server=ServerConfig(service="feedback", port=port, data_dir=data_dir))
    return ServerThread(start, config)
