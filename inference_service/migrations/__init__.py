"""The inference service's schema migrations (Alembic; rlhf.runtime.migrations runs them)."""

from __future__ import annotations

import pathlib

from inference_service.store import metadata
from rlhf.runtime.migrations import Schema


def schema() -> Schema:
    return Schema("inference", pathlib.Path(__file__).parent, metadata, legacy_revision="i0001")
