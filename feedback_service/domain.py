"""Feedback logic, independent of gRPC: validation, idempotent submits, group-committed streams, queries.

Database calls block, so none runs on the event loop: writes go through one writer thread (SQLite allows one
writer anyway, and serialised commits keep sequence order equal to commit order, which export watermarks
rely on; with several replicas on PostgreSQL the store keeps an agent's commits in order itself:
store.commit_in_sequence_order), reads through asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from feedback_service.attribution import Attributor
from feedback_service.config import FeedbackServiceConfig
from feedback_service.grouping import GroupBuffer, Pending
from feedback_service.models import (
    KINDS,
    Ack,
    ExportChunk,
    FeedbackInput,
    ListFilters,
    NewFeedback,
    Page,
    StatsResult,
    Stored,
    fit_bytes,
)
from feedback_service.store import FeedbackStore
from feedback_service.validate import FeedbackValidator, check_window, new_request_id
from rlhf.runtime import validation
from rlhf.runtime.errors import InvalidArgument

log = logging.getLogger(__name__)

T = TypeVar("T")

LIST_DEFAULT_PAGE_SIZE = 100
LIST_MAX_PAGE_SIZE = 1000


def _outcomes(acks: list[Ack]) -> dict[str, int]:
    """How many of `acks` were stored, duplicate and rejected (sums rather than a per-ack Counter update)."""
    accepted = sum(ack.accepted for ack in acks)
    duplicate = sum(ack.duplicate for ack in acks)
    return {"stored": accepted - duplicate, "duplicate": duplicate, "rejected": len(acks) - accepted}


def _retrieve(future: asyncio.Future[object]) -> None:
    """Mark a dropped future's exception as seen (asyncio logs unretrieved ones)."""
    if not future.cancelled():
        future.exception()


class _GroupsAfterFailure:
    """One stream's writes, run one after another in the writer thread: once one fails, the later ones raise
    (their items stay unacknowledged and unstored, for the client to send again) instead of writing."""

    def __init__(self) -> None:
        self._failed = False  # read and written only in the writer thread

    def insert(
        self, insert_many: Callable[[list[NewFeedback]], list[Stored]], items: list[NewFeedback]
    ) -> list[Stored]:
        if self._failed:
            raise RuntimeError("an earlier group of this stream failed to commit")
        try:
            return insert_many(items)
        except BaseException:
            self._failed = True
            raise


class FeedbackDomain:
    """Everything the feedback service does, callable from any transport (the gRPC servicer, tests)."""

    def __init__(self, store: FeedbackStore, config: FeedbackServiceConfig) -> None:
        self._store = store
        self._config = config
        self._validator = FeedbackValidator(config)
        self._attributor = Attributor(config.inference_address, security=config.server.security)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="feedback-writer")
        # For metrics (feedback_service.metrics): items acknowledged since start by outcome (stored, duplicate,
        # rejected), and the writes waiting for or running in the writer thread.
        self.items: collections.Counter[str] = collections.Counter()
        self.writes_waiting = 0

    async def close(self) -> None:
        """Let queued writes finish, then stop the writer thread."""
        await asyncio.to_thread(self._writer.shutdown, wait=True)
        await self._attributor.close()

    async def _write(self, function: Callable[..., T], *args: object) -> T:
        self.writes_waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._writer, function, *args)
        finally:
            self.writes_waiting -= 1

    # -- writes ---------------------------------------------------------------------------------------

    async def submit(self, raw: FeedbackInput) -> tuple[NewFeedback, Stored]:
        """Store one item (its own transaction). A replayed request_id returns the original row."""
        try:
            checked = self._validator.item(raw)
        except InvalidArgument:
            self.items["rejected"] += 1
            raise
        (item,) = await self._attributor.attribute_many([checked])
        (stored,) = await self._write(self._store.insert_many, [item])
        self.items["duplicate" if stored.duplicate else "stored"] += 1
        return item, stored

    async def ingest(self, items: AsyncIterator[FeedbackInput]) -> AsyncIterator[list[Ack]]:
        """ingest_batches() for a stream of single items."""

        async def singles() -> AsyncIterator[list[FeedbackInput]]:
            async for item in items:
                yield [item]

        async for acks in self.ingest_batches(singles()):
            yield acks

    async def ingest_batches(self, batches: AsyncIterator[list[FeedbackInput]]) -> AsyncIterator[list[Ack]]:
        """Acknowledge a stream of items arriving in batches (a batch is what one message carried), one Ack
        per item in stream order (`index` counts items across batches), in lists (one per committed group).

        Three stages run concurrently: reading+validating into a bounded buffer, committing groups (up
        to stream_group_size items, or what arrived within stream_group_wait_ms; attribution lookups of
        the group first, batched) in the writer thread, and handing acks to the caller. A group's acks are
        released only after its transaction committed. A rejected item gets its ack in order with its
        group and does not affect the others. Back pressure: when the buffer is full (the database or the
        caller taking acks falls behind), reading pauses, and HTTP/2 flow control then slows the client.
        """
        cfg = self._config
        buffer = GroupBuffer(cfg.stream_group_size, cfg.stream_max_buffered)
        outbox: asyncio.Queue[asyncio.Future[list[Ack]] | None | BaseException] = asyncio.Queue(1)
        reader = asyncio.create_task(self._read(batches, buffer))
        committer = asyncio.create_task(self._commit_groups(buffer, outbox))
        counts = collections.Counter[str]()
        try:
            while True:
                entry = await outbox.get()
                if entry is None:
                    break
                if isinstance(entry, BaseException):
                    raise entry
                acks = await entry
                group = _outcomes(acks)
                counts.update(group)
                self.items.update(group)
                yield acks
        finally:
            reader.cancel()
            committer.cancel()
            while not outbox.empty():  # commits started whose acks will not be sent
                entry = outbox.get_nowait()
                if isinstance(entry, asyncio.Future):
                    entry.cancel()
                    entry.add_done_callback(_retrieve)
        log.info(
            "feedback stream ended: %d stored, %d duplicate, %d rejected",
            counts["stored"],
            counts["duplicate"],
            counts["rejected"],
        )

    async def _read(self, batches: AsyncIterator[list[FeedbackInput]], buffer: GroupBuffer) -> None:
        index = 0
        validate = self._validator.item
        try:
            async for batch in batches:
                pendings: list[Pending] = []
                for raw in batch:
                    try:
                        item = validate(raw)
                        pendings.append(Pending(index, item.request_id, item, None))
                    except InvalidArgument as error:
                        pendings.append(Pending(index, raw.request_id or new_request_id(), None, error))
                    index += 1
                await buffer.put_many(pendings)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the pipeline
            buffer.close(error)
            return
        buffer.close()

    async def _commit_groups(
        self, buffer: GroupBuffer, outbox: asyncio.Queue[asyncio.Future[list[Ack]] | None | BaseException]
    ) -> None:
        """Start each group's commit in order and hand it on (a future of its acks) at once: while the caller
        waits for one group's acks, the next group's write is already queued in the writer thread, so the
        writer goes from group to group without waiting for the event loop (which may be busy validating a
        whole message; the writer sat idle ~40% of the time before). A failed write ends the stream, and the
        groups queued behind it write nothing (_GroupsAfterFailure): what is stored stays a prefix."""
        wait = self._config.stream_group_wait_ms / 1000
        end: BaseException | None = None
        failure = _GroupsAfterFailure()
        try:
            while (group := await buffer.take(wait)) is not None:
                commit = asyncio.ensure_future(self._commit(group, failure))
                try:
                    await outbox.put(commit)
                except asyncio.CancelledError:
                    commit.cancel()
                    commit.add_done_callback(_retrieve)
                    raise
            end = buffer.error
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - a database failure ends the stream with a status
            end = error
        await outbox.put(end)

    async def _commit(self, group: list[Pending], failure: _GroupsAfterFailure) -> list[Ack]:
        valid = [p.item for p in group if p.item is not None]
        # Attribution here, not on the read path: one batch of concurrent lookups per group, while reading
        # goes on; the rows are stored with their versions, so an ack still means "attributed and committed".
        valid = await self._attributor.attribute_many(valid)
        stored = iter(await self._write(failure.insert, self._store.insert_many, valid) if valid else [])
        # Positional Acks (index, request_id, sequence, accepted, duplicate, reason, field): once per item.
        acks: list[Ack] = []
        for pending in group:
            error = pending.error
            if error is None:
                result = next(stored)
                acks.append(Ack(pending.index, pending.request_id, result.sequence, True, result.duplicate))
            else:
                acks.append(Ack(pending.index, pending.request_id, 0, False, False, error.message, error.field))
        return acks

    async def delete(self, agent_id: str, ids: list[str], everything: bool) -> int:
        validation.agent_id(agent_id)
        if everything and ids:
            raise InvalidArgument("all", "is exclusive with ids")
        if not everything and not ids:
            raise InvalidArgument("ids", "name the ids to delete, or set all")
        if len(ids) > self._config.max_delete_ids:
            raise InvalidArgument("ids", f"has {len(ids)} ids; at most {self._config.max_delete_ids} per request")
        sequences: list[int] = []
        for value in ids:
            if not value.isascii() or not value.isdigit() or len(value) > 18:
                raise InvalidArgument("ids", f"{value[:40]!r} is not a feedback id (ids are decimal numbers)")
            sequences.append(int(value))
        deleted = await self._write(self._store.delete, agent_id, sequences, everything)
        log.info("deleted %d feedback rows of agent %s%s", deleted, agent_id, " (all)" if everything else "")
        return deleted

    # -- reads ----------------------------------------------------------------------------------------

    async def list_feedback(self, agent_id: str, filters: ListFilters, page_size: int, page_token: str) -> Page:
        """Newest first. The token is the last sequence returned (keyset), valid under concurrent inserts."""
        validation.agent_id(agent_id)
        limit = validation.page_size(page_size, default=LIST_DEFAULT_PAGE_SIZE, maximum=LIST_MAX_PAGE_SIZE)
        before = validation.page_token(page_token, "feedback") or None
        self._validator.check_filters(filters)
        # One row more than the page tells whether another page follows, without a count query.
        records = await asyncio.to_thread(self._store.list_feedback, agent_id, filters, before=before, limit=limit + 1)
        more = len(records) > limit
        fitted = fit_bytes(records[:limit], self._config.page_bytes)  # large rows: fewer per page
        more = more or len(fitted) < min(len(records), limit)
        records = fitted
        return Page(
            records=records, next_token=validation.next_page_token(records[-1].sequence, "feedback") if more else ""
        )

    async def stats(
        self, agent_id: str, start_us: int | None, end_us: int | None, group_by_version: bool
    ) -> StatsResult:
        validation.agent_id(agent_id)
        check_window(start_us, end_us)
        return await asyncio.to_thread(self._store.stats, agent_id, start_us, end_us, group_by_version)

    async def export(self, agent_id: str, kind: str, watermark: int, after_sequence: int) -> AsyncIterator[ExportChunk]:
        """Rows in sequence order with after_sequence < sequence <= watermark, in chunks.

        A watermark of 0 is fixed at the agent's newest row when the export starts, so rows that arrive
        during the export are left out and training can record exactly what it used. At least one chunk
        is yielded (possibly empty) so the caller always learns the watermark.
        """
        validation.agent_id(agent_id)
        if kind and kind not in KINDS:
            raise InvalidArgument("kind", f"must be one of {list(KINDS)}")
        if watermark < 0:
            raise InvalidArgument("watermark", "must not be negative")
        if after_sequence < 0:
            raise InvalidArgument("after_sequence", "must not be negative")
        if watermark == 0:
            watermark = await asyncio.to_thread(self._store.max_sequence, agent_id)
        chunk_size = self._config.export_chunk_size
        sent_any = False
        while True:
            records = await asyncio.to_thread(
                self._store.export_chunk, agent_id, kind, watermark, after_sequence, chunk_size
            )
            fitted = fit_bytes(records, self._config.page_bytes)  # large rows: the rest in the next message
            if fitted or not sent_any:
                yield ExportChunk(records=fitted, watermark=watermark)
                sent_any = True
            if len(records) < chunk_size and len(fitted) == len(records):
                return
            after_sequence = fitted[-1].sequence
