"""Validation of feedback items and query filters; each failure is InvalidArgument naming the field."""

from __future__ import annotations

import json
import uuid

from feedback_service.config import FeedbackServiceConfig
from feedback_service.models import COMPARISON, KINDS, RATING, FeedbackInput, ListFilters, NewFeedback
from rlhf.runtime import validation
from rlhf.runtime.errors import InvalidArgument

_METADATA_CACHE_ENTRIES = 4096  # distinct small metadata maps remembered (agents repeat the same few)
_METADATA_CACHE_CHARS = 512  # ... each at most this long as JSON, so the cache stays within ~2 MB
_AGENT_CACHE_ENTRIES = 4096  # agent ids known to be valid


class FeedbackValidator:
    """Checks items against the configured caps (texts, ids, metadata) and the kinds' rules.

    This runs once per streamed item, so the common case is kept cheap: valid texts pass one combined check
    (validation.text is called only to word a failure), and agent ids and small metadata maps seen before
    are not checked or serialised again.
    """

    def __init__(self, config: FeedbackServiceConfig) -> None:
        self._config = config
        self._metadata: dict[tuple[tuple[str, str], ...], str] = {}
        self._agents: set[str] = set()

    def item(self, raw: FeedbackInput) -> NewFeedback:
        """A storable item, or InvalidArgument naming the first offending field. Fills in request_id."""
        cfg = self._config
        if raw.invalid is not None:
            raise raw.invalid
        if raw.agent_id not in self._agents:
            validation.agent_id(raw.agent_id)
            if len(self._agents) >= _AGENT_CACHE_ENTRIES:
                self._agents.clear()
            self._agents.add(raw.agent_id)
        kind = raw.kind or (COMPARISON if raw.chosen or raw.rejected else RATING)
        if kind not in KINDS:
            raise InvalidArgument("kind", f"must be one of {list(KINDS)}")
        limit = cfg.max_text_chars
        _text(raw.prompt, "prompt", limit)
        if kind == RATING:
            _text(raw.response, "response", limit)
            if raw.score is None:
                raise InvalidArgument("score", "is required for a rating")
            validation.number_in(raw.score, "score", 0.0, 1.0)
            if raw.chosen or raw.rejected:
                raise InvalidArgument("chosen" if raw.chosen else "rejected", "only applies to comparisons")
            if raw.margin is not None:
                raise InvalidArgument("margin", "only applies to comparisons")
        else:
            _text(raw.chosen, "chosen", limit)
            _text(raw.rejected, "rejected", limit)
            if raw.chosen == raw.rejected:
                raise InvalidArgument("rejected", "must differ from chosen")
            if raw.margin is not None:
                validation.number_in(raw.margin, "margin", 0.0, float("inf"))
            if raw.score is not None:
                raise InvalidArgument("score", "only applies to ratings")
            if raw.response:
                raise InvalidArgument("response", "only applies to ratings; use chosen and rejected")
        if raw.notes:
            _text(raw.notes, "notes", limit, required=False)
        ids = cfg.max_id_chars
        for name, value in (
            ("run_id", raw.run_id),
            ("generation_id", raw.generation_id),
            ("policy_version", raw.policy_version),
            ("request_id", raw.request_id),
        ):
            if value:
                _text(value, name, ids, required=False)
        # Positional, in NewFeedback's field order (FeedbackFields, then metadata_json): once per streamed item.
        return NewFeedback(
            raw.agent_id,
            kind,
            raw.prompt,
            raw.response,
            raw.score,
            raw.chosen,
            raw.rejected,
            raw.margin,
            raw.run_id,
            raw.notes,
            raw.generation_id,
            raw.policy_version,
            raw.request_id or new_request_id(),
            self._metadata_json(raw.metadata) if raw.metadata else "{}",
        )

    def _metadata_json(self, metadata: dict[str, str]) -> str:
        key = tuple(metadata.items())
        known = self._metadata.get(key)
        if known is not None:
            return known
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
        encoded = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
        if len(encoded) <= _METADATA_CACHE_CHARS:
            if len(self._metadata) >= _METADATA_CACHE_ENTRIES:
                self._metadata.clear()
            self._metadata[key] = encoded
        return encoded

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


def _text(value: str, field: str, max_chars: int, required: bool = True) -> None:
    """validation.text, with the common case (a valid text) in one expression."""
    if len(value) > max_chars or "\x00" in value or (required and (not value or value.isspace())):
        validation.text(value, field, max_chars, required)  # raises, naming the field


def check_window(start_us: int | None, end_us: int | None) -> None:
    if start_us is not None and end_us is not None and end_us < start_us:
        raise InvalidArgument("end_time", "must not be before start_time")


def new_request_id() -> str:
    """The idempotency key the server assigns when the client sent none."""
    return uuid.uuid4().hex
