"""PPO training of a causal LM with a value head (runs in the worker process).

Rollouts are sampled from the policy, scored by `score_fn` (the reward service, over gRPC, one call per
batch), turned into per-token rewards with a KL penalty against the frozen reference, and optimised with
the clipped PPO objective for several epochs over minibatches. Dropout is off throughout. With LoRA the
reference is the same weights with adapters disabled, and the saved policy is merged.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import pathlib
import random
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from rlhf.training import fast_decode, ppo, sequences
from rlhf.training.config import TrainingConfig
from rlhf.training.distributed import Group
from rlhf.training.errors import TrainingError
from rlhf.training.logprobs import log_softmax_at, output_head, token_logprobs
from rlhf.training.modeling import (
    add_lora,
    disable_dropout,
    fuse_activations,
    load_model,
    store_frozen_matrices,
    use_gradient_checkpointing,
)
from rlhf.training.scoring import Scores
from rlhf.training.threads import use_cpu_threads

log = logging.getLogger(__name__)


# (prompts, responses) -> one score per pair (a list, or Scores with ratings beside)
ScoreFn = Callable[[list[str], list[str]], "list[float] | Scores"]
# (query, query_mask, response, mask) -> anything: work that runs while the reward function scores a rollout
WhileScoring = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], object]
# (step, metrics) -> None; raising stops training (cancel)
StepCallback = Callable[[int, dict[str, float]], None]


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value head on its last hidden state."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(lm.config.hidden_size + 1))
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        keep: int = 0,
        hidden_only: bool = False,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values of the last `keep` positions (all when 0); the LM head skips the rest. With
        `hidden_only`, the last hidden states of those positions instead of their logits (the caller applies
        the head in chunks, rlhf.training.logprobs). `positions` (position_ids_of the attention mask) and
        `mask` (fast_decode.whole_sequence_mask) when the caller built them for the whole batch."""
        positions = position_ids_of(attention_mask) if positions is None else positions
        if hidden_only:  # GPT-2 without transformers' per-call overhead, where it computes the same
            hidden = fast_decode.final_hidden_states(self.lm, input_ids, attention_mask, positions, keep, mask)
            if hidden is not None:
                return hidden, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            output_hidden_states=True,
            **logits_to_keep(self.lm, 1 if hidden_only else keep),
        )
        hidden = out.hidden_states[-1]
        if keep:
            hidden = hidden[:, -keep:]
        if hidden_only:
            return hidden, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        logits = out.logits[:, -keep:] if keep else out.logits
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


def logits_to_keep(lm: nn.Module, keep: int) -> dict[str, int]:
    """`logits_to_keep=keep` for models that take it: the LM head (vocab x width per position, most of a
    small model's compute) then runs on the response positions only, not the prompt's."""
    return {"logits_to_keep": keep} if keep and sequences.forward_keywords(lm)[1] else {}


def rank_path(checkpoint: pathlib.Path, rank: int) -> pathlib.Path:
    """Where rank `rank` (> 0) keeps its own sampling state beside a data-parallel run's checkpoint."""
    return checkpoint.with_name(f"{checkpoint.stem}.rank{rank}{checkpoint.suffix}")


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generate() uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def clip_and_step(optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter], max_norm: float) -> bool:
    """clip_grad_norm_ then optimizer.step() for a fused AdamW, in one pass over the gradients: the fused
    kernel divides each gradient by `grad_scale` as it reads it (the attribute GradScaler sets for fused
    optimisers), so clipping needs no separate pass that rewrites every gradient (~4% of a 124M-parameter
    step). Gradients that are not finite skip the update instead of writing NaN into every weight; returns
    whether it was skipped. (The check reads the norm once; the kernel's own `found_inf` skip would cost one
    more pass over every parameter's step count per update.)"""
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if not bool(torch.isfinite(norm)):
        return True
    optimizer.grad_scale = (norm / max_norm).clamp(min=1.0).float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return False


@dataclasses.dataclass
class Rollout:
    query: torch.Tensor  # (B, Lq) left-padded prompt ids
    query_mask: torch.Tensor  # (B, Lq)
    response: torch.Tensor  # (B, Lr) sampled ids, pad after the first EOS
    mask: torch.Tensor  # (B, Lr) 1 on real response tokens (through the first EOS)
    logprobs: torch.Tensor  # (B, Lr) under the sampling policy
    ref_logprobs: torch.Tensor  # (B, Lr) under the reference
    values: torch.Tensor  # (B, Lr)
    scores: torch.Tensor  # (B,) after EOS penalty / clipping / whitening
    raw_scores: torch.Tensor  # (B,) as the reward model gave them
    ratings: torch.Tensor | None  # (B,) the same on the 0..1 feedback scale, when the reward function says
    texts: list[str]
    # What `rollout`'s while_scoring callable returned (None without one).
    while_scoring: object = None


class Minibatches:
    """Cuts a rollout's rows into the update passes' minibatches, each with the columns that are padding in all
    of its rows cut off: the prompts' left padding up to its longest prompt, the responses' right padding after
    its longest response. Every pass over those columns is wasted (no real token attends to a pad position, and
    the losses mask them out), so an update pass costs what its rows need, not what the batch's longest prompt
    and response need; the results are the same (positions come from the attention mask). Built from the
    sampled tokens (the passes' inputs, known before the scores); `with_targets` adds the per-token tensors
    the losses need, stacked once per step, so a minibatch is three indexing operations."""

    def __init__(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        response: torch.Tensor,
        mask: torch.Tensor,
        with_attention_mask: bool = False,
    ):
        """`with_attention_mask`: also build fast_decode's attention mask for the whole batch once (the passes
        then index it instead of building their own)."""
        self.prompt_width = query.shape[1]
        self.ids = torch.cat([query, response], 1)
        self.attention = torch.cat([query_mask, mask.to(query_mask.dtype)], 1)
        self.positions = position_ids_of(self.attention)
        self.mask = fast_decode.whole_sequence_mask(self.attention) if with_attention_mask else None
        # Prompts are left-padded and responses right-padded: a row's lengths say which columns it needs.
        self.prompt_lengths = query_mask.sum(1).tolist()
        self.response_lengths = mask.sum(1).tolist()
        self.per_token: torch.Tensor | None = None

    def with_targets(self, roll: Rollout, advantages: torch.Tensor, returns: torch.Tensor) -> Minibatches:
        self.per_token = torch.stack([roll.mask, roll.logprobs, roll.values, advantages, returns])
        return self

    def _columns(self, rows: list[int]) -> tuple[int, int]:
        first = self.prompt_width - max(1, int(max(self.prompt_lengths[i] for i in rows)))
        return first, self.prompt_width + max(1, int(max(self.response_lengths[i] for i in rows)))

    def inputs(self, rows: list[int]) -> tuple[torch.Tensor, ...]:
        """(ids, attention mask, response, positions, fast_decode mask or None) of these rows for an update
        pass (_forward_ids)."""
        first, end = self._columns(rows)
        index = torch.tensor(rows, device=self.ids.device)
        ids = self.ids[index, first:end]
        mask = self.mask[index, :, first:end, first:end] if self.mask is not None else None
        response = ids[:, self.prompt_width - first :]
        return ids, self.attention[index, first:end], response, self.positions[index, first:end], mask

    def rows(self, rows: list[int]) -> Minibatch:
        if self.per_token is None:
            raise RuntimeError("Minibatches.rows needs with_targets first")
        first, end = self._columns(rows)
        passes = self.inputs(rows)
        index = torch.tensor(rows, device=self.ids.device)
        mask, logprobs, values, advantages, returns = self.per_token[:, index, : end - self.prompt_width].unbind()
        return Minibatch(*passes[:3], mask, logprobs, values, advantages, returns, *passes[3:])


@dataclasses.dataclass
class Minibatch:
    ids: torch.Tensor  # (rows, prompt + response) the prompts' and responses' tokens
    attention: torch.Tensor  # (rows, prompt + response) 1 on real tokens
    response: torch.Tensor  # (rows, response) the response part of `ids`
    mask: torch.Tensor  # (rows, response) 1 on real response tokens
    logprobs: torch.Tensor  # (rows, response) under the sampling policy
    values: torch.Tensor  # (rows, response)
    advantages: torch.Tensor  # (rows, response)
    returns: torch.Tensor  # (rows, response)
    positions: torch.Tensor  # (rows, prompt + response) position ids
    attention_mask: torch.Tensor | None  # fast_decode's (rows, 1, columns, columns) mask, when built


@dataclasses.dataclass
class History:
    """Per-step curves, saved in training_results.json and plotted."""

    reward: list[float] = dataclasses.field(default_factory=list)
    reward_std: list[float] = dataclasses.field(default_factory=list)
    # Mean and std of the scores on the 0..1 feedback scale (empty when the reward function gives none).
    rating: list[float] = dataclasses.field(default_factory=list)
    rating_std: list[float] = dataclasses.field(default_factory=list)
    kl: list[float] = dataclasses.field(default_factory=list)
    loss: list[float] = dataclasses.field(default_factory=list)
    value_loss: list[float] = dataclasses.field(default_factory=list)
    entropy: list[float] = dataclasses.field(default_factory=list)
    kl_coef: list[float] = dataclasses.field(default_factory=list)
    response_length: list[float] = dataclasses.field(default_factory=list)


class PPOTrainer:
    def __init__(self, config: TrainingConfig, model_path: str, device: str, group: Group | None = None) -> None:
        """`group`: the data-parallel ranks this process trains among (rlhf.training.distributed); each rank
        is given its share of every batch (`train` splits it), gradients are averaged across ranks and the
        statistics PPO normalises with are the whole batch's. None: one process."""
        from transformers import AutoModelForCausalLM

        from rlhf.training.modeling import autocast_dtype, load_tokenizer, pick_device

        self.config = config
        self.device = pick_device(device)
        self.group = group or Group()
        if config.num_processes > 1 and config.num_processes != self.group.local_size:
            raise TrainingError(
                f"num_processes={config.num_processes} asks for that many ranks on this machine, but this process "
                f"runs among {self.group.local_size}: start it under `torchrun --nproc-per-node "
                f"{config.num_processes}` (the policy service does), or use num_processes=1"
            )
        for name in ("batch_size", "mini_batch_size"):
            if getattr(config, name) % self.group.world_size:
                raise TrainingError(
                    f"{name}={getattr(config, name)} does not split evenly over {self.group.world_size} ranks"
                )
        # Rows of this rank's share of a minibatch (the ranks' shares together make one minibatch).
        self.mini_batch = config.mini_batch_size // self.group.world_size
        self.amp = autocast_dtype(config.mixed_precision, device)
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.tokenizer = load_tokenizer(model_path, padding_side="left")
        lm = load_model(AutoModelForCausalLM, model_path)
        fuse_activations(lm)
        self.n_ctx = sequences.context_length(lm)
        if self.n_ctx is not None and config.max_new_tokens >= self.n_ctx:
            raise TrainingError(
                f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in this model's context of "
                f"{self.n_ctx} tokens; use at most {self.n_ctx - 1} (prompts are cut from the left to fit)"
            )
        if config.gradient_checkpointing:
            use_gradient_checkpointing(lm)
        self.reference = None
        if config.use_lora:
            lm = add_lora(lm, config, "CAUSAL_LM")
        else:
            # Full fine-tuning needs its own frozen copy of the starting weights.
            self.reference = load_model(AutoModelForCausalLM, model_path).to(device).eval()
            fuse_activations(self.reference)
            disable_dropout(self.reference)
            self.reference.requires_grad_(False)
        self.model = PolicyWithValueHead(lm).to(device)
        self.cpu_threads = use_cpu_threads(self.model, config.cpu_threads, device, config.use_lora)
        # After peft: its LoRA dropout layers exist only now. With any dropout left on, two passes over the
        # same tokens differ and the PPO ratio drifts from 1 before an update (lora_dropout stays a valid
        # setting for the reward model; RL runs without dropout, as TRL does).
        disable_dropout(self.model)
        self.model.train()  # dropout is 0 everywhere: train mode only enables gradient bookkeeping
        # The LM heads that log-probs are taken with, a chunk of positions at a time (rlhf.training.logprobs); None
        # where a model's logits are more than its output embedding of the last hidden state.
        self.head = output_head(self.model.lm)
        self.reference_head = output_head(self.reference) if self.reference is not None else self.head
        # Under fp16/bf16 autocast the frozen linear weights (LoRA's base, the full mode's reference) are kept
        # in that dtype: the same results, less memory (store_frozen_matrices). After the forward passes above,
        # which run without autocast; every pass from here runs under it.
        self.model_path = model_path
        self.half_stored: list[str] = []
        if self.amp is not None:
            self.half_stored = store_frozen_matrices(self.model.lm if config.use_lora else self.reference, self.amp)
        self.eos_ids = sequences.eos_token_ids(lm, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        # No weight decay (TRL's default): it would pull LoRA adapters and the value head towards 0.
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # fused: one kernel for all parameters instead of a Python loop over them (CPU and CUDA).
        self._fused = device.split(":")[0] in ("cpu", "cuda")
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=config.learning_rate, eps=1e-5, weight_decay=0.0, fused=self._fused
        )
        # Updates skipped because their gradients were not finite (reported in the metrics).
        self.skipped_updates = 0
        # Linear decay to 0 over the run's optimiser steps, as TRL's trainers do by default.
        total_updates = max(
            1, config.max_steps * config.ppo_epochs * math.ceil(config.batch_size / config.mini_batch_size)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda update: max(0.0, 1.0 - update / total_updates)
        )
        # fp16 needs loss scaling or small gradients underflow to 0; bf16 and fp32 don't.
        self.scaler = torch.amp.GradScaler(device.split(":")[0], enabled=self.amp == torch.float16)
        self.kl_ctl = ppo.AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
        self.history = History()
        self.step = 0
        # Every rank initialised the same weights from `seed` above; each samples and shuffles its own share
        # with its own stream (rank 0's is a single process's).
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed + self.group.rank)
        # Draws of the sampling loop, on the model's device.
        self.sampler = torch.Generator(device=device).manual_seed(config.seed + self.group.rank)
        # Prompts cut from the left to fit the context beside max_new_tokens (reported in the metrics).
        self.truncated_prompts = 0
        # One thread runs the reward function while the rollout's forward passes run here.
        self._scoring = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scoring")
        # Seconds the last rollout waited for its scores after its own forward passes were done.
        self.score_wait_seconds = 0.0
        # In fp32 the old log-probs and values come from the sampling passes themselves (the KV-cache passes
        # agree with a full forward pass to ~1e-6, so the first update's ratio is 1 within that): one forward
        # pass of the policy per rollout saved. Under autocast a cached and a full pass differ more, so a
        # separate pass computes them, as TRL does.
        self.reuse_sampling_passes = self.amp is None

    # --- rollouts ------------------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.amp, enabled=self.amp is not None)

    @torch.no_grad()
    def rollout(self, prompts: list[str], score_fn: ScoreFn, while_scoring: WhileScoring | None = None) -> Rollout:
        """Sample responses to `prompts` and score them. `while_scoring(query, query_mask, response, mask)` runs
        after the rollout's own passes, while the reward function may still be scoring, in training mode with
        gradients on; its answer comes back in Rollout.while_scoring."""
        # Sampling needs the KV cache, which transformers turns off in training mode under gradient
        # checkpointing; dropout is off, so eval mode computes the same as training mode.
        self.model.eval()
        try:
            return self._rollout(prompts, score_fn, while_scoring)
        finally:
            self.model.train()

    def _rollout(self, prompts: list[str], score_fn: ScoreFn, while_scoring: WhileScoring | None) -> Rollout:
        c = self.config
        room = self.n_ctx - c.max_new_tokens if self.n_ctx is not None else None
        ids = [sequences.encode_prompt(self.tokenizer, prompt) for prompt in prompts]
        empty = [index for index, row in enumerate(ids) if not row]
        if empty:  # nothing to condition on (the sampling loop would fail on an empty batch of prompts)
            raise TrainingError(
                f"prompt {empty[0]} of the batch ({prompts[empty[0]]!r}) has no tokens; train on non-empty prompts"
            )
        if room is not None:
            self.truncated_prompts += sum(1 for row in ids if len(row) > room)
            ids = [sequences.keep_end(row, room) for row in ids]
        sampled = sequences.sample(
            self.model.lm,
            ids,
            c.max_new_tokens,
            c.temperature,
            self.eos_ids,
            self.pad_id,
            self.sampler,
            self._autocast(),
            with_hidden=self.reuse_sampling_passes,
        )
        query, query_mask, response, mask = sampled.query, sampled.query_mask, sampled.response, sampled.mask
        texts = [
            self.tokenizer.decode(
                [int(token) for token in row[m.bool()] if int(token) not in self.eos_ids], skip_special_tokens=True
            )
            for row, m in zip(response, mask, strict=True)
        ]

        # Scoring (a gRPC call to the reward service, in another process) overlaps the policy's and the
        # reference's forward passes over the rollout, which do not depend on the scores.
        scoring = self._scoring.submit(score_fn, prompts, texts)
        try:
            if self.reuse_sampling_passes:
                logprobs = sampled.logprobs
                values = self.model.value_head(sampled.hidden.to(self.model.value_head.weight.dtype)).squeeze(-1)
                values = values.float() * mask
            else:
                logprobs, values, _ = self._forward(self.model, query, query_mask, response, mask)
            ref_logprobs = self._reference_logprobs(query, query_mask, response, mask)
            early = None
            if while_scoring is not None:
                self.model.train()
                try:
                    with torch.enable_grad():
                        early = while_scoring(query, query_mask, response, mask)
                finally:
                    self.model.eval()
        finally:
            waited = time.monotonic()
            answer = scoring.result()  # re-raises what the reward function raised
            self.score_wait_seconds = time.monotonic() - waited
        given, ratings = (answer.scores, answer.ratings) if isinstance(answer, Scores) else (answer, None)
        raw = torch.tensor(given, dtype=torch.float32, device=self.device)
        if raw.shape != (len(prompts),):
            raise TrainingError(f"the reward function returned {tuple(raw.shape)} scores for {len(prompts)} responses")
        bad = (~torch.isfinite(raw)).sum().item()
        if bad:
            # One NaN would poison whitening, GAE and every weight after the update.
            raise TrainingError(
                f"the reward model returned {bad} non-finite score(s) (NaN or infinity) for step {self.step + 1}; "
                f"check the reward model (retrain it, or use another version)"
            )
        scores = raw.clone()
        if c.missing_eos_penalty:
            # TRL's convention: a positive penalty, subtracted from responses that never ended.
            scores = torch.where(sampled.ended, scores, scores - c.missing_eos_penalty)
        if c.reward_clip:
            scores = scores.clamp(-c.reward_clip, c.reward_clip)
        if c.whiten_rewards and len(scores) * self.group.world_size > 1:
            every = self.group.gather(scores)  # the whole batch's statistics, on every rank
            scores = (scores - every.mean()) / (every.std() + 1e-8)

        rated = torch.tensor(ratings, dtype=torch.float32) if ratings is not None else None
        return Rollout(
            query, query_mask, response, mask, logprobs, ref_logprobs, values, scores, raw, rated, texts, early
        )

    def _forward(self, model: PolicyWithValueHead, query, query_mask, response, mask):
        """Log-probs (temperature-scaled, as sampled), values and entropies (no gradient) of the response
        tokens."""
        ids = torch.cat([query, response], 1)
        attention = torch.cat([query_mask, mask.long()], 1)
        return self._forward_ids(model, ids, attention, response)

    def _forward_ids(self, model: PolicyWithValueHead, ids, attention, response, positions=None, mask=None):
        """_forward of the prompts and responses `ids` (rows, prompt + response) with their attention mask,
        `response` their last columns; `positions` and `mask` as PolicyWithValueHead takes them."""
        keep = response.shape[1] + 1  # the positions that predict the response tokens, and the last one
        if self.head is not None:
            with self._autocast():
                hidden, values = model(ids, attention, keep, hidden_only=True, positions=positions, mask=mask)
                logprobs, entropy = token_logprobs(self.head, hidden[:, :-1], response, self.config.temperature)
            return logprobs, values[:, :-1].float(), entropy
        with self._autocast():
            logits, values = model(ids, attention, keep)
        logp = log_softmax_at(logits[:, -keep:-1], self.config.temperature)
        del logits  # the vocabulary-wide logits are not kept for backward (the log-softmax is)
        return ppo.gather_logprobs(logp, response), values[:, -keep:-1].float(), ppo.entropy_from_logprobs(logp)

    def _reference_logprobs(self, query, query_mask, response, mask) -> torch.Tensor:
        """Log-probs of the response tokens under the reference: the frozen copy, or with LoRA the same
        weights with the adapters disabled (no value head, no entropy: neither is needed here)."""
        ids = torch.cat([query, response], 1)
        attention = torch.cat([query_mask, mask.long()], 1)
        keep = response.shape[1] + 1
        reference = self.reference if self.reference is not None else self.model.lm
        adapters_off = self.model.lm.disable_adapter() if self.reference is None else contextlib.nullcontext()
        with adapters_off, self._autocast():
            if self.reference_head is not None:
                positions = position_ids_of(attention)
                hidden = fast_decode.final_hidden_states(reference, ids, attention, positions, keep)
                if hidden is None:
                    hidden = reference(
                        input_ids=ids,
                        attention_mask=attention,
                        position_ids=positions,
                        output_hidden_states=True,
                        **logits_to_keep(reference, 1),
                    ).hidden_states[-1]
                return token_logprobs(self.reference_head, hidden[:, -keep:-1], response, self.config.temperature)[0]
            logits = reference(
                input_ids=ids,
                attention_mask=attention,
                position_ids=position_ids_of(attention),
                **logits_to_keep(reference, keep),
            ).logits
        return ppo.gather_logprobs(log_softmax_at(logits[:, -keep:-1], self.config.temperature), response)

    # --- one PPO step --------------------------------------------------------------------------------
    def step_on(self, prompts: list[str], score_fn: ScoreFn) -> dict[str, float]:
        c = self.config
        started = time.monotonic()
        # The first epoch's shuffle (drawn first, as before: the rollout does not use this generator). Its first
        # micro-batch's forward pass needs no scores, so it runs while the reward function scores.
        first_order = torch.randperm(len(prompts), generator=self.generator).tolist()
        first_micro = self._micro_batches(first_order[: self.mini_batch])[0]

        def start_update(query, query_mask, response, mask):
            fast = self.head is not None and fast_decode.refusal(self.model.lm) is None
            minibatches = Minibatches(query, query_mask, response, mask, with_attention_mask=fast)
            return minibatches, self._forward_ids(self.model, *minibatches.inputs(first_micro))

        roll = self.rollout(prompts, score_fn, start_update)
        minibatches, early = roll.while_scoring
        scored_at = time.monotonic()
        with torch.no_grad():
            rewards, kl = ppo.token_rewards(roll.scores, roll.logprobs, roll.ref_logprobs, roll.mask, self.kl_ctl.value)
            advantages, returns = ppo.gae(rewards, roll.values, roll.mask, c.gamma, c.lam)
            advantages = self.group.whiten(advantages, roll.mask)

        batch = roll.query.shape[0]
        minibatches.with_targets(roll, advantages, returns)
        # Per micro-batch, in this order: kept as tensors and read once at the end of the step.
        keys = ("pg", "vf", "clip", "approxkl", "vclip", "entropy", "verr", "ratio")
        stats: list[torch.Tensor] = []
        first_ratio_error = 0.0
        for epoch in range(c.ppo_epochs):
            order = first_order if epoch == 0 else torch.randperm(batch, generator=self.generator).tolist()
            for start in range(0, batch, self.mini_batch):
                minibatch = order[start : start + self.mini_batch]
                for micro in self._micro_batches(minibatch):
                    part = minibatches.rows(micro)
                    if early is not None:
                        (new_logprobs, new_values, entropy), early = early, None  # the first one ran already
                    else:
                        new_logprobs, new_values, entropy = self._forward_ids(
                            self.model, part.ids, part.attention, part.response, part.positions, part.attention_mask
                        )
                    mask, old = part.mask, part.logprobs
                    pg, pg_stats = ppo.policy_loss(new_logprobs, old, part.advantages, mask, c.cliprange)
                    vf, vf_stats = ppo.value_loss(new_values, part.values, part.returns, mask, c.cliprange_value)
                    loss = (pg + c.vf_coef * vf) * (len(micro) / len(minibatch))
                    self.scaler.scale(loss).backward()
                    with torch.no_grad():
                        if epoch == 0 and start == 0:
                            # Nothing was updated yet: the ratio must be 1 (dropout off, same distribution).
                            ratio = torch.exp((new_logprobs - old) * mask)
                            error = ((ratio - 1).abs() * mask).max().item()
                            first_ratio_error = max(first_ratio_error, error)
                        stats.append(
                            torch.stack(
                                [
                                    pg,
                                    vf,
                                    pg_stats["clipfrac"],
                                    pg_stats["approxkl"],
                                    vf_stats["clipfrac"],
                                    ppo.masked_mean(entropy, mask),
                                    vf_stats["error"],
                                    pg_stats["ratio"],
                                ]
                            )
                        )
                self._optimizer_step()

        # The step's statistics over the whole batch: every rank's rows (in rank order), its loss averages
        # averaged, its peaks maxed; the KL controller moves on the global KL, identically on every rank.
        columns = [roll.raw_scores, kl.sum(1), roll.mask.sum(1)]
        if roll.ratings is not None:
            columns.append(roll.ratings)
        rows = self.group.gather(torch.stack([column.float().to(self.device) for column in columns], 1))
        batch = rows.shape[0]
        raw_scores, kl_sums, lengths = rows[:, 0], rows[:, 1], rows[:, 2]
        ratings = rows[:, 3] if roll.ratings is not None else None
        local = torch.stack(stats).double().mean(0)
        avg = dict(zip(keys, self.group.mean(local).tolist(), strict=True))
        peaks = [first_ratio_error, roll.response.shape[1], roll.query.shape[1]]
        first_ratio_error, response_width, query_width = self.group.max(
            torch.tensor(peaks, dtype=torch.float64, device=self.device)
        ).tolist()
        truncated = self.group.sum(torch.tensor([float(self.truncated_prompts)], device=self.device)).item()
        mean_kl = kl_sums.mean().item()
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(mean_kl, batch)
        self.step += 1
        score_mean = raw_scores.mean().item()
        score_std = raw_scores.std().item() if batch > 1 else 0.0
        metrics = {
            "objective/scores": score_mean,
            "objective/scores_std": score_std,
            "objective/kl": mean_kl,
            "objective/entropy": avg["entropy"],
            "objective/non_score_reward": (-kl_coef * kl_sums).mean().item(),
            "objective/rlhf_reward": score_mean - kl_coef * mean_kl,
            "loss/policy_avg": avg["pg"],
            "loss/value_avg": avg["vf"],
            "policy/clipfrac_avg": avg["clip"],
            "policy/approxkl_avg": avg["approxkl"],
            "val/clipfrac_avg": avg["vclip"],
            "val/error": avg["verr"],
            "kl_coef": kl_coef,
            "val/ratio": avg["ratio"],
            "policy/first_minibatch_ratio_error": first_ratio_error,
            "lr": self.scheduler.get_last_lr()[0],
            "prompts_truncated": truncated,
            "policy/skipped_updates": float(self.skipped_updates),
            "response_length": lengths.mean().item(),
            # Widths the step's passes ran at (its longest response and prompt), for the dry-run cost model.
            "tokens/response_width": response_width,
            "tokens/query_width": query_width,
            "time/rollout_and_score_s": scored_at - started,
            "time/score_wait_s": self.score_wait_seconds,
            "time/step_s": time.monotonic() - started,
        }
        h = self.history
        h.reward.append(score_mean)
        h.reward_std.append(score_std)
        if ratings is not None:
            metrics["objective/ratings"] = ratings.mean().item()
            metrics["objective/ratings_std"] = ratings.std().item() if batch > 1 else 0.0
            h.rating.append(metrics["objective/ratings"])
            h.rating_std.append(metrics["objective/ratings_std"])
        h.kl.append(mean_kl)
        h.loss.append(avg["pg"] + c.vf_coef * avg["vf"])
        h.value_loss.append(avg["vf"])
        h.entropy.append(avg["entropy"])
        h.kl_coef.append(kl_coef)
        h.response_length.append(metrics["response_length"])
        return metrics

    def _micro_batches(self, minibatch: list[int]) -> list[list[int]]:
        """TRL's accumulation: a minibatch is split into micro-batches for memory, and it is still one optimiser
        step, so no step straddles two minibatches or epochs and none is partial."""
        parts = torch.tensor_split(torch.tensor(minibatch), self.config.gradient_accumulation_steps)
        return [part.tolist() for part in parts if len(part)]

    def _optimizer_step(self) -> None:
        self.group.average_gradients(self.trainable)  # every rank then takes the same step
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the fp16-scaled ones
        if self._fused and not self.scaler.is_enabled():
            self.skipped_updates += clip_and_step(self.optimizer, self.trainable, self.config.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # --- the loop ------------------------------------------------------------------------------------
    def _prompt_stream(self, prompts: list[str]) -> Iterator[str]:
        """Endless prompts: seeded shuffles of the whole list, one after another."""
        rng = random.Random(self.config.seed)
        while True:
            pool = list(prompts)
            rng.shuffle(pool)
            yield from reversed(pool)

    def train(
        self, prompts: list[str], score_fn: ScoreFn, on_step: StepCallback, checkpoint: Callable[[], None] | None = None
    ) -> History:
        stream = self._prompt_stream(prompts)
        # A resumed run draws the prompts an uninterrupted run would have drawn from here on.
        for _ in itertools.islice(stream, self.step * self.config.batch_size):
            pass
        while self.step < self.config.max_steps:
            # Every rank draws the same global batch and keeps its share.
            batch = list(itertools.islice(stream, self.config.batch_size))
            metrics = self.step_on(self.group.shard(batch), score_fn)
            on_step(self.step, metrics)
            if checkpoint and self.config.checkpoint_interval and self.step % self.config.checkpoint_interval == 0:
                checkpoint()
        return self.history

    # --- persistence ---------------------------------------------------------------------------------
    def save_checkpoint(self, path: pathlib.Path, extra: dict | None = None) -> None:
        """Trainable weights (value head included), optimizer, KL controller, step, curves and sampling
        state, written atomically; `extra` is kept alongside (e.g. the reward-model version). Under data
        parallelism rank 0 writes it (the weights are the same on every rank) and every other rank writes only
        its own sampling state beside it (rank_path)."""
        if not self.group.is_main:
            self._write(rank_path(path, self.group.rank), {"step": self.step, **self._random_state()})
            return
        trainable = {k: v for k, v in self.model.named_parameters() if v.requires_grad}
        state = {
            "step": self.step,
            "kl_coef": self.kl_ctl.value,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "truncated_prompts": self.truncated_prompts,
            "trainable": {k: v.detach().cpu() for k, v in trainable.items()},
            "history": dataclasses.asdict(self.history),
            "extra": extra or {},
            **self._random_state(),
        }
        self._write(path, state)

    def _random_state(self) -> dict:
        return {
            "sampler": self.sampler.get_state().cpu(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    @staticmethod
    def _write(path: pathlib.Path, state: dict) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    @staticmethod
    def read_checkpoint(path: pathlib.Path, rank: int = 0) -> dict | None:
        """A checkpoint written by save_checkpoint, or None if there is none; for rank > 0 with that rank's
        own sampling state when it saved one at the same step (else without: restore then reseeds it)."""
        if not path.exists():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        if rank:
            own = rank_path(path, rank)
            mine = torch.load(own, map_location="cpu", weights_only=False) if own.exists() else None
            for key in ("sampler", "generator", "torch_rng"):
                state.pop(key, None)
            if mine is not None and mine["step"] == state["step"]:
                state.update({k: v for k, v in mine.items() if k != "step"})
        return state

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint (read_checkpoint) of the same configuration."""
        parameters = dict(self.model.named_parameters())
        missing = set(state["trainable"]) - set(parameters)
        if missing:
            raise RuntimeError(f"the checkpoint does not match this model (unknown weights {sorted(missing)[:3]})")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                parameters[name].copy_(value.to(parameters[name].device))
        self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:  # checkpoints from before the schedule keep a constant rate
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.truncated_prompts = state["truncated_prompts"]
        self.kl_ctl.value = state["kl_coef"]
        self.step = state["step"]
        self.history = History(**state["history"])
        if "generator" in state:
            if "sampler" in state:
                self.sampler.set_state(state["sampler"])
            self.generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
        else:
            # A rank without its own saved state (another number of ranks, or it had not saved at this step):
            # fresh streams of its own for the steps from here, still distinct from every other rank's.
            fresh = self.config.seed + self.group.rank + 1_000_003 * self.step
            self.sampler.manual_seed(fresh)
            self.generator.manual_seed(fresh)

    def _full_precision_copy(self) -> nn.Module:
        """The LoRA policy on the checkpoint's weights as loaded (reloaded, on the CPU) with this run's trained
        adapters copied in."""
        from transformers import AutoModelForCausalLM

        copy = add_lora(load_model(AutoModelForCausalLM, self.model_path), self.config, "CAUSAL_LM")
        trained = {name: p.detach().cpu() for name, p in self.model.lm.named_parameters() if p.requires_grad}
        unexpected = copy.load_state_dict(trained, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"trained weights the reloaded model does not have: {sorted(unexpected)[:3]}")
        return copy

    def save(self, folder: pathlib.Path) -> None:
        """policy/ (merged, loadable by AutoModelForCausalLM) and value_head.pt beside it."""
        lm = self.model.lm
        if self.config.use_lora:
            # Merged into the checkpoint's own weights: the frozen ones may be held in fp16/bf16 here.
            lm = (self._full_precision_copy() if self.half_stored else lm).merge_and_unload()
        policy_dir = folder / "policy"
        policy_dir.mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(policy_dir)
        self.tokenizer.save_pretrained(policy_dir)
        torch.save(self.model.value_head.state_dict(), folder / "value_head.pt")
        (folder / "value_head.json").write_text(
            json.dumps({"hidden_size": self.model.value_head.in_features, "input": "last hidden state"})
        )
