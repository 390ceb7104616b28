"""Frozen linear weights kept in the autocast dtype (rlhf.training.modeling.store_frozen_matrices): under
autocast the model computes exactly what it did with them in fp32, with less memory, and PPOTrainer.save still
writes the checkpoint's own fp32 weights merged with the trained adapters.

CPUs train in fp32 (autocast_dtype), so the trainer applies this on GPUs only; these tests run the same
arithmetic under the CPU's bf16 autocast, which casts the same operations (addmm, linear)."""

from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load_file

from rlhf.training.config import TrainingConfig
from rlhf.training.modeling import store_frozen_matrices
from rlhf.training.ppo_trainer import PPOTrainer
from tests.test_fast_decode import PROMPTS, load, with_lora


def lora_policy(tiny_model):
    torch.manual_seed(0)  # peft draws the A matrices from the global generator
    lm = with_lora(load(tiny_model))  # adapters with nonzero B: they change the output
    for name, parameter in lm.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return lm


def forward_and_backward(lm, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    lm.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lm(input_ids=ids).logits
    logits.float().log_softmax(-1)[..., 3].sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}


def test_frozen_matrices_in_bf16_compute_exactly_what_fp32_ones_do_under_autocast(tiny_model):
    ids = torch.tensor([row + [1] * (9 - len(row)) for row in PROMPTS])
    reference = lora_policy(tiny_model)
    expected_logits, expected_grads = forward_and_backward(reference, ids)

    lm = lora_policy(tiny_model)
    fp32_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    stored = store_frozen_matrices(lm, torch.bfloat16)
    parameters = dict(lm.named_parameters())
    # Every frozen projection of every block (with_lora adapts all four), weights and biases; adapters,
    # embeddings and the tied head stay.
    assert sorted(stored) == sorted(n for n in parameters if ".base_layer." in n)
    assert len(stored) == 4 * 2 * lm.config.n_layer
    assert all(parameters[n].dtype == torch.bfloat16 for n in stored)
    assert all(p.dtype == torch.float32 for n, p in parameters.items() if "lora_" in n or "wte" in n or "wpe" in n)
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert sum(p.numel() * p.element_size() for p in lm.parameters()) < fp32_bytes

    logits, grads = forward_and_backward(lm, ids)
    assert torch.equal(logits, expected_logits)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name


def test_a_frozen_reference_keeps_its_tied_head_and_embeddings(tiny_model):
    reference = load(tiny_model).requires_grad_(False)
    stored = store_frozen_matrices(reference, torch.bfloat16)
    assert stored and not any("wte" in n or "lm_head" in n or "wpe" in n for n in stored)
    assert reference.get_output_embeddings().weight.dtype == torch.float32


def test_the_saved_policy_is_the_checkpoints_fp32_weights_merged_with_the_trained_adapters(tiny_model, tmp_path):
    config = dataclasses.replace(TrainingConfig(), use_lora=True, max_new_tokens=8, batch_size=2, mini_batch_size=2)

    def trainer_with_adapters() -> PPOTrainer:
        trainer = PPOTrainer(config, str(tiny_model), "cpu")
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():  # trained-looking adapters: the merge must change the weights
            for name, parameter in trainer.model.lm.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        return trainer

    plain = trainer_with_adapters()
    plain.save(tmp_path / "plain")
    half = trainer_with_adapters()
    half.half_stored = store_frozen_matrices(half.model.lm, torch.bfloat16)  # as the trainer does on a GPU
    half.save(tmp_path / "half")

    expected = load_file(tmp_path / "plain" / "policy" / "model.safetensors")
    saved = load_file(tmp_path / "half" / "policy" / "model.safetensors")
    base = load_file(tiny_model / "model.safetensors")
    assert saved.keys() == expected.keys()
    for name, value in saved.items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[name]), name
    changed = [n for n in saved if n in base and not torch.equal(saved[n], base[n])]
    assert any("c_attn.weight" in n for n in changed)  # the adapters were merged in
    # The training model is untouched by saving: still LoRA, its frozen weights still in bf16.
    assert dict(half.model.lm.named_parameters())[half.half_stored[0]].dtype == torch.bfloat16
