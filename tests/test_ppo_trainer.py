"""The PPO trainer in-process on the tiny model: the defects a review found, each pinned by a test."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from rlhf.training import sequences
from rlhf.training.config import TrainingConfig
from rlhf.training.errors import TrainingError
from rlhf.training.ppo_trainer import PPOTrainer

pytestmark = pytest.mark.slow

PROMPTS = ["Where did you go today?", "Tell me something nice.", "What did you see?", "How was the sea?"]


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that changes the policy quickly: longer answers score higher."""
    return [min(len(r), 40) / 40 for r in responses]


def quick(**overrides) -> TrainingConfig:
    values = dict(learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=2, max_steps=3, max_new_tokens=8)
    values.update(overrides)
    return TrainingConfig(**values)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_ratio_is_one_on_the_first_minibatch_of_every_step(tiny_model, use_lora):
    # The seed's default lora_dropout=0.1 used to stay active in rollouts and updates: two passes over the
    # same tokens differed and the ratio drifted from 1 before any update of the step.
    trainer = PPOTrainer(quick(use_lora=use_lora, lora_dropout=0.1), str(tiny_model), "cpu")
    errors = []
    trainer.train(PROMPTS, length_reward, lambda step, m: errors.append(m["policy/first_minibatch_ratio_error"]))
    assert len(errors) == 3
    assert max(errors) < 1e-4, errors
    assert not any(m.training and isinstance(m, torch.nn.Dropout) and m.p > 0 for m in trainer.model.modules())


def test_rollouts_sample_the_full_softmax_they_are_scored_under(tiny_model):
    # With top_k/top_p truncation the tail was never sampled though log-probs, KL and entropy counted it.
    trainer = PPOTrainer(quick(top_k=5, top_p=0.5), str(tiny_model), "cpu")
    prompt = sequences.encode_prompt(trainer.tokenizer, "Where did you go today?")
    n = 3000
    temperature = 3.0  # flatter, so that the tail beyond the top 5 holds enough mass to count
    drawn = sequences.sample(
        trainer.model.lm, [prompt] * n, 1, temperature, trainer.eos_ids, trainer.pad_id, trainer.sampler
    )
    with torch.no_grad():
        logits = trainer.model.lm(input_ids=torch.tensor([prompt])).logits[0, -1]
    probs = torch.softmax(logits.float() / temperature, -1)
    top5 = set(torch.topk(probs, 5).indices.tolist())
    tail_mass = 1.0 - probs[list(top5)].sum().item()
    tail_drawn = sum(1 for token in drawn.response[:, 0].tolist() if token not in top5) / n
    assert tail_mass > 0.05  # the test means something on this model
    assert tail_drawn == pytest.approx(tail_mass, abs=4 * math.sqrt(tail_mass * (1 - tail_mass) / n) + 0.005)


def test_a_checkpoints_generation_config_does_not_change_what_rollouts_sample(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config_file = folder / "generation_config.json"
    generation = json.loads(config_file.read_text()) if config_file.exists() else {}
    generation.update({"repetition_penalty": 1e9, "top_k": 1, "do_sample": False})
    config_file.write_text(json.dumps(generation))
    plain = PPOTrainer(quick(), str(tiny_model), "cpu")
    penalised = PPOTrainer(quick(), str(folder), "cpu")
    prompt = sequences.encode_prompt(plain.tokenizer, "Tell me something nice.")
    a = sequences.sample(plain.model.lm, [prompt] * 6, 12, 1.0, plain.eos_ids, plain.pad_id, plain.sampler)
    b = sequences.sample(
        penalised.model.lm, [prompt] * 6, 12, 1.0, penalised.eos_ids, penalised.pad_id, penalised.sampler
    )
    assert torch.equal(a.response, b.response)  # same seed, same weights: the settings had no effect


def test_a_prompt_longer_than_the_context_is_cut_from_the_left_and_trains(tiny_model):
    trainer = PPOTrainer(quick(max_steps=1), str(tiny_model), "cpu")
    context = sequences.context_length(trainer.model.lm)
    long_prompt = "Tell me about the sea and the boats and the long walk home. " * 60  # ~3,600 characters
    assert len(sequences.encode_prompt(trainer.tokenizer, long_prompt)) > context
    metrics = []
    trainer.train([long_prompt, *PROMPTS], length_reward, lambda step, m: metrics.append(m))
    assert metrics and metrics[-1]["prompts_truncated"] >= 1


def test_max_new_tokens_that_leave_no_room_for_a_prompt_are_refused(tiny_model):
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(tiny_model).n_positions
    with pytest.raises(TrainingError, match="max_new_tokens"):
        PPOTrainer(quick(max_new_tokens=context), str(tiny_model), "cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_score_fails_the_step_with_the_reason(tiny_model, bad):
    trainer = PPOTrainer(quick(max_steps=1), str(tiny_model), "cpu")
    before = {k: v.clone() for k, v in trainer.model.named_parameters() if v.requires_grad}

    def poisoned(prompts, responses):
        scores = length_reward(prompts, responses)
        scores[1] = bad
        return scores

    with pytest.raises(TrainingError, match="non-finite"):
        trainer.train(PROMPTS, poisoned, lambda step, m: None)
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(value, after[name]) for name, value in before.items())  # nothing was updated


def test_missing_eos_penalty_is_positive_and_subtracted_as_in_trl(tiny_model):
    trainer = PPOTrainer(quick(max_new_tokens=2, missing_eos_penalty=1.0), str(tiny_model), "cpu")
    roll = trainer.rollout(PROMPTS, lambda p, r: [0.5] * len(p))
    last = roll.response.gather(1, (roll.mask.sum(1).long() - 1).unsqueeze(1)).squeeze(1)
    ended = torch.tensor([int(token) in trainer.eos_ids for token in last])
    expected = torch.where(ended, torch.tensor(0.5), torch.tensor(-0.5))
    assert torch.equal(roll.scores, expected)
    assert (~ended).any()  # two tokens: some answers never end


def test_learning_rate_decays_linearly_and_no_weight_decay(tiny_model):
    trainer = PPOTrainer(quick(max_steps=2, ppo_epochs=1), str(tiny_model), "cpu")
    assert all(group["weight_decay"] == 0.0 for group in trainer.optimizer.param_groups)
    rates = []
    trainer.train(PROMPTS, length_reward, lambda step, m: rates.append(m["lr"]))
    # 2 steps x 1 epoch x 2 minibatches = 4 updates from 1e-3 down to 0
    assert rates == pytest.approx([5e-4, 0.0])


CHAT_TEMPLATE = (
    "{% for m in messages %}<|pad|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|pad|>assistant:{% endif %}"
)


@pytest.fixture
def chat_model(tiny_model, tmp_path):
    """The tiny model with a chat template, as an instruction-tuned checkpoint would have."""
    folder = tmp_path / "chat"
    shutil.copytree(tiny_model, folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config))
    return folder


def test_rollouts_scoring_and_serving_read_a_prompt_through_the_same_chat_template(chat_model):
    from inference_service.generation import SamplingParams, generate
    from inference_service.models import load_for_inference
    from rlhf.training.reward_inputs import pair_text

    prompt = "Where did you go today?"
    trainer = PPOTrainer(quick(max_steps=1), str(chat_model), "cpu")
    ids = sequences.encode_prompt(trainer.tokenizer, prompt)
    templated = trainer.tokenizer.decode(ids)
    assert templated.startswith("<|pad|>user: Where did you go today?") and templated.endswith("assistant:")
    # PPO trains on exactly the ids the inference service serves (no extra special tokens on either side).
    roll = trainer.rollout([prompt], lambda p, r: [0.0])
    assert roll.query[0][roll.query_mask[0].bool()].tolist() == ids
    served = generate(load_for_inference(str(chat_model), "cpu"), prompt, SamplingParams(max_new_tokens=4, seed=0))
    assert served.prompt_tokens == len(ids)
    # The reward model reads the same conversation, with the answer as the assistant's turn.
    assert pair_text(trainer.tokenizer, prompt, "The sea.") == (
        "<|pad|>user: Where did you go today?\n<|pad|>assistant: The sea.\n"
    )


def test_accumulation_splits_a_minibatch_and_still_steps_once_per_minibatch(tiny_model):
    # 4 prompts, minibatches of 2, 2 epochs: 4 optimiser steps a PPO step whatever the accumulation (the old
    # loop accumulated across minibatches and epochs: 2 steps here, the last one partial).
    trainer = PPOTrainer(quick(max_steps=2, gradient_accumulation_steps=3), str(tiny_model), "cpu")
    rates = []
    trainer.train(PROMPTS, length_reward, lambda step, m: rates.append(m["lr"]))
    assert rates == pytest.approx([5e-4, 0.0])  # 8 updates in all, linear decay: half-way after step 1


def _two_optimised_copies(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    return model, twin


@pytest.mark.parametrize("max_norm", [0.01, 1e6], ids=["clipped", "unclipped"])
def test_fused_clip_and_step_matches_clip_grad_norm_then_step(max_norm):
    # The clip is folded into the fused AdamW kernel's gradient scale: the result must be what the
    # textbook clip_grad_norm_ + step gives, over several steps.
    from rlhf.training.ppo_trainer import clip_and_step

    model, twin = _two_optimised_copies()
    ours = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.0, fused=True)
    textbook = torch.optim.AdamW(twin.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.0, fused=True)
    data = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        for net, optimiser in ((model, ours), (twin, textbook)):
            optimiser.zero_grad()
            (net(data) ** 2).sum().mul(100).backward()
        assert clip_and_step(ours, list(model.parameters()), max_norm) is False
        torch.nn.utils.clip_grad_norm_(list(twin.parameters()), max_norm)
        textbook.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert not hasattr(ours, "grad_scale") and not hasattr(ours, "found_inf")


def test_a_non_finite_gradient_skips_the_update_instead_of_poisoning_the_weights():
    from rlhf.training.ppo_trainer import clip_and_step

    model, _ = _two_optimised_copies()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    before = [p.detach().clone() for p in model.parameters()]
    (model(torch.randn(4, 6)).sum() * float("nan")).backward()
    assert clip_and_step(optimiser, list(model.parameters()), 1.0) is True
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # The next finite update goes through as usual.
    optimiser.zero_grad()
    model(torch.randn(4, 6)).sum().backward()
    assert clip_and_step(optimiser, list(model.parameters()), 1.0) is False
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_old_logprobs_and_values_from_the_sampling_passes_equal_a_full_forward_pass(tiny_model, use_lora):
    # The rollout takes its old log-probs and values from the KV-cache sampling passes instead of a second
    # forward pass; they must be what a full forward pass over prompt + response gives.
    trainer = PPOTrainer(quick(use_lora=use_lora), str(tiny_model), "cpu")
    assert trainer.reuse_sampling_passes
    roll = trainer.rollout(PROMPTS[:4], length_reward)
    with torch.no_grad():
        logprobs, values, _ = trainer._forward(trainer.model, roll.query, roll.query_mask, roll.response, roll.mask)
    mask = roll.mask.bool()
    assert mask.sum() > 8
    assert torch.allclose(roll.logprobs[mask], logprobs[mask], atol=1e-4)
    assert torch.allclose(roll.values[mask], values[mask], atol=1e-4)


def test_minibatches_cut_the_padding_their_rows_share_and_compute_what_the_whole_batch_width_does(tiny_model):
    # Update passes used to run every minibatch at the whole batch's longest prompt and response.
    from rlhf.training.ppo_trainer import Minibatches

    trainer = PPOTrainer(quick(max_new_tokens=12, batch_size=8), str(tiny_model), "cpu")
    prompts = ["Hi.", "Tell me something nice about the sea and the boats on it, please.", *PROMPTS, "Yo", "Why?"]
    roll = trainer.rollout(prompts, length_reward)
    advantages, returns = torch.randn_like(roll.values), torch.randn_like(roll.values)
    # Built with the batch's fast_decode mask (sliced per minibatch) and without it (built per pass).
    batches = [
        Minibatches(roll.query, roll.query_mask, roll.response, roll.mask, with_attention_mask=built)
        for built in (True, False)
    ]
    minibatches = batches[0].with_targets(roll, advantages, returns)
    batches[1].with_targets(roll, advantages, returns)
    prompt_lengths, response_lengths = roll.query_mask.sum(1), roll.mask.sum(1)
    short = [i for i in range(len(prompts)) if prompt_lengths[i] < roll.query.shape[1]]
    assert short, "the test needs rows with shorter prompts than the batch's longest"
    for rows in ([short[0]], short[:2], list(range(len(prompts)))):
        part = minibatches.rows(rows)
        prompt, response = int(prompt_lengths[rows].max()), int(response_lengths[rows].max())
        assert part.ids.shape == (len(rows), prompt + response) and part.response.shape == (len(rows), response)
        assert torch.equal(part.response, roll.response[rows, :response])
        assert torch.equal(part.advantages, advantages[rows, :response])
        assert part.attention_mask is not None and batches[1].rows(rows).attention_mask is None
        with torch.no_grad():
            cut = trainer._forward_ids(
                trainer.model, part.ids, part.attention, part.response, part.positions, part.attention_mask
            )
            built_per_pass = trainer._forward_ids(trainer.model, part.ids, part.attention, part.response)
            whole = trainer._forward(
                trainer.model, roll.query[rows], roll.query_mask[rows], roll.response[rows], roll.mask[rows]
            )
        mask = part.mask.bool()
        for a, b, c in zip(cut, whole, built_per_pass, strict=True):
            assert torch.allclose(a[mask], b[:, :response][mask], atol=1e-5)
            assert torch.equal(a, c)
    assert minibatches.rows([short[0]]).ids.shape[1] < roll.query.shape[1] + roll.response.shape[1]


def test_small_models_train_on_one_cpu_thread_unless_told_otherwise(tiny_model, monkeypatch):
    from rlhf.training.threads import DEFAULT_THREADS, cpu_threads_for

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    trainer = PPOTrainer(quick(), str(tiny_model), "cpu")
    assert cpu_threads_for(trainer.model, 0) == 1
    assert cpu_threads_for(trainer.model, 3) == 3
    assert trainer.cpu_threads == 1 and torch.get_num_threads() == 1
    big = torch.nn.Linear(3000, 3000)  # 9M parameters: every core
    assert cpu_threads_for(big, 0) == DEFAULT_THREADS
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads_for(trainer.model, 0) == DEFAULT_THREADS


def test_fused_activations_compute_what_the_model_computed_before(tiny_model):
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from rlhf.training.modeling import fuse_activations

    before = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    after = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    assert any(isinstance(m, NewGELUActivation) for m in after.modules())  # GPT-2's "gelu_new"
    assert fuse_activations(after) == after.config.n_layer
    assert not any(isinstance(m, NewGELUActivation) for m in after.modules())
    assert any(isinstance(m, GELUTanh) for m in after.modules())
    ids = torch.randint(0, after.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(before(ids).logits, after(ids).logits, atol=1e-5)
    assert after.config.activation_function == "gelu_new"  # what is saved stays as it was


def test_the_first_update_pass_runs_while_the_reward_function_scores(tiny_model):
    # The reward service's answer used to be awaited before any update pass; the first one needs no scores.
    import threading
    import time

    trainer = PPOTrainer(quick(), str(tiny_model), "cpu")
    scored = threading.Event()

    def slow_reward(prompts, responses):
        time.sleep(0.3)
        scored.set()
        return length_reward(prompts, responses)

    passes = []
    forward = trainer._forward_ids

    def recording(*args, **kwargs):
        passes.append(scored.is_set())
        return forward(*args, **kwargs)

    trainer._forward_ids = recording
    metrics = trainer.step_on(PROMPTS, slow_reward)
    # quick(): 4 rows, minibatches of 2, 2 epochs: 4 update passes, the first before the scores came.
    assert passes == [False, True, True, True]
    assert metrics["policy/first_minibatch_ratio_error"] < 1e-4


def test_a_prompt_without_tokens_is_a_clear_error(tiny_model):
    # An all-empty batch used to end in an IndexError inside the sampling loop.
    trainer = PPOTrainer(quick(), str(tiny_model), "cpu")
    with pytest.raises(TrainingError, match="prompt 0 of the batch .* has no tokens"):
        trainer.step_on(["", "", "", ""], length_reward)
    with pytest.raises(TrainingError, match="prompt 2 of the batch"):
        trainer.step_on(["Hi.", "Where?", "", "Why?"], length_reward)
