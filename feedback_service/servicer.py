"""gRPC face of the feedback service: converts protobuf to domain calls and back, nothing else."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2

from feedback_service.domain import FeedbackDomain
from feedback_service.models import COMPARISON, RATING, Ack, FeedbackInput, FeedbackRecord, ListFilters, Stats
from rlhf.feedback.v1 import feedback_service_pb2 as pb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from rlhf.runtime.decoding import Undecodable, bad_string_field, per_item, wire_fields
from rlhf.runtime.errors import InvalidArgument, translate_errors

T = TypeVar("T", pb.FeedbackAck, pb.StreamFeedbackResponse)

_KIND_FROM_PB: dict[int, str] = {
    pb.FEEDBACK_KIND_UNSPECIFIED: "",
    pb.FEEDBACK_KIND_RATING: RATING,
    pb.FEEDBACK_KIND_COMPARISON: COMPARISON,
}
_KIND_TO_PB: dict[str, pb.FeedbackKind] = {RATING: pb.FEEDBACK_KIND_RATING, COMPARISON: pb.FEEDBACK_KIND_COMPARISON}


def _kind(value: int) -> str:
    try:
        return _KIND_FROM_PB[value]
    except KeyError:
        raise InvalidArgument("kind", f"unknown kind {value}") from None


# Timestamp's valid range (years 1..9999); outside it the microseconds would overflow 64-bit columns.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def _micros(message: object, field: str) -> int | None:
    """A Timestamp field as microseconds since the epoch, None when unset."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    stamp: timestamp_pb2.Timestamp = getattr(message, field)
    if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS or not 0 <= stamp.nanos < 1_000_000_000:
        raise InvalidArgument(field, "is not a valid timestamp (years 1..9999)")
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    seconds, rest = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=rest * 1000)


def _plain_map(container: object) -> dict[str, str]:
    """A protobuf map as a dict: dict(container) goes through the Mapping ABC's keys view (~0.8 µs for one
    entry); iterating and indexing the container directly is ~2.5x faster."""
    return {key: container[key] for key in container} if container else {}  # type: ignore[attr-defined, index]


def _input(request: pb.SubmitFeedbackRequest) -> FeedbackInput:
    # Positional, in FeedbackInput's field order: this runs once per streamed item, and keywords cost ~0.6 µs.
    return FeedbackInput(
        request.agent_id,
        request.prompt,
        request.response,
        request.score if request.HasField("score") else None,
        request.chosen,
        request.rejected,
        request.margin if request.HasField("margin") else None,
        request.run_id,
        request.notes,
        request.generation_id,
        request.policy_version,
        _plain_map(request.metadata),
        request.request_id,
        _kind(request.kind),
    )


def _feedback(record: FeedbackRecord) -> pb.Feedback:
    return pb.Feedback(
        id=str(record.sequence),
        agent_id=record.agent_id,
        kind=_KIND_TO_PB[record.kind],
        prompt=record.prompt,
        response=record.response,
        score=record.score,
        chosen=record.chosen,
        rejected=record.rejected,
        margin=record.margin,
        run_id=record.run_id,
        notes=record.notes,
        generation_id=record.generation_id,
        policy_version=record.policy_version,
        metadata=record.metadata,
        request_id=record.request_id,
        created_at=_timestamp(record.created_at_us),
        sequence=record.sequence,
    )


def _stats(stats: Stats) -> pb.FeedbackStats:
    return pb.FeedbackStats(
        feedback_count=stats.feedback_count,
        rating_count=stats.rating_count,
        comparison_count=stats.comparison_count,
        score_mean=stats.score_mean,
        score_std=stats.score_std,
        score_min=stats.score_min,
        score_max=stats.score_max,
        score_histogram=stats.score_histogram,
        watermark=stats.watermark,
    )


def _stream_input(request: pb.SubmitFeedbackRequest) -> FeedbackInput:
    try:
        return _input(request)
    except InvalidArgument as error:
        # An unknown kind: let the domain reject this item alone, naming the field.
        return FeedbackInput(agent_id=request.agent_id, request_id=request.request_id, invalid=error)


def _inputs(request: pb.StreamFeedbackRequest) -> tuple[list[FeedbackInput], int]:
    """The items of one stream message (`feedback` when set or alone, then `items`), and how many of them
    came in `items` (those are acknowledged in results)."""
    items = request.items
    if not items:
        return [_stream_input(request.feedback)], 0
    inputs = [_stream_input(item) for item in items]
    if request.HasField("feedback"):
        inputs.insert(0, _stream_input(request.feedback))
    return inputs, len(items)


def _split_undecodable(request: Undecodable) -> tuple[list[FeedbackInput], int]:
    """A stream message that did not parse: when it is a batch, parse its items one by one, so that only the
    undecodable ones are rejected (each naming its field); otherwise the message is one rejected item."""
    parts = wire_fields(request.data)
    if not parts or not any(number == _ITEMS_FIELD for number, _ in parts):
        field = request.error.field.removeprefix("feedback.")
        return [FeedbackInput(agent_id="", invalid=InvalidArgument(field, request.error.description))], 0
    head = b"".join(chunk for number, chunk in parts if number == _FEEDBACK_FIELD)
    chunks = [chunk for number, chunk in parts if number == _ITEMS_FIELD]
    inputs = [_decoded_input(chunk) for chunk in ([head] if head else []) + chunks]
    return inputs, len(chunks)


_FEEDBACK_FIELD = pb.StreamFeedbackRequest.DESCRIPTOR.fields_by_name["feedback"].number
_ITEMS_FIELD = pb.StreamFeedbackRequest.DESCRIPTOR.fields_by_name["items"].number


def _decoded_input(data: bytes) -> FeedbackInput:
    try:
        return _stream_input(pb.SubmitFeedbackRequest.FromString(data))
    except Exception:  # noqa: BLE001 - DecodeError, and whatever else a parser may raise on garbage
        field = bad_string_field(data, pb.SubmitFeedbackRequest.DESCRIPTOR)
        error = (
            InvalidArgument(field, "is not valid UTF-8")
            if field
            else InvalidArgument("feedback", "is not a valid rlhf.feedback.v1.SubmitFeedbackRequest message")
        )
        return FeedbackInput(agent_id="", invalid=error)


class _BatchedIndexes:
    """Which stream indexes came in `items` (their acks go in `results`): ranges, dropped once passed, since
    acks are asked for in index order."""

    def __init__(self) -> None:
        self._ranges: collections.deque[tuple[int, int]] = collections.deque()
        self.end = 0  # the stream's item count so far (the next message's first index)

    def add(self, start: int, end: int) -> None:
        """Note a message ending at index `end` whose items from `start` on came in `items`."""
        self.end = end
        if start == end:
            return
        ranges = self._ranges
        if ranges and ranges[-1][1] == start:  # adjacent batches make one range (see holds_all)
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))

    def holds(self, index: int) -> bool:
        return self.holds_all(index, index)

    def holds_all(self, first: int, last: int) -> bool:
        """Whether every index from `first` to `last` came in `items`."""
        ranges = self._ranges
        while ranges and ranges[0][1] <= first:
            ranges.popleft()
        return bool(ranges) and ranges[0][0] <= first and last < ranges[0][1]


def _ack(form: type[T], ack: Ack) -> T:
    """`ack` as a FeedbackAck, or as a StreamFeedbackResponse for an item sent alone. Only the fields an
    accepted or a rejected item has are passed: this runs once per streamed item, and each keyword costs."""
    if ack.accepted:
        return form(
            request_id=ack.request_id, id=str(ack.sequence), accepted=True, duplicate=ack.duplicate, index=ack.index
        )
    return form(request_id=ack.request_id, reason=ack.reason, field=ack.field, index=ack.index)


class _Acknowledger:
    """The forms of one stream's acknowledgements: an item sent alone in `feedback` gets a response of its
    own; items sent in `items` get FeedbackAcks in `results`, or, once the client asked for compact acks,
    those stored as new rows (with a request_id the client chose) go in StoredRanges. Each kind of a group's
    acks goes in its own responses, in index order."""

    def __init__(self) -> None:
        self.batched = _BatchedIndexes()
        self.compact = False  # the client asked for StoredRanges (StreamFeedbackRequest.compact_acks)
        self.unnamed: set[int] = set()  # with compact: indexes of batched items sent without a request_id

    def received(self, request: pb.StreamFeedbackRequest | None, inputs: list[FeedbackInput], in_items: int) -> None:
        """Note one message: its inputs (the last `in_items` came in `items`) start where the last ended."""
        self.compact = self.compact or (request is not None and request.compact_acks)
        end = self.batched.end + len(inputs)
        self.batched.add(end - in_items, end)
        if self.compact and in_items and not all(item.request_id for item in inputs):
            start = end - len(inputs)
            self.unnamed.update(start + i for i, item in enumerate(inputs) if not item.request_id)

    def responses(self, acks: list[Ack]) -> Iterator[pb.StreamFeedbackResponse]:
        if not acks:
            return
        first, last = acks[0], acks[-1]
        if self.batched.holds_all(first.index, last.index):  # the usual cases: one response for the group
            if not self.compact:
                yield pb.StreamFeedbackResponse(results=[_ack(pb.FeedbackAck, ack) for ack in acks])
                return
            if (
                not self.unnamed
                and last.sequence - first.sequence == len(acks) - 1
                and all(ack.accepted and not ack.duplicate for ack in acks)
            ):
                stored = pb.StoredRange(first_index=first.index, count=len(acks), first_id=first.sequence)
                yield pb.StreamFeedbackResponse(stored_ranges=[stored])
                return
        ranges: list[list[int]] = []  # [first_index, count, first_id]
        results: list[pb.FeedbackAck] = []
        for ack in acks:
            index = ack.index
            batched = self.batched.holds(index)
            if batched and self.compact and ack.accepted and not ack.duplicate and index not in self.unnamed:
                if results:
                    yield pb.StreamFeedbackResponse(results=results)
                    results = []
                run = ranges[-1] if ranges else None
                if run is not None and index == run[0] + run[1] and ack.sequence == run[2] + run[1]:
                    run[1] += 1
                else:
                    ranges.append([index, 1, ack.sequence])
                continue
            self.unnamed.discard(index)
            if ranges:
                yield _stored_ranges(ranges)
                ranges = []
            if batched:
                results.append(_ack(pb.FeedbackAck, ack))
                continue
            if results:
                yield pb.StreamFeedbackResponse(results=results)
                results = []
            yield _ack(pb.StreamFeedbackResponse, ack)
        if ranges:
            yield _stored_ranges(ranges)
        if results:
            yield pb.StreamFeedbackResponse(results=results)


def _stored_ranges(ranges: list[list[int]]) -> pb.StreamFeedbackResponse:
    return pb.StreamFeedbackResponse(
        stored_ranges=[pb.StoredRange(first_index=i, count=n, first_id=s) for i, n, s in ranges]
    )


@translate_errors
class FeedbackServicer(pb_grpc.FeedbackServiceServicer):
    def __init__(self, domain: FeedbackDomain) -> None:
        self._domain = domain

    async def SubmitFeedback(
        self, request: pb.SubmitFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitFeedbackResponse:
        item, stored = await self._domain.submit(_input(request))
        return pb.SubmitFeedbackResponse(
            id=str(stored.sequence),
            agent_id=item.agent_id,
            score=stored.score,
            created_at=_timestamp(stored.created_at_us),
            duplicate=stored.duplicate,
            request_id=item.request_id,
            kind=_KIND_TO_PB[stored.kind],
            policy_version=stored.policy_version,
        )

    @per_item
    async def StreamFeedback(
        self, request_iterator: AsyncIterator[pb.StreamFeedbackRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamFeedbackResponse]:
        acknowledger = _Acknowledger()

        async def batches() -> AsyncIterator[list[FeedbackInput]]:
            async for request in request_iterator:
                if isinstance(request, Undecodable):
                    inputs, in_items = _split_undecodable(request)
                    acknowledger.received(None, inputs, in_items)
                else:
                    inputs, in_items = _inputs(request)
                    acknowledger.received(request, inputs, in_items)
                yield inputs

        async for acks in self._domain.ingest_batches(batches()):
            for response in acknowledger.responses(acks):
                yield response

    async def ListFeedback(
        self, request: pb.ListFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFeedbackResponse:
        filters = ListFilters(
            kind=_kind(request.kind),
            start_us=_micros(request, "start_time"),
            end_us=_micros(request, "end_time"),
            min_score=request.min_score if request.HasField("min_score") else None,
            max_score=request.max_score if request.HasField("max_score") else None,
            policy_version=request.policy_version,
            run_id=request.run_id,
        )
        page = await self._domain.list_feedback(request.agent_id, filters, request.page_size, request.page_token)
        return pb.ListFeedbackResponse(feedback=[_feedback(r) for r in page.records], next_page_token=page.next_token)

    async def GetFeedbackStats(
        self, request: pb.GetFeedbackStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetFeedbackStatsResponse:
        result = await self._domain.stats(
            request.agent_id,
            _micros(request, "start_time"),
            _micros(request, "end_time"),
            request.group_by_policy_version,
        )
        return pb.GetFeedbackStatsResponse(
            stats=_stats(result.overall),
            by_policy_version=[
                pb.PolicyVersionStats(policy_version=version, stats=_stats(stats))
                for version, stats in sorted((result.by_policy_version or {}).items())
            ],
        )

    async def ExportFeedback(
        self, request: pb.ExportFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExportFeedbackResponse]:
        async for chunk in self._domain.export(
            request.agent_id, _kind(request.kind), request.watermark, request.after_sequence
        ):
            yield pb.ExportFeedbackResponse(feedback=[_feedback(r) for r in chunk.records], watermark=chunk.watermark)

    async def DeleteFeedback(
        self, request: pb.DeleteFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteFeedbackResponse:
        deleted = await self._domain.delete(request.agent_id, list(request.ids), request.all)
        return pb.DeleteFeedbackResponse(deleted_count=deleted)
