"""Errors of the command line: each becomes one clear line on stderr and a non-zero exit code.

Exit codes: 1 a job or import that ran and failed, 2 bad usage or an error answered by a service
(argparse's convention too), 3 a service that cannot be reached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import grpc

USAGE, UNREACHABLE = 2, 3

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
        variable = f"RLHF_{service.upper()}_ADDR"
        return CliError(
            f"cannot reach the {service} service at {address}. Start the stack with `rlhf serve all`, "
            f"or point {variable} (or --{service}-addr) at a running {service} service",
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
