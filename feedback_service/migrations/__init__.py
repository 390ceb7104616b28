"""The feedback service's schema migrations (Alembic; rlhf.runtime.migrations runs them)."""

from __future__ import annotations

import pathlib

from feedback_service.store import metadata_obj
from rlhf.runtime.migrations import Schema


def schema() -> Schema:
    return Schema("feedback", pathlib.Path(__file__).parent, metadata_obj, legacy_revision="f0001")
