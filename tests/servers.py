"""Run a real service on 127.0.0.1:0 in a background thread with its own event loop, for tests."""

from __future__ import annotations

import asyncio
import threading
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
