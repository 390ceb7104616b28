"""Text generation's rules, shared by both engines (inference_service/engine.py): prompt preparation (plan),
per-request sampling (sample_token), stop rules (TextTracker), and the one-at-a-time loop (TokenLoop).

Because streaming and non-streaming run the very same steps, with the same seed the streamed pieces
concatenate to exactly the non-streamed text.

Sampling: temperature (0 = greedy), then top-k (0 = off), then top-p (nucleus), then a draw from a
per-request torch.Generator seeded with `seed` (a random seed when unset), so concurrent requests never
disturb each other's randomness.

Stopping: EOS -> STOP (EOS is not part of the text); max_new_tokens -> LENGTH; a stop sequence in the
completion -> STOP_SEQUENCE with the text cut just before its first occurrence. While streaming, text
that might still turn out to begin a stop sequence (or is an incomplete UTF-8 character) is held back
until it is known not to.

Context: prompt + new tokens must fit the model's context (config.n_positions or
max_position_embeddings). When they don't, max_new_tokens shrinks to what fits beside the prompt, but
never below half the context; a prompt still too long is then truncated from the left (its most recent
tokens are kept), and prompt_tokens reports the tokens actually used. Never an error.

Everything here is blocking; the engines run it in a thread.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterator
from typing import Any

from inference_service.models import LoadedModel
from inference_service.records import FinishReason
from rlhf.training import sequences


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Validated sampling parameters (the domain fills defaults and checks ranges)."""

    max_new_tokens: int = 64
    # 0 = greedy.
    temperature: float = 1.0
    # 0 = off.
    top_k: int = 50
    # 1.0 = off.
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    # None = a fresh random seed.
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    # True when the prompt was cut from the left to fit the context.
    prompt_truncated: bool


def fit_to_context(prompt_ids: list[int], max_new_tokens: int, n_ctx: int | None) -> tuple[list[int], int]:
    """(prompt ids to use, new-token budget) so that together they fit n_ctx (see module doc)."""
    if n_ctx is None or len(prompt_ids) + max_new_tokens <= n_ctx:
        return prompt_ids, max_new_tokens
    budget = max(1, min(max_new_tokens, n_ctx - min(len(prompt_ids), n_ctx // 2)))
    keep = n_ctx - budget
    return prompt_ids[-keep:], budget


def safe_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be emitted now: not a trailing partial character, nor a possible stop start."""
    limit = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                limit = min(limit, len(text) - k)
                break
    while limit > 0 and text[limit - 1] == "\ufffd":  # a multi-byte character split across tokens
        limit -= 1
    return limit


@dataclasses.dataclass
class Plan:
    """A prompt made ready for decoding: its ids (fitted to the context), the budget, EOS ids, a generator."""

    prompt_ids: list[int]
    budget: int
    truncated: bool
    eos_ids: set[int]
    generator: Any  # torch.Generator seeded with the request's seed


def plan(loaded: LoadedModel, prompt: str, params: SamplingParams) -> Plan:
    """Encode the prompt (sequences.encode_prompt), fit it to the context, seed the request's generator."""
    import torch

    all_ids = sequences.encode_prompt(loaded.tokenizer, prompt)
    prompt_ids, budget = fit_to_context(all_ids, params.max_new_tokens, sequences.context_length(loaded.model))
    seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
    return Plan(
        prompt_ids=prompt_ids,
        budget=budget,
        truncated=len(prompt_ids) < len(all_ids),
        eos_ids=sequences.eos_token_ids(loaded.model, loaded.tokenizer),
        generator=torch.Generator(device=loaded.device).manual_seed(seed),
    )


class TextTracker:
    """Sampled tokens in, text pieces out: applies the stop rules (EOS, budget, stop sequences) and holds back
    text that may still begin a stop sequence. Shared by the one-at-a-time loop and the batching engine, so
    both end a response at exactly the same place."""

    def __init__(self, tokenizer: Any, params: SamplingParams, plan: Plan) -> None:
        self._tokenizer = tokenizer
        self._stops = params.stop
        self._plan = plan
        self.generated: list[int] = []
        self.finish = FinishReason.LENGTH
        self.finished = plan.budget <= 0
        self._text = ""
        self._emitted = ""

    def add(self, token: int) -> str:
        """Take one sampled token; return the text that can be shown now ('' if none)."""
        if token in self._plan.eos_ids:
            self.finish, self.finished = FinishReason.STOP, True
            return ""
        self.generated.append(token)
        text = self._tokenizer.decode(self.generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = _first_stop(text, self._stops)
        if cut is not None:
            self._text = text[:cut]
            self.finish, self.finished = FinishReason.STOP_SEQUENCE, True
            return ""
        self._text = text
        self.finished = len(self.generated) >= self._plan.budget
        safe = safe_prefix_length(text, self._stops)
        if safe > len(self._emitted) and text.startswith(self._emitted):
            piece = text[len(self._emitted) : safe]
            self._emitted += piece
            return piece
        return ""

    def close(self) -> str:
        """The text not shown yet (call once, at the end)."""
        text = self._text
        # The result is what was shown plus the rest, so streaming and non-streaming always agree.
        tail = text[len(self._emitted) :] if text.startswith(self._emitted) else ""
        self._emitted += tail
        return tail

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self._emitted,
            prompt_tokens=len(self._plan.prompt_ids),
            completion_tokens=len(self.generated),
            finish_reason=self.finish,
            prompt_truncated=self._plan.truncated,
        )


class TokenLoop:
    """One request, one sequence at a time (the path without batching). Iterate to get text pieces as
    tokens are produced; `result` is set once iteration ends.

    Each step may run in a different thread (the streaming path awaits one step at a time), so no
    thread-local torch state is held across steps.
    """

    def __init__(self, loaded: LoadedModel, prompt: str, params: SamplingParams) -> None:
        self._loaded = loaded
        self._prompt = prompt
        self.params = params
        self.result: GenerationResult | None = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop at the next token (the caller went away or its deadline passed)."""
        self._cancelled.set()

    def __iter__(self) -> Iterator[str]:
        import torch

        from rlhf.training.threads import run_here_with

        model, device = self._loaded.model, self._loaded.device
        steps = plan(self._loaded, self._prompt, self.params)
        tracker = TextTracker(self._loaded.tokenizer, self.params, steps)
        inputs = torch.tensor([steps.prompt_ids], dtype=torch.long, device=device)
        # One sequence, no padding: the mask is all ones, passed because models warn without it.
        mask = torch.ones_like(inputs)
        cache_kw, extra = sequences.forward_keywords(model)
        past = None
        while not tracker.finished:
            if self._cancelled.is_set():
                return
            # Per step: a streamed request's steps run in whichever pool thread is free (rlhf.training.threads).
            run_here_with(self._loaded.cpu_threads)
            with torch.inference_mode():
                out = model(input_ids=inputs, attention_mask=mask, use_cache=True, **{cache_kw: past}, **extra)
                past = out["cache"] if cache_kw == "cache" else out.past_key_values
                token = sample_token(out.logits[0, -1], self.params, steps.generator)
            piece = tracker.add(token)
            if piece:
                yield piece
            inputs = torch.tensor([[token]], dtype=torch.long, device=device)
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
        tail = tracker.close()
        if tail:
            yield tail
        self.result = tracker.result()


def generate(loaded: LoadedModel, prompt: str, params: SamplingParams) -> GenerationResult:
    """Blocking, non-streaming generation."""
    loop = TokenLoop(loaded, prompt, params)
    for _ in loop:
        pass
    assert loop.result is not None
    return loop.result


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def sample_token(logits, params: SamplingParams, generator) -> int:
    """One token from one row of logits with this request's settings and generator (per row, so a request
    draws the same tokens whatever else shares its batch)."""
    import torch

    logits = logits.float()

    if params.temperature == 0:
        return int(torch.argmax(logits))
    # Shifted so the largest is 0, and in float64: a tiny temperature (1e-300, which float32 rounds to 0)
    # then sends every other logit to -inf instead of making inf - inf = NaN probabilities.
    logits = (logits.double() - logits.max().double()) / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass ranked above each token
        remove = before >= params.top_p
        remove[0] = False  # the most likely token always stays, however small top_p is
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(sequences.draw(probs.unsqueeze(0), generator))
