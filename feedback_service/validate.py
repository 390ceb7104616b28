"""Validation of feedback items and query filters; each failure is InvalidArgument naming the field."""

from __future__ import annotations

import json
import uuid

from feedback_service.config import FeedbackServiceConfig
from feedback_service.models import COMPARISON, KINDS, RATING, FeedbackInput, ListFilters, NewFeedback
from rlhf.runtime import validation
from rlhf.runtime.errors import InvalidArgument


class FeedbackValidator:
    """Checks items against the configured caps (texts, ids, metadata) and the kinds' rules."""

    def __init__(self, config: FeedbackServiceConfig) -> None:
        self._config = config

    def item(self, raw: FeedbackInput) -> NewFeedback:
        """A storable item, or InvalidArgument naming the first offending field. Fills in request_id."""
        cfg = self._config
        if raw.invalid is not None:
            raise raw.invalid
        validation.agent_id(raw.agent_id)
        kind = raw.kind or (COMPARISON if raw.chosen or raw.rejected else RATING)
        if kind not in KINDS:
            raise InvalidArgument("kind", f"must be one of {list(KINDS)}")
        validation.text(raw.prompt, "prompt", cfg.max_text_chars)
        if kind == RATING:
            validation.text(raw.response, "response", cfg.max_text_chars)
            if raw.score is None:
                raise InvalidArgument("score", "is required for a rating")
            validation.number_in(raw.score, "score", 0.0, 1.0)
            for name in ("chosen", "rejected"):
                if getattr(raw, name):
                    raise InvalidArgument(name, "only applies to comparisons")
            if raw.margin is not None:
                raise InvalidArgument("margin", "only applies to comparisons")
        else:
            validation.text(raw.chosen, "chosen", cfg.max_text_chars)
            validation.text(raw.rejected, "rejected", cfg.max_text_chars)
            if raw.chosen == raw.rejected:
                raise InvalidArgument("rejected", "must differ from chosen")
            if raw.margin is not None:
                validation.number_in(raw.margin, "margin", 0.0, float("inf"))
            if raw.score is not None:
                raise InvalidArgument("score", "only applies to ratings")
            if raw.response:
                raise InvalidArgument("response", "only applies to ratings; use chosen and rejected")
        validation.text(raw.notes, "notes", cfg.max_text_chars, required=False)
        for name in ("run_id", "generation_id", "policy_version", "request_id"):
            validation.text(getattr(raw, name), name, cfg.max_id_chars, required=False)
        return NewFeedback(
            agent_id=raw.agent_id,
            kind=kind,
            prompt=raw.prompt,
            response=raw.response,
            score=raw.score,
            chosen=raw.chosen,
            rejected=raw.rejected,
            margin=raw.margin,
            run_id=raw.run_id,
            notes=raw.notes,
            generation_id=raw.generation_id,
            policy_version=raw.policy_version,
            metadata_json=self._metadata_json(raw.metadata),
            request_id=raw.request_id or new_request_id(),
        )

    def _metadata_json(self, metadata: dict[str, str]) -> str:
        if not metadata:
            return "{}"
        cfg = self._config
        if len(metadata) > cfg.max_metadata_entries:
            raise InvalidArgument(
                "metadata", f"has {len(metadata)} entries; at most {cfg.max_metadata_entries} are allowed"
            )
        size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
        if size > cfg.max_metadata_bytes:
            raise InvalidArgument("metadata", f"is {size} bytes; at most {cfg.max_metadata_bytes} are allowed")
        if any(not key for key in metadata):
            raise InvalidArgument("metadata", "keys must not be empty")
        return json.dumps(metadata, ensure_ascii=False, sort_keys=True)

    @staticmethod
    def check_filters(filters: ListFilters) -> None:
        if filters.kind and filters.kind not in KINDS:
            raise InvalidArgument("kind", f"must be one of {list(KINDS)}")
        for name in ("min_score", "max_score"):
            value = getattr(filters, name)
            if value is not None:
                validation.number_in(value, name, 0.0, 1.0)
        if filters.min_score is not None and filters.max_score is not None and filters.min_score > filters.max_score:
            raise InvalidArgument("max_score", "must not be below min_score")
        check_window(filters.start_us, filters.end_us)


def check_window(start_us: int | None, end_us: int | None) -> None:
    if start_us is not None and end_us is not None and end_us < start_us:
        raise InvalidArgument("end_time", "must not be before start_time")


def new_request_id() -> str:
    """The idempotency key the server assigns when the client sent none."""
    return uuid.uuid4().hex
