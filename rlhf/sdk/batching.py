"""Batching a stream of items into messages: whatever the producer has ready, up to a count and a byte budget
per message. A busy producer's items go out in full batches (one message for many items, which is what makes
high stream rates possible); a slow producer's items still go out at once, one by one."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any

_END = object()
# How long a partial batch waits for more items before it is sent (seconds): at most ~1/LINGER messages per
# second from a steady producer, for a few milliseconds of latency.
LINGER_SECONDS = 0.002


def take(pending: list[Any], max_items: int, max_bytes: int) -> int:
    """How many items from the head of `pending` make one message (at least one; ByteSize() measures)."""
    count = size = 0
    for item in pending[:max_items]:
        size += item.ByteSize()
        if count and size > max_bytes:
            break
        count += 1
    return count


def batches(
    items: Iterable[Any],
    prepare: Callable[[Any], Any],
    wrap: Callable[[list[Any]], Any],
    max_items: int,
    max_bytes: int,
    linger: float = LINGER_SECONDS,
) -> Iterator[Any]:
    """Messages `wrap(list of prepared items)` from a blocking iterable. A feeder thread pulls `items`, so that
    what is ready can be told from what is not; the iterable's exception is raised here."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def put(value: Any) -> None:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def feed() -> None:
        chunk: list[Any] = []
        try:
            for item in items:
                chunk.append(prepare(item))
                if len(chunk) >= max_items or ready.empty():  # full, or the sender may be waiting: hand it over
                    put(chunk)
                    chunk = []
                if stop.is_set():
                    return
            if chunk:
                put(chunk)
            put(_END)
        except BaseException as error:  # noqa: BLE001 - raised in the consumer
            put(error)

    threading.Thread(target=feed, name="stream-batcher", daemon=True).start()
    pending: list[Any] = []
    end: Any = None  # _END or the iterable's exception, once the feeder is done
    try:
        while pending or end is None:
            deadline = None
            while end is None and len(pending) < max_items:
                try:
                    if not pending:
                        got = ready.get()
                    else:  # linger a little for more, so a steady trickle is not one message per item
                        deadline = deadline or time.monotonic() + linger
                        got = ready.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if got is _END or isinstance(got, BaseException):
                    end = got
                else:
                    pending.extend(got)
            if pending:
                count = take(pending, max_items, max_bytes)
                message, pending = wrap(pending[:count]), pending[count:]
                yield message
        if isinstance(end, BaseException):
            raise end
    finally:
        stop.set()


async def abatches(
    items: Iterable[Any] | AsyncIterable[Any],
    prepare: Callable[[Any], Any],
    wrap: Callable[[list[Any]], Any],
    max_items: int,
    max_bytes: int,
    linger: float = LINGER_SECONDS,
) -> AsyncIterator[Any]:
    """batches() for asyncio: an async iterable is pulled by a task; a plain iterable (iterated on the event
    loop, so it is expected not to block) is cut into full batches."""
    if not isinstance(items, AsyncIterable):
        pending = [prepare(item) for item in items]
        while pending:
            count = take(pending, max_items, max_bytes)
            yield wrap(pending[:count])
            pending = pending[count:]
        return
    ready: asyncio.Queue[Any] = asyncio.Queue(max_items * 4)

    async def feed() -> None:
        try:
            async for item in items:
                await ready.put(prepare(item))
            await ready.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - raised in the consumer
            await ready.put(error)

    task = asyncio.create_task(feed())
    end: Any = None
    try:
        while end is None:
            got = await ready.get()
            batch: list[Any] = []
            deadline = asyncio.get_running_loop().time() + linger
            while True:
                if got is _END or isinstance(got, BaseException):
                    end = got
                    break
                batch.append(got)
                if len(batch) >= max_items:
                    break
                if ready.empty():  # linger a little for more (see batches())
                    left = deadline - asyncio.get_running_loop().time()
                    try:
                        got = await asyncio.wait_for(ready.get(), left) if left > 0 else ready.get_nowait()
                    except (asyncio.TimeoutError, asyncio.QueueEmpty):
                        break
                    continue
                got = ready.get_nowait()
            while batch:
                count = take(batch, max_items, max_bytes)
                yield wrap(batch[:count])
                batch = batch[count:]
        if isinstance(end, BaseException):
            raise end
    finally:
        task.cancel()
