"""KV-cached decoding of GPT-2 models without transformers' per-call machinery.

A sampling step of a small model is mostly overhead of the generic forward (attention-mask building, cache
objects, output capturing): on the tiny GPT-2 at batch 8 that is about half of each token's time. Here each
step calls the model's own submodules (embeddings, layer norms, attention projections, MLPs, LM head)
directly, with a key/value cache preallocated for prompt + new tokens and one boolean padding mask. Calling
the submodules rather than their weights keeps peft's LoRA layers (which replace those submodules) working.

Only models whose forward this computes exactly qualify (see `refusal`); everything else takes the
generic path in rlhf.training.sequences.sample.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Attention implementations that compute softmax(q k^T * scaling + mask) v, as SDPA does here.
_EXACT_ATTENTION = ("eager", "sdpa")


def _unwrap(lm: Any) -> tuple[Any, str | None]:
    """The transformers model under a peft wrapper (or `lm` itself), or a reason it cannot be reached."""
    peft_config = getattr(lm, "active_peft_config", None)
    if peft_config is None:
        return lm, None
    if getattr(peft_config, "is_prompt_learning", False):
        return None, "peft prompt learning adds virtual tokens the fast path does not"
    return lm.get_base_model(), None


def _skipped_modules(lm: Any, base: Any) -> list[nn.Module]:
    """The modules whose forward the fast path replaces by its own code (their children it calls)."""
    skipped = [lm, base, base.transformer]
    for block in base.transformer.h:
        skipped += [block, block.attn]
    return skipped


def refusal(lm: Any) -> str | None:
    """Why the fast path cannot decode `lm` exactly as its own forward does, or None when it can."""
    from transformers import GPT2LMHeadModel

    base, reason = _unwrap(lm)
    if reason:
        return reason
    if type(base) is not GPT2LMHeadModel:  # a subclass may override forward
        return f"{type(base).__name__} is not a GPT2LMHeadModel"
    config = base.config
    if config.add_cross_attention:
        return "cross-attention is not implemented"
    if config.reorder_and_upcast_attn:
        return "reorder_and_upcast_attn (fp32 attention scores) is not implemented"
    if config._attn_implementation not in _EXACT_ATTENTION:
        return f"attention implementation {config._attn_implementation!r} is not one of {_EXACT_ATTENTION}"
    if getattr(config, "tie_last_hidden_states", None) is False:
        return "tie_last_hidden_states=False (hidden states before the final layer norm) is not implemented"
    transformer = base.transformer
    dropouts = [transformer.drop]
    for block in transformer.h:
        if block.attn.is_cross_attention or hasattr(block, "crossattention"):
            return "cross-attention is not implemented"
        dropouts += [block.attn.attn_dropout, block.attn.resid_dropout]
    if any(d.training and d.p > 0 for d in dropouts):
        return "dropout is on (call model.eval() or set it to 0)"
    for module in _skipped_modules(lm, base):
        # Hooks (accelerate's device placement, user hooks) would run around forwards that are not called.
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if any(not _inert(hook) for hook in hooks) or hasattr(module, "_hf_hook"):
            return f"{type(module).__name__} has forward hooks"
    return None


def _inert(hook: Any) -> bool:
    """transformers' output-capturing hooks (installed on the first forward that asks for hidden states)
    record only inside that forward's own collector: outside one they do nothing."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


class GPT2Decoder:
    """One batch's decode: `step(ids, positions)` feeds the next tokens (the whole left-padded prompt first,
    then one per row) and returns the last position's logits and final hidden state (after ln_f, what
    transformers returns as `hidden_states[-1]`)."""

    def __init__(self, lm: Any, query_mask: torch.Tensor, max_new_tokens: int) -> None:
        self.base, _ = _unwrap(lm)
        config = self.base.config
        self.heads = config.n_head
        self.width = config.n_embd
        batch, prompt = query_mask.shape
        self.length = prompt + max_new_tokens
        # Which cache positions hold real tokens: the prompt's non-pad ones and every new token.
        self.valid = torch.ones((batch, self.length), dtype=torch.bool, device=query_mask.device)
        self.valid[:, :prompt] = query_mask.bool()
        self.padded = not bool(self.valid.all())
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.filled = 0  # cache positions written so far

    def _mask(self, n: int, end: int) -> torch.Tensor | None:
        """Boolean attention mask of the `n` new positions over cache positions [0, end)."""
        if n == 1:
            return self.valid[:, None, None, :end] if self.padded else None
        rows = torch.arange(end - n, end, device=self.valid.device)[:, None]
        cols = torch.arange(end, device=self.valid.device)[None, :]
        # Causal over real keys; each position also sees itself, so a pad position attends to something
        # (some SDPA kernels give NaN for an all-masked row, which would reach real tokens through the cached
        # pad values; torch 2.13 on CPU gives 0).
        return ((cols <= rows) & self.valid[:, None, None, :end]) | (cols == rows)

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        transformer = self.base.transformer
        batch, n = ids.shape
        start, end = self.filled, self.filled + n
        mask = self._mask(n, end)
        head_dim = self.width // self.heads
        x = transformer.wte(ids) + transformer.wpe(positions)
        for i, block in enumerate(transformer.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(self.width, dim=2)
            q, k, v = (t.view(batch, n, self.heads, head_dim).transpose(1, 2) for t in (q, k, v))
            if i == len(self.keys):  # first call: allocate in the dtype the projections give (autocast's)
                shape = (batch, self.heads, self.length, head_dim)
                self.keys.append(k.new_empty(shape))
                self.values.append(v.new_empty(shape))
            self.keys[i][:, :, start:end] = k
            self.values[i][:, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q, self.keys[i][:, :, :end], self.values[i][:, :, :end], attn_mask=mask, scale=attn.scaling
            )
            x = x + attn.c_proj(out.transpose(1, 2).reshape(batch, n, self.width))
            x = x + block.mlp(block.ln_2(x))
        self.filled = end
        hidden = transformer.ln_f(x[:, -1])
        return self.base.lm_head(hidden), hidden


def decoder(lm: Any, query_mask: torch.Tensor, max_new_tokens: int) -> GPT2Decoder | None:
    """A fast decoder for `lm` when it qualifies (see `refusal`), else None."""
    return GPT2Decoder(lm, query_mask, max_new_tokens) if refusal(lm) is None else None
