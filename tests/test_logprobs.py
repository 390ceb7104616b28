"""Log-probs from the LM head a chunk of positions at a time (rlhf.training.logprobs): the same values,
entropies and gradients as the whole logits tensor, and PPO steps that do not change when chunking starts."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.training import corpus, logprobs
from rlhf.training.config import TrainingConfig
from rlhf.training.modeling import add_lora, disable_dropout
from rlhf.training.ppo_trainer import PPOTrainer


def whole(lm, ids, tokens, temperature):
    logp = (lm(input_ids=ids).logits[:, -tokens.shape[1] - 1 : -1].float() / temperature).log_softmax(-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def chunked(lm, head, ids, tokens, temperature):
    hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, -tokens.shape[1] - 1 : -1]
    return logprobs.token_logprobs(head, hidden, tokens, temperature, budget=1)  # one position per chunk


@pytest.mark.parametrize("lora", [False, True])
def test_chunks_give_the_whole_tensors_values_and_gradients(tiny_model, lora):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    if lora:
        lm = add_lora(lm, TrainingConfig(), "CAUSAL_LM")
    disable_dropout(lm)
    twin = copy.deepcopy(lm)
    head = logprobs.output_head(lm)
    assert head is not None
    ids = torch.randint(0, head.weight.shape[0], (3, 12))
    tokens = ids[:, -5:]

    expected, expected_entropy = whole(twin, ids, tokens, 0.7)
    got, entropy = chunked(lm, head, ids, tokens, 0.7)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(entropy, expected_entropy, atol=1e-5)
    assert not entropy.requires_grad  # a metric

    expected.sum().backward()
    got.sum().backward()
    grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    compared = 0
    for name, param in lm.named_parameters():
        if param.requires_grad and grads[name] is not None:
            assert torch.allclose(param.grad, grads[name], atol=1e-5), name
            compared += 1
    assert compared > 0


def test_chunk_positions_fit_the_budget():
    assert logprobs.chunk_positions(4, 129, 1000, budget=10**9) == 129  # whole: one piece
    step = logprobs.chunk_positions(4, 129, 50257, budget=32 * 2**20)
    assert 4 * step * 50257 * 4 <= 32 * 2**20 < 4 * (step + 1) * 50257 * 4
    assert logprobs.chunk_positions(4, 129, 50257, budget=1) == 1


def test_output_head_refuses_models_whose_logits_are_more_than_the_head():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=1.0,  # logits = tanh(head(h)) : not the head alone
    )
    assert logprobs.output_head(Gemma2ForCausalLM(config)) is None


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_ppo_steps_are_the_same_chunked_or_whole(tiny_model, monkeypatch, lora):
    config = TrainingConfig(use_lora=lora, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_new_tokens=12, seed=3)
    prompts = corpus.prompts(8, seed=1)

    def run():
        trainer = PPOTrainer(config, str(tiny_model), "cpu")
        metrics = [
            trainer.step_on(prompts[i * 4 : (i + 1) * 4], lambda _p, r: [len(x) / 50 for x in r]) for i in (0, 1)
        ]
        return metrics, [p.detach().clone() for p in trainer.trainable]

    whole_metrics, whole_weights = run()
    monkeypatch.setattr(logprobs, "LOGITS_BUDGET_BYTES", 1)  # every position its own chunk, recomputed
    chunk_metrics, chunk_weights = run()
    for key in ("objective/kl", "loss/policy_avg", "objective/entropy", "policy/approxkl_avg", "val/error"):
        assert chunk_metrics[-1][key] == pytest.approx(whole_metrics[-1][key], rel=1e-3, abs=1e-5), key
    for a, b in zip(whole_weights, chunk_weights, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
