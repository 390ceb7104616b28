"""Generation engines: the seam between the domain and whatever runs the model.

`GenerationEngine.submit(prompt, params)` returns a `Generation`: an async iterator of text pieces, a
`result()` to await, and `cancel()`. Two engines ship:

- `BatchingEngine` (the default): continuous batching. One engine per loaded model version runs a decode
  loop on one thread while it has work. Each step is one forward pass over the batch with an attention mask
  and per-row position ids: every decoding row feeds its last token, and requests that arrived meanwhile join
  in the same pass (their left-padded prompts are the pass's columns; the decoding rows' extra columns are
  masked pads). Finished or cancelled rows leave between two steps (their rows are dropped, and columns that
  only padding still uses are trimmed); when masked holes make the cache over twice as wide as its longest
  row, the rows are compacted. Measured on the tiny model, this one-pass join beat a separate prefill pass
  per join (bench/README.md).
- `SequentialEngine`: today's one-at-a-time path (each request its own loop in an executor thread), kept for
  models whose cache cannot be stacked, for `batching = false`, and as the benchmark's baseline.

Each request samples from its own row of logits, in float32/float64, with its own torch.Generator seeded
from its seed (generation.sample_token), and its own stop rules (generation.TextTracker), so its settings
never mix with its neighbours'. A dedicated engine (vLLM, SGLang) can take over by implementing
`GenerationEngine.submit` and the `Generation` it returns (engine_for picks the engine per model).

Same seed alone or in a batch: the same tokens are drawn from the same per-row logits, and those logits
agree with the lone request's to float rounding only (a batched matmul may sum in another order, and a
left-padded row attends over more masked columns), so a text can differ where two tokens' probabilities
sit within ~1e-6 of the draw. That is rare: in the tests the texts match.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any, Protocol

import torch

from inference_service.generation import (
    GenerationResult,
    Plan,
    SamplingParams,
    TextTracker,
    TokenLoop,
    plan,
    sample_token,
)
from inference_service.models import LoadedModel
from rlhf.training import sequences
from rlhf.training.threads import run_here_with

log = logging.getLogger(__name__)

_END = object()
# How long an idle decode thread waits for the next request before it ends.
IDLE_SECONDS = 30.0


class Generation(Protocol):
    """One submitted request."""

    def __aiter__(self) -> AsyncIterator[str]:
        """Text pieces as they are produced (iterate at most once)."""
        ...

    async def result(self) -> GenerationResult:
        """The whole result, once generation ends (pieces not yet iterated are consumed)."""
        ...

    def cancel(self) -> None:
        """Stop now: the request leaves the batch before the next step. Harmless once finished."""
        ...


class GenerationEngine(Protocol):
    def submit(self, prompt: str, params: SamplingParams) -> Generation: ...


def engine_for(loaded: LoadedModel, batching: bool, max_batch_size: int) -> GenerationEngine:
    """The model's engine, made on first use and kept on the loaded model (so it goes when the model does)."""
    if loaded.engine is None:
        if batching and max_batch_size > 1 and stackable_cache(loaded.model):
            loaded.engine = BatchingEngine(loaded, max_batch_size)
        else:
            loaded.engine = SequentialEngine(loaded)
    return loaded.engine


def stackable_cache(model: Any) -> bool:
    """True when the model's KV cache is transformers' DynamicCache of plain (full-attention) layers: the
    only kind BatchingEngine knows how to pad and stack. Sliding-window or recurrent caches are not."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=model.config)
    except Exception:  # an older transformers or a config DynamicCache does not understand
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


# --- one at a time (the path without batching) ---------------------------------------------------------------


class _ThreadGeneration:
    def __init__(self, loop: TokenLoop) -> None:
        self._loop = loop
        self._pieces = iter(loop)

    async def __aiter__(self) -> AsyncIterator[str]:
        while True:
            # One token per hop to a thread: the event loop stays responsive and the client sees text early.
            piece = await asyncio.to_thread(next, self._pieces, _END)
            if piece is _END:
                return
            yield piece

    async def result(self) -> GenerationResult:
        return await asyncio.to_thread(self._drain)

    def _drain(self) -> GenerationResult:
        for _ in self._pieces:
            pass
        if self._loop.result is None:  # cancelled
            raise asyncio.CancelledError()
        return self._loop.result

    def cancel(self) -> None:
        self._loop.cancel()


class SequentialEngine:
    """Each request runs its own sampling loop in an executor thread (no shared forward passes)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    def submit(self, prompt: str, params: SamplingParams) -> Generation:
        return _ThreadGeneration(TokenLoop(self.loaded, prompt, params))


# --- continuous batching -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Failure:
    error: BaseException


class _BatchedGeneration:
    """The asyncio side of one request: the engine thread posts pieces, then the result (or a failure)."""

    def __init__(self, engine: BatchingEngine, prompt: str, params: SamplingParams) -> None:
        self.engine = engine
        self.prompt = prompt
        self.params = params
        self.cancelled = False  # set on the event loop, read by the engine thread (a plain bool is enough)
        # False when only the result is awaited: the engine then posts no pieces (no wake-up per token).
        self.wants_pieces = True
        self._iterating = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._result: GenerationResult | None = None

    # Called from the engine thread.
    def post(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            self.cancelled = True

    async def __aiter__(self) -> AsyncIterator[str]:
        self._iterating = True
        while self._result is None:
            item = await self._queue.get()
            if isinstance(item, str):
                yield item
            elif isinstance(item, _Failure):
                raise item.error
            else:
                self._result = item

    async def result(self) -> GenerationResult:
        if not self._iterating:
            self.wants_pieces = False
        async for _ in self:
            pass
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass
class _Row:
    request: _BatchedGeneration
    plan: Plan
    tracker: TextTracker
    last: int = -1  # the token to feed next


class BatchingEngine:
    """Continuous batching over one loaded model (see the module doc)."""

    def __init__(self, loaded: LoadedModel, max_batch_size: int) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self._lock = threading.Condition()
        self._waiting: collections.deque[_BatchedGeneration] = collections.deque()
        self._thread: threading.Thread | None = None
        # Steps run, the largest batch seen, rows that left because their caller cancelled, and compactions (tests).
        self.steps = 0
        self.peak_batch = 0
        self.cancelled_rows = 0
        self.compactions = 0

    def submit(self, prompt: str, params: SamplingParams) -> Generation:
        request = _BatchedGeneration(self, prompt, params)
        with self._lock:
            self._waiting.append(request)
            self._lock.notify()
            if self._thread is None:  # the decode thread runs while there is work, and a little longer
                self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
                self._thread.start()
        return request

    def _run(self) -> None:
        run_here_with(self.loaded.cpu_threads)  # this thread's own intra-op threads (rlhf.training.threads)
        batch = _Batch(self)
        while True:
            with self._lock:
                joining = []
                while self._waiting and len(batch.rows) + len(joining) < self.max_batch_size:
                    joining.append(self._waiting.popleft())
                if not joining and not batch.rows:
                    # Idle: wait a while before ending, so the next request finds the thread (and its
                    # OpenMP workers) warm instead of starting new ones.
                    self._lock.wait_for(lambda: self._waiting, timeout=IDLE_SECONDS)
                    if not self._waiting:
                        self._thread = None
                        return
                    continue
            try:
                batch.leave_cancelled()
                batch.advance([r for r in joining if not r.cancelled])
            except Exception as exc:  # a failed forward pass fails the requests in it, not the engine
                log.exception("generation step failed; failing the %d requests in the batch", len(batch.rows))
                for row in batch.rows:
                    row.request.post(_Failure(exc))
                for request in joining:
                    request.post(_Failure(exc))
                batch = _Batch(self)
            self.steps += 1
            self.peak_batch = max(self.peak_batch, len(batch.rows))


class _Batch:
    """The running batch: rows, their left-padded KV cache and attention mask (engine thread only)."""

    def __init__(self, engine: BatchingEngine) -> None:
        self.engine = engine
        self.loaded = loaded = engine.loaded
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None  # (rows, width) long, 0 over left padding
        self._keyword, self._extra = sequences.forward_keywords(loaded.model)
        self._pad_id = _pad_id(loaded.tokenizer)

    def _forward(self, inputs: Any, mask: Any, positions: Any, cache: Any) -> tuple[Any, Any]:
        with torch.inference_mode():
            out = self.loaded.model(
                input_ids=inputs,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._keyword: cache},
                **self._extra,
            )
        return out.logits[:, -1], (out[self._keyword] if self._keyword == "cache" else out.past_key_values)

    def leave_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.request.cancelled]
        if len(keep) < len(self.rows):
            self.engine.cancelled_rows += len(self.rows) - len(keep)
            self._keep(keep)

    def advance(self, requests: list[_BatchedGeneration]) -> None:
        """One forward pass: the joining prompts' prefill and every decoding row's next token together."""
        rows = [self._row(request) for request in requests]
        if not self.rows:
            if rows:
                self._prefill(rows)
            return
        if not rows:
            self._step()
            return
        # Decoding rows feed their last token after W-1 masked pads; joining rows feed their left-padded
        # prompt (width W) after a masked stretch as wide as the batch's cache. One forward pass for both.
        device, batch, width = self.loaded.device, len(self.rows), self.mask.shape[1]
        ids, prompt_mask = sequences.left_pad([r.plan.prompt_ids for r in rows], self._pad_id, device)
        wide = ids.shape[1]
        decoding = torch.full((batch, wide), self._pad_id, dtype=torch.long, device=device)
        decoding[:, -1] = torch.tensor([row.last for row in self.rows], dtype=torch.long, device=device)
        decoding_mask = self.mask.new_zeros((batch, wide))
        decoding_mask[:, -1] = 1
        inputs = torch.cat([decoding, ids])
        mask = torch.cat(
            [
                torch.cat([self.mask, decoding_mask], dim=1),
                torch.cat([prompt_mask.new_zeros((len(rows), width)), prompt_mask], dim=1),
            ]
        )
        for layer in self.cache.layers:  # the joining rows' (empty, masked) past
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros((len(rows), *layer.keys.shape[1:]))])
            layer.values = torch.cat([layer.values, layer.values.new_zeros((len(rows), *layer.values.shape[1:]))])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -wide:]
        logits, self.cache = self._forward(inputs, mask, positions, self.cache)
        self.rows, self.mask = self.rows + rows, mask
        self._after(self._sample(self.rows, logits))

    def _row(self, request: _BatchedGeneration) -> _Row:
        steps = plan(self.loaded, request.prompt, request.params)
        return _Row(request, steps, TextTracker(self.loaded.tokenizer, request.params, steps))

    def _prefill(self, rows: list[_Row]) -> None:
        ids, mask = sequences.left_pad([r.plan.prompt_ids for r in rows], self._pad_id, self.loaded.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, self.cache = self._forward(ids, mask, positions, None)
        self.rows, self.mask = rows, mask
        self._after(self._sample(rows, logits))

    def _step(self) -> None:
        """One decoding step over every row: feed each row's last token, sample its next."""
        inputs = torch.tensor([[row.last] for row in self.rows], dtype=torch.long, device=self.loaded.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        logits, self.cache = self._forward(inputs, self.mask, positions, self.cache)
        self._after(self._sample(self.rows, logits))

    def _after(self, alive: list[int]) -> None:
        if len(alive) < len(self.rows):
            self._keep(alive)
        if self.rows and self.mask.shape[1] > 2 * int(self.mask.sum(-1).max()) + 16:
            self._compact()

    def _compact(self) -> None:
        """Drop the masked columns inside the rows (left by joins), keeping each row's tokens in order."""
        self.engine.compactions += 1
        longest = int(self.mask.sum(-1).max())
        # A stable sort of 0/1 puts each row's masked columns first and its tokens last, in their order.
        keep = torch.sort(self.mask, dim=1, stable=True).indices[:, -longest:]
        self.mask = self.mask.gather(1, keep)
        for layer in self.cache.layers:
            index = keep[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)

    def _sample(self, rows: list[_Row], logits: Any) -> list[int]:
        """Sample each row's next token from its own logits and generator; post its text; the indices of the
        rows that go on (not finished, not cancelled)."""
        alive = []
        for i, row in enumerate(rows):
            if row.request.cancelled:
                self.engine.cancelled_rows += 1
                continue
            token = sample_token(logits[i], row.request.params, row.plan.generator)
            piece = row.tracker.add(token)
            if piece and row.request.wants_pieces:
                row.request.post(piece)
            if row.tracker.finished:
                tail = row.tracker.close()
                if tail and row.request.wants_pieces:
                    row.request.post(tail)
                row.request.post(row.tracker.result())
                continue
            row.last = token
            alive.append(i)
        return alive

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = None
            return
        _select(self.cache, keep)
        self.mask = self.mask[keep]
        # Columns that are padding in every remaining row are dead weight in every later step.
        first = int(self.mask.any(dim=0).int().argmax())
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


def _pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0  # masked out anyway


def _select(cache: Any, rows: list[int]) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[rows], layer.values[rows]
