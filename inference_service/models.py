"""A cache of loaded (tokenizer, model) pairs keyed by model folder, least recently used evicted first.

Loading is lazy and happens once per folder even when many requests ask for it at the same moment: the
first request starts one loading task, the others await that same task. Loading (disk reads, weight
conversion) runs in a thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from typing import Any, Callable

from rlhf.modeling import load_model, load_tokenizer, pick_device

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    path: str
    tokenizer: Any
    model: Any
    device: str
    # Parameter and buffer bytes, for the cache's optional byte limit.
    nbytes: int


def load_for_inference(path: str, device: str) -> LoadedModel:
    """Blocking: tokenizer and causal LM from `path`, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path, padding_side="left")
    model = load_model(AutoModelForCausalLM, path)
    model.to(device).eval()
    with torch.no_grad():
        nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return LoadedModel(path=path, tokenizer=tokenizer, model=model, device=device, nbytes=nbytes)


class ModelCache:
    def __init__(self, capacity: int = 4, device: str = "auto", max_bytes: int = 0,
                 loader: Callable[[str, str], LoadedModel] = load_for_inference) -> None:
        if capacity < 1:
            raise ValueError("model cache capacity must be at least 1")
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.device = pick_device(device)
        self._loader = loader
        self._models: collections.OrderedDict[str, LoadedModel] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        # How many loads ran (tests and metrics: concurrent first requests must count one).
        self.loads = 0

    def cached(self) -> list[str]:
        """Folders in memory, least recently used first."""
        return list(self._models)

    async def get(self, path: str) -> LoadedModel:
        if path in self._models:
            self._models.move_to_end(path)
            return self._models[path]
        task = self._loading.get(path)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(path))
            # Mark a failure as seen even if every waiter was cancelled (no "never retrieved" warning).
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._loading[path] = task
        # shield: a cancelled request must not cancel the load other requests are waiting for.
        return await asyncio.shield(task)

    async def _load(self, path: str) -> LoadedModel:
        try:
            started = time.monotonic()
            self.loads += 1
            loaded = await asyncio.to_thread(self._loader, path, self.device)
            log.info("loaded model %s on %s in %.2fs", path, self.device, time.monotonic() - started)
            self._models[path] = loaded
            self._evict()
            return loaded
        finally:
            # Success or failure, the next request finds it cached or tries again.
            self._loading.pop(path, None)

    def _evict(self) -> None:
        def too_big() -> bool:
            return bool(self.max_bytes) and sum(m.nbytes for m in self._models.values()) > self.max_bytes

        while len(self._models) > 1 and (len(self._models) > self.capacity or too_big()):
            path, _ = self._models.popitem(last=False)
            log.info("evicted model %s from the cache", path)

    def clear(self) -> None:
        self._models.clear()
