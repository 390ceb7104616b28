"""Group commit for streams: a bounded buffer between reading items and committing them in groups."""

from __future__ import annotations

import asyncio
import collections

from feedback_service.models import NewFeedback
from rlhf.runtime.errors import InvalidArgument


class Pending:
    """One streamed item between reading and acknowledging: validated, or rejected with the reason."""

    __slots__ = ("index", "request_id", "item", "error")

    def __init__(self, index: int, request_id: str, item: NewFeedback | None, error: InvalidArgument | None) -> None:
        self.index = index
        self.request_id = request_id
        self.item = item
        self.error = error


class GroupBuffer:
    """Streamed items read but not yet committed, at most `capacity`; the committer takes groups.

    Costs one list append per item and one timer per group (not per item), which matters at high rates.
    """

    def __init__(self, group_size: int, capacity: int) -> None:
        self._group_size = max(1, group_size)
        self._capacity = max(self._group_size, capacity)
        self._items: collections.deque[Pending] = collections.deque()
        self._closed = False
        self.error: BaseException | None = None
        self._nonempty = asyncio.Event()  # an item arrived, or the stream ended
        self._full = asyncio.Event()  # a whole group is waiting, or the stream ended
        self._room = asyncio.Event()  # below capacity again
        self._room.set()

    async def put(self, item: Pending) -> None:
        await self.put_many([item])

    async def put_many(self, items: list[Pending]) -> None:
        """Add one message's items at once (waiting while the buffer is at capacity), so the buffer holds
        at most capacity + one message's items."""
        while len(self._items) >= self._capacity:
            self._room.clear()
            await self._room.wait()
        self._items.extend(items)
        self._nonempty.set()
        if len(self._items) >= self._group_size:
            self._full.set()

    def close(self, error: BaseException | None = None) -> None:
        self._closed = True
        self.error = error
        self._nonempty.set()
        self._full.set()

    async def take(self, wait: float) -> list[Pending] | None:
        """The next group: up to group_size items, as soon as that many wait, else what arrived within
        `wait` seconds of the first. None when the stream ended and everything was taken."""
        while not self._items and not self._closed:
            self._nonempty.clear()
            await self._nonempty.wait()
        if not self._items:
            return None
        if len(self._items) < self._group_size and not self._closed and wait > 0:
            self._full.clear()
            try:
                await asyncio.wait_for(self._full.wait(), wait)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        count = min(self._group_size, len(self._items))
        group = [self._items.popleft() for _ in range(count)]
        self._room.set()
        return group
