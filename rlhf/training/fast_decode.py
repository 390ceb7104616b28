"""GPT-2 forward passes without transformers' per-call machinery: KV-cached decoding and whole sequences.

A sampling step of a small model is mostly overhead of the generic forward (attention-mask building, cache
objects, output capturing): on the tiny GPT-2 at batch 8 that is about half of each token's time, and a
third of a PPO minibatch's forward. Here the model's own submodules (embeddings, layer norms, attention
projections, MLPs, LM head) are called directly, with one boolean padding mask and, for decoding, a
key/value cache preallocated for prompt + new tokens. Calling the submodules rather than their weights keeps
peft's LoRA layers (which replace those submodules, and which disable_adapter() turns off) working, and
gradients flow through them as through the model's forward.

Only models whose forward this computes exactly qualify (see `refusal`); everything else takes the
generic path (rlhf.training.sequences.sample, the model's own forward in the PPO trainer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

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


def _blocks(base: Any) -> list[tuple[nn.Module, dict[str, nn.Module], dict[str, nn.Module]]]:
    """Each block of `base` with its attention's and its MLP's children (looked up in the modules'
    dictionaries: refusal runs before every pass, and nn.Module attribute access costs ~1 µs a name)."""
    return [
        (block, block._modules["attn"]._modules, block._modules["mlp"]._modules)
        for block in base._modules["transformer"]._modules["h"]
    ]


def _skipped_modules(lm: Any, base: Any) -> list[nn.Module]:
    """The modules whose forward the fast path replaces by its own code: the model's, the blocks', the
    attentions' and the MLPs', and every plain Conv1D and LayerNorm it computes with the functional call
    (_Linear, _Norm); the other children (embeddings, activations, peft's LoRA layers) it calls."""
    transformer = base._modules["transformer"]
    skipped, leaves = [lm, base, transformer], [transformer._modules["ln_f"]]
    for block, attn, mlp in _blocks(base):
        skipped += [block, block._modules["attn"], block._modules["mlp"]]
        leaves += [block._modules["ln_1"], block._modules["ln_2"], attn["c_attn"], attn["c_proj"], mlp["c_fc"]]
        leaves.append(mlp["c_proj"])
    return skipped + [m for m in leaves if type(m) in (Conv1D, nn.LayerNorm)]


def refusal(lm: Any, kind: type | None = None) -> str | None:
    """Why the fast path cannot compute `lm` exactly as its own forward does, or None when it can. `kind`: the
    model class expected (GPT2LMHeadModel unless given; sequence_classification_logits asks for
    GPT2ForSequenceClassification)."""
    from transformers import GPT2LMHeadModel

    kind = kind or GPT2LMHeadModel
    base, reason = _unwrap(lm)
    if reason:
        return reason
    if type(base) is not kind:  # a subclass may override forward
        return f"{type(base).__name__} is not a {kind.__name__}"
    config = base.config
    if config.add_cross_attention:
        return "cross-attention is not implemented"
    if config.reorder_and_upcast_attn:
        return "reorder_and_upcast_attn (fp32 attention scores) is not implemented"
    if config._attn_implementation not in _EXACT_ATTENTION:
        return f"attention implementation {config._attn_implementation!r} is not one of {_EXACT_ATTENTION}"
    if getattr(config, "tie_last_hidden_states", None) is False:
        return "tie_last_hidden_states=False (hidden states before the final layer norm) is not implemented"
    blocks = _blocks(base)
    dropouts = [base._modules["transformer"]._modules["drop"]]
    for block, attn, mlp in blocks:
        if block._modules["attn"].is_cross_attention or "crossattention" in block._modules:
            return "cross-attention is not implemented"
        dropouts += [attn["attn_dropout"], attn["resid_dropout"], mlp["dropout"]]
    if any(d.training and d.p > 0 for d in dropouts):
        return "dropout is on (call model.eval() or set it to 0)"
    if torch.is_grad_enabled() and any(b.gradient_checkpointing and b.training for b, _, _ in blocks):
        return "gradient checkpointing is on"
    for module in _skipped_modules(lm, base):
        # Hooks (accelerate's device placement, user hooks) would run around forwards that are not called.
        # (Dictionary lookups, not hasattr: this runs before every pass, and a missing module attribute raises.)
        if "_hf_hook" in module.__dict__ or (
            (module._forward_hooks or module._forward_pre_hooks)
            and not all(_inert(h) for h in [*module._forward_hooks.values(), *module._forward_pre_hooks.values()])
        ):
            return f"{type(module).__name__} has forward hooks"
    return None


def _inert(hook: Any) -> bool:
    """transformers' output-capturing hooks (installed on the first forward that asks for hidden states)
    record only inside that forward's own collector: outside one they do nothing."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def _attention_mask(valid: torch.Tensor, n: int) -> torch.Tensor:
    """Boolean mask (B, 1, n, end) of the last `n` of `end` positions over all of them: causal, real keys
    only (`valid`, (B, end)), as transformers builds it. A position that sees no real key at all (left
    padding) sees itself instead: some SDPA kernels give NaN for an all-masked row, which would reach real
    tokens through the cached pad values (torch 2.13 on CPU gives 0)."""
    end = valid.shape[1]
    rows = torch.arange(end - n, end, device=valid.device)[:, None]
    cols = torch.arange(end, device=valid.device)[None, :]
    mask = (cols <= rows) & valid[:, None, None, :]
    return mask | ((cols == rows) & ~mask.any(-1, keepdim=True))


class _Linear:
    """A Conv1D's addmm without the module's Python forward around it (~5 µs a call, ~8 calls a token), its
    weights read once per pass (each nn.Module attribute read costs ~1 µs); any other module (peft's LoRA
    layers over a Conv1D) is called."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.plain = type(module) is Conv1D
        if self.plain:
            self.weight, self.bias, self.width = module.weight, module.bias, module.nf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain:
            return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.width)
        return self.module(x)


class _Norm:
    """A LayerNorm as its functional call, its weights read once per pass; any other module is called."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.plain = type(module) is nn.LayerNorm
        if self.plain:
            self.args = (module.normalized_shape, module.weight, module.bias, module.eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, *self.args) if self.plain else self.module(x)


class _Block:
    """One GPT-2 block's parts, looked up once per pass (or once per decode)."""

    def __init__(self, block: nn.Module) -> None:
        attn, mlp = block._modules["attn"], block._modules["mlp"]
        self.ln_1, self.ln_2 = _Norm(block._modules["ln_1"]), _Norm(block._modules["ln_2"])
        self.c_attn, self.attn_proj = _Linear(attn._modules["c_attn"]), _Linear(attn._modules["c_proj"])
        self.c_fc, self.mlp_proj = _Linear(mlp._modules["c_fc"]), _Linear(mlp._modules["c_proj"])
        self.act = mlp._modules["act"]
        self.scaling = attn.scaling


class _Plan:
    """What a pass over `base` reads from its modules, read once: embeddings, blocks, final norm, shape."""

    def __init__(self, base: Any) -> None:
        transformer = base._modules["transformer"]
        self.wte, self.wpe = transformer._modules["wte"], transformer._modules["wpe"]
        self.blocks = [_Block(block) for block in transformer._modules["h"]]
        self.ln_f = _Norm(transformer._modules["ln_f"])
        self.heads, self.width = base.config.n_head, base.config.n_embd


def _layers(plan: _Plan, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache=None):
    """The residual stream after the last block (before ln_f) of `ids` at `positions`. With a `cache`
    (GPT2Decoder), keys and values are stored there and attention runs over everything stored. Each block
    as GPT2Block computes it (dropout is off, see `refusal`)."""
    batch, n = ids.shape
    heads, width = plan.heads, plan.width
    x = plan.wte(ids) + plan.wpe(positions)
    for i, block in enumerate(plan.blocks):
        q, k, v = block.c_attn(block.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, n, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.store(i, k, v)
        if mask is not None and mask.dtype == torch.bool:
            # SDPA turns a boolean mask into an additive one on every call: once per pass here, not per layer.
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=block.scaling)
        x = x + block.attn_proj(out.transpose(1, 2).reshape(batch, n, width))
        x = x + block.mlp_proj(block.act(block.c_fc(block.ln_2(x))))
    return x


def whole_sequence_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The mask final_hidden_states builds from `attention_mask` (B, L), (B, 1, L, L): built once, it serves
    many passes over rows and columns of the same batch (index its rows, slice its last two dimensions as the
    ids' columns; columns cut off must be padding in every kept row)."""
    return _attention_mask(attention_mask.bool(), attention_mask.shape[1])


def final_hidden_states(
    lm: Any,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    keep: int = 0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The last layer's hidden states (after ln_f) of the last `keep` positions (all when 0), as
    `lm(..., output_hidden_states=True).hidden_states[-1]` gives them, with gradients where enabled (left
    padding aside: a position before a row's first real token attends to itself, see _attention_mask); None
    when `lm` does not qualify (see `refusal`): then call the model itself. `mask`: whole_sequence_mask's
    answer for these rows and columns when the caller has it."""
    if refusal(lm) is not None:
        return None
    plan = _Plan(_unwrap(lm)[0])
    if mask is None:
        mask = _attention_mask(attention_mask.bool(), ids.shape[1])
    x = _layers(plan, ids, positions, mask)
    return plan.ln_f(x[:, -keep:] if keep else x)


def sequence_classification_logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """`model(**inputs).logits` of a GPT2ForSequenceClassification (a reward model): its score head on each
    row's last token that is not padding, picked as transformers picks it (the rightmost id other than
    pad_token_id), at positions 0, 1, ... as its forward numbers them without position_ids. Only the picked
    positions go through the final layer norm and the head. None when the model does not qualify (see
    `refusal`) or `inputs` hold more than input_ids and attention_mask: then call the model."""
    from transformers import GPT2ForSequenceClassification

    if set(inputs) - {"input_ids", "attention_mask"} or refusal(model, GPT2ForSequenceClassification) is not None:
        return None
    base, _ = _unwrap(model)
    ids = inputs["input_ids"]
    batch, length = ids.shape
    pad = base.config.pad_token_id
    if pad is None and batch != 1:
        return None  # the model's forward refuses this with its own error
    attention = inputs.get("attention_mask")
    valid = attention.bool() if attention is not None else torch.ones_like(ids, dtype=torch.bool)
    positions = torch.arange(length, device=ids.device).expand(batch, length)
    plan = _Plan(base)
    x = _layers(plan, ids, positions, _attention_mask(valid, length))
    if pad is None:
        last = torch.full((batch,), length - 1, device=ids.device)
    else:
        columns = torch.arange(length, device=ids.device, dtype=torch.int32)
        last = (columns * (ids != pad).to(torch.int32)).argmax(-1)
    picked = x[torch.arange(batch, device=ids.device), last]
    return base.score(plan.ln_f(picked))


class GPT2Decoder:
    """One batch's decode: `step(ids, positions)` feeds the next tokens (the whole left-padded prompt first,
    then one per row) and returns the last position's logits and final hidden state (after ln_f, what
    transformers returns as `hidden_states[-1]`)."""

    def __init__(self, lm: Any, query_mask: torch.Tensor, max_new_tokens: int) -> None:
        self.base, _ = _unwrap(lm)
        self.plan = _Plan(self.base)  # the modules' parts, read once for every step of this decode
        batch, prompt = query_mask.shape
        self.length = prompt + max_new_tokens
        # Which cache positions hold real tokens: the prompt's non-pad ones and every new token.
        self.valid = torch.ones((batch, self.length), dtype=torch.bool, device=query_mask.device)
        self.valid[:, :prompt] = query_mask.bool()
        self.padded = not bool(self.valid.all())
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.start = self.end = 0  # cache positions [start, end) are the ones being written

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores layer `layer`'s new keys and values; returns all of them so far."""
        if layer == len(self.keys):  # first call: allocate in the dtype the projections give (autocast's)
            shape = (*k.shape[:2], self.length, k.shape[3])
            self.keys.append(k.new_empty(shape))
            self.values.append(v.new_empty(shape))
        self.keys[layer][:, :, self.start : self.end] = k
        self.values[layer][:, :, self.start : self.end] = v
        return self.keys[layer][:, :, : self.end], self.values[layer][:, :, : self.end]

    def step(self, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = ids.shape[1]
        self.start, self.end = self.end, self.end + n
        if n == 1:  # one new token per row: it sees every real position so far
            mask = self.valid[:, None, None, : self.end] if self.padded else None
        else:
            mask = _attention_mask(self.valid[:, : self.end], n)
        x = _layers(self.plan, ids, positions, mask, cache=self)
        hidden = self.plan.ln_f(x[:, -1])
        return self.base.lm_head(hidden), hidden


def decoder(lm: Any, query_mask: torch.Tensor, max_new_tokens: int) -> GPT2Decoder | None:
    """A fast decoder for `lm` when it qualifies (see `refusal`), else None."""
    return GPT2Decoder(lm, query_mask, max_new_tokens) if refusal(lm) is None else None
