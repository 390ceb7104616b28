"""Where a prompt starts and a response ends: one set of rules for PPO rollouts, scoring and serving.

- A prompt becomes token ids through the model's chat template when its tokenizer has one (a user turn,
  then the generation prompt), else as plain text; special tokens come only from the template, never
  from the tokenizer's own add_special_tokens (serving has always done so; training now does too).
- A prompt that does not fit beside the new tokens is cut from the left: its most recent tokens stay.
- A response ends at its first end-of-sequence token, which is any id in the generation config's
  eos_token_id (an int or a list) or the tokenizer's eos_token_id. That token belongs to the response
  (PPO scores and trains on it) but not to its text. Pad tokens have no say: a sampled pad id that is not
  an EOS id is an ordinary token, and everything after the end is padding whatever its id.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch

from rlhf.training.logprobs import log_softmax_at
from rlhf.training.modelshape import CONTEXT_KEYS


def context_length(model: Any) -> int | None:
    """The model's context window in tokens, when its config says."""
    config = model.config
    for name in CONTEXT_KEYS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a response (see the module doc)."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model reads it: through its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of the prompt as the model reads it (see prompt_text); no extra special tokens."""
    return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def keep_end(ids: list[int], room: int) -> list[int]:
    """The last `room` ids (the most recent part of a prompt), at least one."""
    return ids[-max(1, room) :]


def response_mask(tokens: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """1 on each row's tokens up to and including its first EOS, 0 after it (float, same shape)."""
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= tokens == eos
    ended_before = (torch.cumsum(is_eos.int(), dim=1) - is_eos.int()) > 0
    return (~ended_before).float()


def forward_keywords(model: Any) -> tuple[str, dict[str, Any]]:
    """The keyword a model's forward takes its KV cache by (transformers 5 renamed past_key_values to cache),
    and `logits_to_keep=1` where supported (sampling needs the last position's logits only). A peft
    wrapper forwards keywords to its base model, so the base model's signature decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = inspect.signature(base.forward).parameters
    keyword = "cache" if "cache" in names else "past_key_values"
    return keyword, ({"logits_to_keep": 1} if "logits_to_keep" in names else {})


@dataclasses.dataclass
class Sampled:
    query: torch.Tensor  # (B, Lq) left-padded prompt ids
    query_mask: torch.Tensor  # (B, Lq)
    response: torch.Tensor  # (B, Lr) sampled ids; pad after each row's end
    mask: torch.Tensor  # (B, Lr) float, 1 through the first EOS (response_mask)
    ended: torch.Tensor  # (B,) bool: the row stopped on an EOS (not on the length limit)
    logprobs: torch.Tensor  # (B, Lr) float32 log-probability of each sampled token at `temperature`
    # (B, Lr, H) the last layer's hidden state at the position that predicted each token (with_hidden only)
    hidden: torch.Tensor | None = None


def left_pad(rows: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


class ModelStep:
    """A step of the KV-cached decode through the model's own forward (any architecture): feeds the next
    tokens and returns the last position's logits and, with `with_hidden`, its last hidden state."""

    def __init__(self, lm: Any, query_mask: torch.Tensor, with_hidden: bool) -> None:
        self.lm = lm
        self.keyword, self.extra = forward_keywords(lm)
        self.attention = query_mask
        self.with_hidden = with_hidden
        self.cache = None

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cache is not None:  # each step after the prompt adds one position
            self.attention = torch.cat([self.attention, self.attention.new_ones((ids.shape[0], 1))], dim=1)
        out = self.lm(
            input_ids=ids,
            attention_mask=self.attention,
            position_ids=positions,
            use_cache=True,
            output_hidden_states=self.with_hidden,
            **{self.keyword: self.cache},
            **self.extra,
        )
        self.cache = out[self.keyword] if self.keyword == "cache" else out.past_key_values
        return out.logits[:, -1], (out.hidden_states[-1][:, -1] if self.with_hidden else None)


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of `probs` (rows, n), drawn with probability proportional to its entry: the
    inverse of each row's cumulative distribution at one uniform number from `generator`. Returns (rows, 1).

    torch.multinomial draws one exponential number per entry for this (the whole vocabulary each step: ~0.3 ms
    per token for 16 rows of the tiny model's 631 ids on one core, against ~0.02 ms here). The sums are taken in
    float64, so probabilities down to ~1e-16 keep their share; entries of probability 0 are never drawn (the
    first index whose cumulative sum is above the number)."""
    cumulative = probs.double().cumsum(-1)
    total = cumulative[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()):  # as torch.multinomial refuses them
        raise ValueError("cannot sample: a row of probabilities is all zero or holds inf or nan")
    point = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=torch.float64)
    index = torch.searchsorted(cumulative, point * total, right=True)
    return index.clamp_(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample(
    lm: Any,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    eos_ids: set[int],
    pad_id: int,
    generator: torch.Generator,
    autocast: Any = None,
    with_hidden: bool = False,
    fast: bool = True,
) -> Sampled:
    """Sample responses from the model's full softmax at `temperature` (no top-k/top-p, no repetition
    penalty or other settings from the checkpoint's generation config): exactly the distribution PPO
    computes log-probabilities, KL and entropy under. Stops early once every row has ended.

    Also returns each sampled token's log-probability and, with `with_hidden`, the last hidden states, so
    PPO can take its old log-probs and values from the sampling passes instead of a second forward pass.

    With `fast`, models that rlhf.training.fast_decode runs exactly (GPT-2) decode through it, which skips
    transformers' per-call overhead and computes the same; False forces the model's own forward."""
    import contextlib

    from rlhf.training import fast_decode

    device = generator.device
    query, query_mask = left_pad(prompt_ids, pad_id, str(device))
    step = (fast_decode.decoder(lm, query_mask, max_new_tokens) if fast else None) or ModelStep(
        lm, query_mask, with_hidden
    )
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    single_eos = len(eos_ids) == 1  # one comparison per step instead of torch.isin
    batch = query.shape[0]
    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), dtype=torch.float32, device=device)
    hidden: list[torch.Tensor] = []
    positions = (query_mask.cumsum(-1) - 1).clamp(min=0)
    inputs, steps = query, 0
    for t in range(max_new_tokens):
        with autocast or contextlib.nullcontext():
            logits, last_hidden = step.step(inputs, positions)
        if with_hidden:
            hidden.append(last_hidden)
        logp = log_softmax_at(logits, temperature)
        token = draw(logp.exp(), generator)
        logprobs[:, t] = logp.gather(1, token).squeeze(1)
        token = token.squeeze(1).masked_fill_(ended, pad_id)
        tokens[:, t] = token
        steps = t + 1
        ended |= token == eos if single_eos else torch.isin(token, eos)
        if bool(ended.all()):
            break
        inputs = token.unsqueeze(1)
        positions = positions[:, -1:] + 1
    response = tokens[:, :steps]
    mask = response_mask(response, eos_ids)
    response = torch.where(mask.bool(), response, torch.full_like(response, pad_id))
    states = torch.stack(hidden, 1) if with_hidden else None
    return Sampled(query, query_mask, response, mask, ended, logprobs[:, :steps] * mask, states)
