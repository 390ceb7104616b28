"""Request ids: one id follows a request through every service it reaches, so one training run can be read
across the four services' logs.

A server takes the id from the call's `x-request-id` metadata (or makes one) and binds it to the handler's
context (rlhf.runtime.interceptors); calls made within carry it on: the services' own channels add it
(rlhf.runtime.tls), the SDK's clients send it (rlhf.sdk.clients), and a training job's worker inherits its
job's id through the job's spec.json (rlhf.runtime.jobs, rlhf.runtime.worker). A caller may choose the id:
send the metadata, or make the calls inside `bound("my-id")`.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import uuid
from collections.abc import Iterable, Iterator

METADATA_KEY = "x-request-id"
# Ids from outside are logged as they are: only these characters, at most this long, else a new id is made.
_ALLOWED = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

_CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("rlhf_request_id", default="")
# The id of everything this process does when no context names one (a training worker: its job's id).
_process_default = ""


def new() -> str:
    return uuid.uuid4().hex


def current() -> str:
    """The request id of the running context ("" when there is none)."""
    return _CURRENT.get() or _process_default


def acceptable(value: str) -> bool:
    return bool(_ALLOWED.fullmatch(value))


def set_process_default(value: str) -> None:
    """Make `value` the id of this process's calls outside any bound context (a worker: its job's id)."""
    global _process_default
    _process_default = value if acceptable(value) else ""


def from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The caller's id from a call's metadata, or "" when it sent none (or one not fit to log)."""
    for key, value in metadata or ():
        if key == METADATA_KEY and isinstance(value, str) and acceptable(value):
            return value
    return ""


def bind(value: str) -> contextvars.Token[str]:
    """Bind `value` to the running context (undo with `unbind(token)`)."""
    return _CURRENT.set(value)


def unbind(token: contextvars.Token[str]) -> None:
    try:
        _CURRENT.reset(token)
    except ValueError:  # an async generator closed from another context: that context never had it bound
        pass


@contextlib.contextmanager
def bound(value: str) -> Iterator[str]:
    """Calls made inside carry `value` as their request id."""
    token = bind(value)
    try:
        yield value
    finally:
        unbind(token)


def outgoing() -> list[tuple[str, str]] | None:
    """The metadata that passes the current id on (None when there is none: a call's metadata as before)."""
    value = current()
    return [(METADATA_KEY, value)] if value else None
