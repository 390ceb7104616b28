"""Plain records passed between the layers: no protobuf (transport) and no SQL (storage) in here."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from rlhf.runtime.errors import InvalidArgument

RATING = "rating"
COMPARISON = "comparison"
KINDS = (RATING, COMPARISON)


@dataclasses.dataclass(slots=True)
class FeedbackInput:
    """One item as the caller sent it, before validation. `kind` is "" when the caller left it to inference."""

    agent_id: str
    prompt: str = ""
    response: str = ""
    score: float | None = None
    chosen: str = ""
    rejected: str = ""
    margin: float | None = None
    run_id: str = ""
    notes: str = ""
    generation_id: str = ""
    policy_version: str = ""
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    request_id: str = ""
    kind: str = ""
    # Set when the transport could not even read the item (undecodable bytes, an unknown kind): validation
    # rejects the item with this error and nothing else is looked at.
    invalid: InvalidArgument | None = None


@dataclasses.dataclass(slots=True)
class FeedbackFields:
    """The fields a validated item and a stored row share."""

    agent_id: str
    kind: str
    prompt: str
    response: str
    score: float | None
    chosen: str
    rejected: str
    margin: float | None
    run_id: str
    notes: str
    generation_id: str
    policy_version: str
    request_id: str


@dataclasses.dataclass(slots=True)
class NewFeedback(FeedbackFields):
    """A validated item ready to store; `metadata_json` is already serialised (validation measured it)."""

    metadata_json: str


class Stored(NamedTuple):
    """What storing one item produced. For a duplicate, every field describes the original row."""

    sequence: int
    created_at_us: int
    duplicate: bool
    kind: str
    score: float | None
    policy_version: str


@dataclasses.dataclass(slots=True)
class FeedbackRecord(FeedbackFields):
    """One stored row."""

    sequence: int
    metadata: dict[str, str]
    created_at_us: int

    def size_bytes(self) -> int:
        """About what the row takes in a message: its texts in UTF-8 plus a generous allowance for the rest."""
        texts = (self.prompt, self.response, self.chosen, self.rejected, self.notes, self.run_id, self.request_id)
        size = sum(len(t.encode()) for t in texts) + len(self.generation_id) + len(self.policy_version)
        return size + sum(len(k.encode()) + len(v.encode()) + 8 for k, v in self.metadata.items()) + 128


def fit_bytes(records: list[FeedbackRecord], budget: int) -> list[FeedbackRecord]:
    """The longest head of `records` within `budget` bytes (at least one row, so paging always advances)."""
    total = 0
    for index, record in enumerate(records):
        total += record.size_bytes()
        if total > budget and index:
            return records[:index]
    return records


@dataclasses.dataclass(slots=True)
class ListFilters:
    """Row filters of ListFeedback (and the time window of stats). None / "" means no filter."""

    kind: str = ""
    start_us: int | None = None  # created_at >= start (inclusive)
    end_us: int | None = None  # created_at < end (exclusive)
    min_score: float | None = None  # ratings only: comparisons have no score
    max_score: float | None = None
    policy_version: str = ""
    run_id: str = ""


@dataclasses.dataclass(slots=True)
class Stats:
    """Summary of a set of rows; score figures cover ratings only (0 when there are none)."""

    feedback_count: int = 0
    rating_count: int = 0
    comparison_count: int = 0
    score_mean: float = 0.0
    score_std: float = 0.0  # population standard deviation
    score_min: float = 0.0
    score_max: float = 0.0
    score_histogram: list[int] = dataclasses.field(default_factory=lambda: [0] * 10)
    watermark: int = 0  # highest sequence among the rows


@dataclasses.dataclass(slots=True)
class StatsResult:
    overall: Stats
    by_policy_version: dict[str, Stats] | None = None


@dataclasses.dataclass(slots=True)
class Page:
    records: list[FeedbackRecord]
    next_token: str  # "" on the last page


@dataclasses.dataclass(slots=True)
class Ack:
    """The answer to one streamed item; sent only after its group committed."""

    index: int
    request_id: str
    sequence: int = 0  # 0 when rejected
    accepted: bool = False
    duplicate: bool = False
    reason: str = ""
    field: str = ""


@dataclasses.dataclass(slots=True)
class ExportChunk:
    records: list[FeedbackRecord]
    watermark: int
