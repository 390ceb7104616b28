"""Log-probabilities of chosen tokens (and the entropy) from a model's final hidden states, without the whole
batch's vocabulary-wide logits in memory at once.

PPO needs log p(token) at the sampling temperature for every response token (with gradients in the update
passes) and the entropy (a metric). Taken from one (rows, positions, vocabulary) logits tensor, that tensor,
its log-softmax and, in the backward pass, their gradients are each alive at once: 104 MB apiece for GPT-2's
50,257 ids at the seed's settings (4 rows x 129 positions), 1 GB apiece for a 128k-id vocabulary at 512 new
tokens, the largest part of a LoRA step's memory. Here the LM head runs on a chunk of positions at a time.
Without gradients (rollouts, the reference) that costs nothing. With gradients each chunk is checkpointed
(torch.utils.checkpoint, non-reentrant): the backward pass recomputes one chunk's logits at a time instead of
keeping all of them, for one more LM-head forward per update pass, so chunking only starts above a budget
(`LOGITS_BUDGET_BYTES`): small models and vocabularies run exactly as one tensor.

The head is the model's output embedding applied to the last hidden state. Models whose logits are more
than that (final soft-capping, logit scales) are detected once (`output_head`) and keep the whole-tensor
path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rlhf.training import ppo

# Largest fp32 logits tensor computed in one piece (bytes). Above it, chunks of positions that fit it.
LOGITS_BUDGET_BYTES = 32 * 2**20


def chunk_positions(rows: int, positions: int, vocab: int, budget: int | None = None) -> int:
    """Positions per chunk so that one chunk's fp32 logits fit `budget` (default LOGITS_BUDGET_BYTES; all
    of them when the whole fits)."""
    budget = budget or LOGITS_BUDGET_BYTES
    per_position = rows * vocab * 4
    if per_position * positions <= budget:
        return max(positions, 1)
    return max(1, budget // per_position)


@torch.no_grad()
def output_head(lm: Any) -> nn.Module | None:
    """`lm`'s output embedding when applying it to the last hidden state gives `lm`'s logits (checked on a
    few tokens), else None (soft-capped or scaled logits: use the model's own)."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        return None
    device = head.weight.device
    ids = torch.arange(1, 5, device=device).unsqueeze(0) % head.weight.shape[0]
    was_training = lm.training
    lm.eval()
    try:
        out = lm(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    finally:
        lm.train(was_training)
    mine = head(out.hidden_states[-1]).float()
    theirs = out.logits.float()
    if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-4, atol=1e-4):
        return None
    return head


def log_softmax_at(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities at the sampling temperature, in fp32 (no copies when already fp32 at 1.0)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1)


def _chunk(head: nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float):
    logp = log_softmax_at(head(hidden), temperature)
    return ppo.gather_logprobs(logp, tokens), ppo.entropy_from_logprobs(logp)  # entropy: a metric, no graph


def token_logprobs(
    head: nn.Module,
    hidden: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(tokens), entropy), both (rows, positions) fp32, from `hidden` (rows, positions, width): the
    hidden states at the positions that predict `tokens`. Run it under the same autocast as the model."""
    rows, positions = tokens.shape
    step = chunk_positions(rows, positions, head.weight.shape[0], budget)
    if step >= positions:
        return _chunk(head, hidden, tokens, temperature)
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or any(w.requires_grad for w in head.parameters()))
    parts = [
        checkpoint(_chunk, head, h, t, temperature, use_reentrant=False)
        if recompute
        else _chunk(head, h, t, temperature)
        for h, t in zip(hidden.split(step, 1), tokens.split(step, 1), strict=True)
    ]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
