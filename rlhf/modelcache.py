"""A size-capped LRU cache of loaded models; each key loads once even under concurrent first requests."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Callable, Generic, Hashable, TypeVar

V = TypeVar("V")
log = logging.getLogger(__name__)


class ModelCache(Generic[V]):
    def __init__(self, load: Callable[[Hashable], V], capacity: int = 4) -> None:
        self._load = load  # blocking; runs in a thread
        self.capacity = capacity
        self._items: collections.OrderedDict[Hashable, V] = collections.OrderedDict()
        self._locks: dict[Hashable, asyncio.Lock] = {}
        self.loads = 0  # how many loads happened (tests check that concurrent firsts load once)

    async def get(self, key: Hashable) -> V:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            value = await asyncio.to_thread(self._load, key)
            self.loads += 1
            self._items[key] = value
            while len(self._items) > self.capacity:
                evicted, _ = self._items.popitem(last=False)
                log.info("evicted %s from the model cache", evicted)
            return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


