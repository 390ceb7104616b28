"""A cache of loaded models keyed by folder, least recently used evicted first, capped by count and bytes.

Loading is lazy and happens once per key even when many requests ask for it at the same moment: the first
request starts one loading task, the others await that same task. Loading (disk reads, weight conversion)
runs in a thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

V = TypeVar("V")
log = logging.getLogger(__name__)


def parameter_bytes(modules: Iterable[Any]) -> int:
    """Bytes of the parameters and buffers of torch modules (without importing torch here): what a cached
    model holds, for the cache's byte limit and the metrics."""
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            total += tensor.numel() * tensor.element_size()
    return total


class ModelCache(Generic[V]):
    def __init__(
        self,
        loader: Callable[[str], V],
        capacity: int = 4,
        max_bytes: int = 0,
        size_of: Callable[[V], int] = lambda _: 0,
    ) -> None:
        if capacity < 1:
            raise ValueError("model cache capacity must be at least 1")
        self.capacity = capacity
        # Also evict while the cached values' sizes exceed this; 0 = no byte limit. The newest always stays.
        self.max_bytes = max_bytes
        self._loader = loader  # blocking; runs in a thread
        self._size_of = size_of
        self._models: collections.OrderedDict[str, V] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Task[V]] = {}
        # How many loads ran (tests and metrics: concurrent first requests must count one).
        self.loads = 0

    def cached(self) -> list[str]:
        """Keys in memory, least recently used first."""
        return list(self._models)

    def loaded(self) -> list[tuple[str, V]]:
        """(key, value) of the models in memory, least recently used first (metrics read it from their thread)."""
        for _ in range(3):
            try:
                return list(self._models.items())
            except RuntimeError:  # changed during the copy by a load or an eviction: copy again
                continue
        return []

    async def get(self, key: str) -> V:
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        task = self._loading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(key))
            # Mark a failure as seen even if every waiter was cancelled (no "never retrieved" warning).
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._loading[key] = task
        # shield: a cancelled request must not cancel the load other requests are waiting for.
        return await asyncio.shield(task)

    async def _load(self, key: str) -> V:
        try:
            started = time.monotonic()
            self.loads += 1
            loaded = await asyncio.to_thread(self._loader, key)
            log.info("loaded model %s in %.2fs", key, time.monotonic() - started)
            self._models[key] = loaded
            self._evict()
            return loaded
        finally:
            # Success or failure, the next request finds it cached or tries again.
            self._loading.pop(key, None)

    def _evict(self) -> None:
        def too_big() -> bool:
            return bool(self.max_bytes) and sum(map(self._size_of, self._models.values())) > self.max_bytes

        while len(self._models) > 1 and (len(self._models) > self.capacity or too_big()):
            key, _ = self._models.popitem(last=False)
            log.info("evicted model %s from the cache", key)

    def clear(self) -> None:
        self._models.clear()
