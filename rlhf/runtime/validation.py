"""Checks shared by every service's request validation; each raises InvalidArgument naming the field."""

from __future__ import annotations

import math
import re

from rlhf.runtime.errors import InvalidArgument

AGENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
VERSION_PATTERN = re.compile(r"^v[1-9][0-9]{0,8}$")


def agent_id(value: str, field: str = "agent_id") -> str:
    """Letters, digits and `_.-`, 1..64 characters, not '.' or '..' (so it is safe as a folder name)."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not AGENT_ID_PATTERN.match(value) or value in {".", ".."}:
        raise InvalidArgument(field, "must be 1..64 letters, digits, '_', '.' or '-'")
    return value


def version(value: str, field: str = "version", allow: tuple[str, ...] = ("", "latest")) -> str:
    """A registry version 'vN', or one of the allowed keywords."""
    if value in allow:
        return value
    if not VERSION_PATTERN.match(value):
        raise InvalidArgument(field, f"must be 'vN' (for example 'v3') or one of {list(allow)}")
    return value


def text(value: str, field: str, max_chars: int, required: bool = True) -> str:
    if required and not value.strip():
        raise InvalidArgument(field, "must not be empty")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"is {len(value)} characters; at most {max_chars} are allowed")
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters")
    return value


def number_in(value: float, field: str, low: float, high: float) -> float:
    if not math.isfinite(value) or value < low or value > high:
        raise InvalidArgument(field, f"must be a finite number in [{low}, {high}], got {value}")
    return value


def int_in(value: int, field: str, low: int, high: int) -> int:
    if value < low or value > high:
        raise InvalidArgument(field, f"must be in [{low}, {high}], got {value}")
    return value


def page_size(value: int, field: str = "page_size", default: int = 50, maximum: int = 500) -> int:
    if value < 0:
        raise InvalidArgument(field, "must not be negative")
    return min(value or default, maximum)


def offset_token(token: str, field: str = "page_token") -> int:
    """Page tokens that encode an offset or a key: a decimal integer string."""
    if not token:
        return 0
    if not token.isdigit():
        raise InvalidArgument(field, "is not a token returned by this service")
    return int(token)


def job_id(value: str, field: str = "job_id") -> str:
    """A job id as this service hands them out: required, at most 64 characters."""
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > 64 or "\x00" in value:
        raise InvalidArgument(field, "is not a job id this service hands out")
    return value
