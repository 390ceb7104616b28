"""Errors of the command line: each becomes one clear line on stderr and a non-zero exit code.

Exit codes: 1 a job or import that ran and failed, 2 bad usage or an error answered by a service
(argparse's convention too), 3 a service that cannot be reached, 130 Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

import grpc

USAGE, UNREACHABLE, INTERRUPTED = 2, 3, 130

# What gRPC says when nothing answers at an address (connection refused, no such host, ...).
_CONNECT_FAILURES = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "dns resolution failed",
    "errors resolving",
    "socket closed",
    "connection reset",
)


class CliError(Exception):
    """An error to print as `rlhf: error: <message>` and exit with `code`."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.code = code


def unreachable(error: grpc.RpcError) -> bool:
    """True when the call never reached a server (as opposed to a server answering UNAVAILABLE itself)."""
    details = (error.details() or "").lower()
    return error.code() == grpc.StatusCode.UNAVAILABLE and any(text in details for text in _CONNECT_FAILURES)


def service_error(service: str, address: str, error: grpc.RpcError) -> CliError:
    """A service's gRPC error as the line users read: the status, the service's own message, and for a
    service that cannot be reached where it is and how to start or find it."""
    if unreachable(error):
        if "handshake failed" in (error.details() or "").lower():
            return CliError(
                f"the TLS handshake with the {service} service at {address} failed: its certificate is not "
                f"signed by the CA of --tls-ca (RLHF_TLS_CA_FILE), or is not for that address "
                f"(RLHF_TLS_SERVER_NAME), or it requires a client certificate (--tls-cert, --tls-key)",
                UNREACHABLE,
            )
        variable = f"RLHF_{service.upper()}_ADDR"
        # A plaintext client at a TLS server sees its connection closed, like a server going away.
        tls_hint = "" if os.environ.get("RLHF_TLS_CA_FILE") else "; if it serves TLS, pass its CA with --tls-ca"
        return CliError(
            f"cannot reach the {service} service at {address}. Start the stack with `rlhf serve all`, "
            f"or point {variable} (or --{service}-addr) at a running {service} service{tls_hint}",
            UNREACHABLE,
        )
    code = error.code().name
    details = error.details() or ""
    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
        return CliError(f"the {service} service at {address} does not support this yet (UNIMPLEMENTED): {details}")
    return CliError(f"{code}: {details}")


Client = TypeVar("Client")


@contextlib.contextmanager
def connected(client: Client) -> Iterator[Client]:
    """Use a typed client (rlhf.sdk.clients) and close it; its gRPC errors become CliErrors naming it."""
    try:
        with client:  # type: ignore[attr-defined]
            yield client
    except grpc.RpcError as error:
        raise service_error(client.service, client.address, error) from None  # type: ignore[attr-defined]


# --- Ctrl-C ----------------------------------------------------------------------------------------------

# The line Ctrl-C prints in a client command; a command that watches a job says that the job goes on.
_interrupt_line = ["rlhf: interrupted"]


@contextlib.contextmanager
def interrupt_says(line: str) -> Iterator[None]:
    """While inside, Ctrl-C prints `line` (as `rlhf: error: <line>`)."""
    previous = _interrupt_line[0]
    _interrupt_line[0] = f"rlhf: error: {line}"
    try:
        yield
    finally:
        _interrupt_line[0] = previous


def _exit_now(_signum: int, _frame: Any) -> None:
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - interrupted inside a write: what is buffered is lost, the line is not
        pass
    os.write(2, (_interrupt_line[0] + "\n").encode())
    os._exit(INTERRUPTED)


@contextlib.contextmanager
def exit_on_interrupt() -> Iterator[None]:
    """Ctrl-C ends a client command at once (exit code 130) with its line, unwinding nothing: a KeyboardInterrupt
    that lands inside a gRPC call can leave the channel's close() waiting forever. Only in the main thread
    (signal handlers live there); the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
