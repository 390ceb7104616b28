"""Checks shared by every service's request validation; each raises InvalidArgument naming the field."""

from __future__ import annotations

import base64
import math
import re

from rlhf.runtime.errors import InvalidArgument

# Matched with fullmatch: "$" would also match before a final newline ("agent\n").
AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# "v3", and "v15.2": a second version named after the same feedback count (rlhf.runtime.registry).
VERSION_PATTERN = re.compile(r"v[1-9][0-9]{0,8}(\.[1-9][0-9]{0,8})?")


def agent_id(value: str, field: str = "agent_id") -> str:
    """Letters, digits and `_.-`, 1..64 characters, not '.' or '..' (so it is safe as a folder name)."""
    if not value:
        raise InvalidArgument(field, "is required")
    if not AGENT_ID_PATTERN.fullmatch(value) or value in {".", ".."}:
        raise InvalidArgument(field, "must be 1..64 letters, digits, '_', '.' or '-'")
    return value


def version(value: str, field: str = "version", allow: tuple[str, ...] = ("", "latest")) -> str:
    """A registry version 'vN' or 'vN.K', or one of the allowed keywords."""
    if value in allow:
        return value
    if not VERSION_PATTERN.fullmatch(value):
        raise InvalidArgument(field, f"must be 'vN' or 'vN.K' (for example 'v3' or 'v15.2') or one of {list(allow)}")
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


# Keys in page tokens are database integers: positive and within a signed 64-bit column.
_TOKEN_KEY = re.compile(r"[1-9][0-9]{0,18}")
_TOKEN_MAX_CHARS = 128


def next_page_token(key: int, kind: str) -> str:
    """An opaque page token for keyset paging: the key of the page's last row, and what it lists (`kind`), so a
    token of one list is refused by another. Callers must treat it as opaque; its format may change."""
    return base64.urlsafe_b64encode(f"{kind}:{key}".encode()).decode().rstrip("=")


def page_token(token: str, kind: str, field: str = "page_token") -> int:
    """The key a token from next_page_token(kind) holds; 0 for "" (the first page). Anything else is refused."""
    if not token:
        return 0
    refused = InvalidArgument(field, "is not a page token returned by this list; pass next_page_token unchanged")
    if len(token) > _TOKEN_MAX_CHARS or not token.isascii():
        raise refused
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise refused from None
    prefix, _, key = text.partition(":")
    if prefix != kind or not _TOKEN_KEY.fullmatch(key) or int(key) >= 2**63:
        raise refused
    return int(key)


def job_id(value: str, field: str = "job_id") -> str:
    """A job id as this service hands them out: required, at most 64 characters."""
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > 64 or "\x00" in value:
        raise InvalidArgument(field, "is not a job id this service hands out")
    return value
