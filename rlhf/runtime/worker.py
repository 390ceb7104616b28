"""The worker side of a training job (see rlhf.runtime.jobs): spec in, JSON events out, SIGTERM as cancel."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import grpc

from rlhf.runtime import requestids
from rlhf.runtime.logs import setup_logging

log = logging.getLogger(__name__)


# Under torchrun a worker's parent is the launcher, not the server: the worker that handed over to torchrun
# passes the server's pid on in this variable, so every rank still stops when the server is gone.
SERVER_PID_ENV = "RLHF_WORKER_SERVER_PID"


class Cancelled(Exception):
    """Raised inside training when a cancel (SIGTERM) arrived; the worker saves and exits."""


class ReportedElsewhere(Exception):
    """A failure another process of the same job reports (a collective that failed because another rank
    died): the worker exits 1 without an error event of its own, so the job shows the other rank's reason."""


class JobContext:
    """What a worker's training code sees: its spec, its folder, progress reporting, cancellation."""

    def __init__(self, job_dir: pathlib.Path) -> None:
        self.job_dir = job_dir
        self.spec: dict[str, Any] = json.loads((job_dir / "spec.json").read_text())
        # The calls this worker makes carry the id of the request that created its job (rlhf.runtime.requestids).
        requestids.set_process_default(str(self.spec.get("request_id", "")))
        self.cancel_requested = False
        # Facts learnt along the way (e.g. the reward-model version) repeated in every progress event.
        self.sticky: dict[str, Any] = {}
        # Under torchrun only rank 0 reports progress and the result; every rank reports its own error.
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_reporter = self.rank == 0
        self._events = open(job_dir / "events.jsonl", "a")
        self._started = time.monotonic()
        # The server that launched us; if it dies (even by kill -9) we are re-parented and should stop,
        # since nobody would register our result and a restarted server reports the job INTERRUPTED.
        self._parent = os.getppid()
        self._server = int(os.environ.get(SERVER_PID_ENV, "0"))

    def _emit(self, event: dict[str, Any], every_rank: bool = False) -> None:
        if self.is_reporter or every_rank:
            self._events.write(json.dumps(event) + "\n")  # one short append per event: ranks do not interleave
            self._events.flush()

    def progress(self, **progress: Any) -> None:
        progress.setdefault("elapsed_seconds", round(time.monotonic() - self._started, 2))
        progress.update(self.sticky)
        self._emit({"type": "progress", "progress": progress})

    def result(self, result: dict[str, Any]) -> None:
        self._emit({"type": "result", "result": result})

    def error(self, message: str) -> None:
        self._emit({"type": "error", "message": f"rank {self.rank}: {message}" if self.rank else message}, True)

    @property
    def orphaned(self) -> bool:
        return os.getppid() != self._parent or (self._server > 0 and not _alive(self._server))

    def sleep(self, seconds: float) -> None:
        """time.sleep that a cancel (or the server's death) interrupts, raising Cancelled within 0.1 s."""
        deadline = time.monotonic() + seconds
        while True:
            self.check_cancelled()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))

    def check_cancelled(self) -> None:
        """Raise Cancelled after a cancel (SIGTERM) or once the launching server is gone."""
        if self.orphaned and not self.cancel_requested:
            log.warning("the server that started this job is gone; stopping")
            self.cancel_requested = True
        if self.cancel_requested:
            raise Cancelled()


def run_worker(component: str, train: Callable[[JobContext], dict[str, Any]], argv: list[str] | None = None) -> int:
    """Entry point of `python -m <service>.worker --job-dir DIR`: run `train`, report, exit code."""
    parser = argparse.ArgumentParser(description=f"{component} training worker")
    parser.add_argument("--job-dir", required=True, type=pathlib.Path)
    args = parser.parse_args(argv)
    setup_logging(f"{component}-worker")
    context = JobContext(args.job_dir)

    def on_term(_signum, _frame) -> None:
        context.cancel_requested = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = train(context)
    except Cancelled:
        log.info("cancelled")
        return 0
    except ReportedElsewhere as error:
        log.error("stopped: %s", error)
        return 1
    except Exception as error:  # noqa: BLE001 - the job's error message is what users read
        log.error("training failed:\n%s", traceback.format_exc())
        context.error(_describe(error))
        return 1
    context.result(result)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(error: Exception) -> str:
    if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        # A failed call (often a stream's _MultiThreadedRendezvous, whose str() is a multi-line repr).
        return f"a call to another service failed with {error.code().name}: {error.details()}"
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    return f"{type(error).__name__}: {message}"


def main_for(component: str, train: Callable[[JobContext], dict[str, Any]]) -> None:
    sys.exit(run_worker(component, train))
