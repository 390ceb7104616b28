"""The GPT-2 fast decode path (rlhf.training.fast_decode) computes what the model's own forward does: logits
and last hidden states against an uncached full forward, the same sampled tokens as the generic path in
sequences.sample, with and without LoRA; models it does not run exactly take the generic path."""

from __future__ import annotations

import pytest
import torch

from rlhf.training import fast_decode, sequences
from tests.test_seed_library import tiny_local_model

# Left-padded to 9: rows of different lengths, so a position or padding mistake shows in the padded rows.
PROMPTS = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 13, 14, 15], [20], [30, 31, 32, 33, 34]]


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def with_lora(lm):
    """`lm` with LoRA on every projection, its B weights nonzero so the adapters change the output."""
    from peft import LoraConfig, get_peft_model

    targets = ["c_attn", "c_proj", "c_fc"]
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True)
    model = get_peft_model(lm, config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def random_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=2, **overrides)
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def decode_against_full_forward(lm, prompts, new_tokens: int, pad_id: int):
    """Feeds `prompts` then `new_tokens` fixed random tokens through the fast decoder and returns the largest
    differences of its logits and hidden states from one uncached forward over the whole sequence."""
    query, query_mask = sequences.left_pad(prompts, pad_id, "cpu")
    continuation = torch.randint(0, 40, (len(prompts), new_tokens), generator=torch.Generator().manual_seed(2))
    decoder = fast_decode.decoder(lm, query_mask, new_tokens)
    assert decoder is not None, fast_decode.refusal(lm)
    positions = (query_mask.cumsum(-1) - 1).clamp(min=0)
    inputs, logits, hidden = query, [], []
    for t in range(new_tokens):
        step_logits, step_hidden = decoder.step(inputs, positions)
        logits.append(step_logits)
        hidden.append(step_hidden)
        inputs, positions = continuation[:, t : t + 1], positions[:, -1:] + 1

    ids = torch.cat([query, continuation], 1)
    attention = torch.cat([query_mask, torch.ones_like(continuation)], 1)
    full = lm(
        input_ids=ids,
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        output_hidden_states=True,
    )
    # The position before each fed token predicts it: from the prompt's last to the second-to-last new one.
    at = slice(query.shape[1] - 1, ids.shape[1] - 1)
    logit_diff = (torch.stack(logits, 1) - full.logits[:, at]).abs().max().item()
    hidden_diff = (torch.stack(hidden, 1) - full.hidden_states[-1][:, at]).abs().max().item()
    return logit_diff, hidden_diff


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fast_decode_gives_the_logits_and_hidden_states_of_a_full_forward(tiny_model, lora):
    lm = with_lora(load(tiny_model)) if lora else load(tiny_model)
    if lora:  # the adapters matter: skipping them would show
        base = load(tiny_model)
        ids = torch.tensor([PROMPTS[1]])
        with torch.no_grad():
            assert (lm(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 0.1
    logit_diff, hidden_diff = decode_against_full_forward(lm, PROMPTS, 12, pad_id=1)
    assert logit_diff < 1e-4 and hidden_diff < 1e-4, (logit_diff, hidden_diff)


def test_layer_scaled_and_unscaled_attention_decode_exactly():
    lm = random_gpt2(scale_attn_by_inverse_layer_idx=True, scale_attn_weights=False)
    logit_diff, hidden_diff = decode_against_full_forward(lm, PROMPTS, 6, pad_id=0)
    assert logit_diff < 1e-4 and hidden_diff < 1e-4, (logit_diff, hidden_diff)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sample_draws_the_same_tokens_on_the_fast_and_the_generic_path(tiny_model, lora):
    lm = with_lora(load(tiny_model)) if lora else load(tiny_model)
    prompts = PROMPTS * 2

    def draw(fast: bool) -> sequences.Sampled:
        generator = torch.Generator().manual_seed(7)
        return sequences.sample(lm, prompts, 24, 0.9, {0}, 1, generator, with_hidden=True, fast=fast)

    generic = draw(False)
    # transformers installs (inert) output-capturing hooks on the first forward asking for hidden states;
    # they must not turn the fast path off.
    assert fast_decode.refusal(lm) is None
    fast = draw(True)
    assert torch.equal(fast.response, generic.response)
    assert torch.equal(fast.mask, generic.mask) and torch.equal(fast.ended, generic.ended)
    assert fast.response.shape[1] > 10  # enough steps to mean something
    torch.testing.assert_close(fast.logprobs, generic.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.hidden, generic.hidden, atol=1e-5, rtol=1e-5)
    # Both against one uncached forward over prompt + response: the log-probs of what was drawn.
    ids = torch.cat([fast.query, fast.response], 1)
    attention = torch.cat([fast.query_mask, torch.ones_like(fast.response)], 1)
    with torch.no_grad():
        logits = lm(
            input_ids=ids, attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0)
        ).logits
    logp = torch.log_softmax(logits[:, fast.query.shape[1] - 1 : -1] / 0.9, -1)
    expected = logp.gather(2, fast.response.unsqueeze(2)).squeeze(2) * fast.mask
    torch.testing.assert_close(fast.logprobs, expected, atol=1e-4, rtol=1e-4)


def test_the_fast_path_honours_autocast(tiny_model):
    lm = load(tiny_model)
    query, query_mask = sequences.left_pad(PROMPTS, 1, "cpu")
    positions = (query_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = fast_decode.decoder(lm, query_mask, 4)
        logits, hidden = decoder.step(query, positions)
        generic_logits, generic_hidden = sequences.ModelStep(lm, query_mask, True).step(query, positions)
    assert decoder.keys[0].dtype == torch.bfloat16  # the cache holds what autocast's projections give
    assert logits.dtype == generic_logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), generic_logits.float(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(hidden.float(), generic_hidden.float(), atol=0.05, rtol=0.02)


def test_an_architecture_it_does_not_implement_takes_the_generic_path(tiny_model, tmp_path):
    llama = load(tiny_local_model("llama", tmp_path / "llama", str(tiny_model)))
    assert "not a GPT2LMHeadModel" in fast_decode.refusal(llama)
    assert fast_decode.decoder(llama, torch.ones((1, 3), dtype=torch.long), 4) is None

    def draw(fast: bool) -> sequences.Sampled:
        return sequences.sample(llama, PROMPTS, 6, 1.0, {0}, 1, torch.Generator().manual_seed(3), fast=fast)

    assert torch.equal(draw(True).response, draw(False).response)


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda: random_gpt2(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
        (lambda: random_gpt2(add_cross_attention=True), "cross-attention"),
        (lambda: random_gpt2().train(), "dropout is on"),
        (lambda: hooked(random_gpt2()), "has forward hooks"),
        # The fast path computes plain Conv1D and LayerNorm layers without calling them, and the MLP inline.
        (lambda: hooked(random_gpt2(), lambda lm: lm.transformer.h[1].mlp.c_fc), "has forward hooks"),
        (lambda: hooked(random_gpt2(), lambda lm: lm.transformer.ln_f), "has forward hooks"),
        (lambda: mlp_dropout_on(random_gpt2()), "dropout is on"),
        (lambda: prompt_tuned(random_gpt2()), "prompt learning"),
    ],
    ids=[
        "upcast",
        "cross-attention",
        "dropout",
        "hook",
        "conv1d-hook",
        "layer-norm-hook",
        "mlp-dropout",
        "prompt-tuning",
    ],
)
def test_gpt2_settings_it_does_not_implement_are_refused(change, reason):
    assert reason in fast_decode.refusal(change())


def test_training_mode_without_dropout_qualifies():
    # The PPO trainer keeps its model in train mode with every dropout at 0.
    from rlhf.training.modeling import disable_dropout

    lm = random_gpt2().train()
    disable_dropout(lm)
    assert fast_decode.refusal(lm) is None


def hooked(lm, module=lambda lm: lm.transformer.h[0]):
    module(lm).register_forward_hook(lambda module, args, output: output * 2)
    return lm


def mlp_dropout_on(lm):
    from rlhf.training.modeling import disable_dropout

    lm.train()
    disable_dropout(lm)
    lm.transformer.h[0].mlp.dropout.p = 0.1
    return lm


def prompt_tuned(lm):
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(lm, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


def padded_batch():
    """Left-padded prompts followed by responses right-padded after their end (as PPO's passes see them)."""
    query, query_mask = sequences.left_pad(PROMPTS, 1, "cpu")
    response = torch.randint(2, 40, (len(PROMPTS), 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(response)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    ids = torch.cat([query, response], 1)
    attention = torch.cat([query_mask, mask], 1)
    return ids, attention, (attention.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_whole_sequence_hidden_states_and_their_gradients_match_the_models_forward(tiny_model, lora):
    from rlhf.training.modeling import disable_dropout

    lm = (with_lora(load(tiny_model)) if lora else load(tiny_model)).train()
    disable_dropout(lm)  # as the PPO trainer runs it: train mode, every dropout 0
    ids, attention, positions = padded_batch()
    keep = 8
    weights = torch.randn((keep, lm.config.n_embd), generator=torch.Generator().manual_seed(5))
    trainable = [p for p in lm.parameters() if p.requires_grad]

    def hidden_and_grads(fast: bool):
        if fast:
            hidden = fast_decode.final_hidden_states(lm, ids, attention, positions, keep)
        else:
            out = lm(input_ids=ids, attention_mask=attention, position_ids=positions, output_hidden_states=True)
            hidden = out.hidden_states[-1][:, -keep:]
        grads = torch.autograd.grad((hidden * weights).sum(), trainable)
        return hidden.detach(), grads

    hidden, grads = hidden_and_grads(True)
    expected, expected_grads = hidden_and_grads(False)
    # Every kept position, the masked ones after a response's end included (the value loss masks them).
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(expected_grads) > 0
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-4)


def test_disabled_adapters_give_the_base_models_hidden_states(tiny_model):
    # The PPO reference of a LoRA run is the same model under disable_adapter().
    lm = with_lora(load(tiny_model))
    ids, attention, positions = padded_batch()
    with torch.no_grad():
        with lm.disable_adapter():
            off = fast_decode.final_hidden_states(lm, ids, attention, positions)
        on = fast_decode.final_hidden_states(lm, ids, attention, positions)
        base = load(tiny_model)(
            input_ids=ids, attention_mask=attention, position_ids=positions, output_hidden_states=True
        )
    real = attention.cumsum(-1) > 0  # left padding, which nothing reads, is computed differently
    torch.testing.assert_close(off[real], base.hidden_states[-1][real], atol=1e-5, rtol=1e-5)
    assert (on - off)[real].abs().max() > 0.1


def test_gradient_checkpointing_takes_the_models_forward_when_gradients_are_on(tiny_model):
    from rlhf.training.modeling import disable_dropout, use_gradient_checkpointing

    lm = load(tiny_model)
    use_gradient_checkpointing(lm)
    lm.train()
    disable_dropout(lm)
    ids, attention, positions = padded_batch()
    assert "gradient checkpointing" in fast_decode.refusal(lm)
    assert fast_decode.final_hidden_states(lm, ids, attention, positions) is None
    with torch.no_grad():  # rollouts and the reference pass: nothing to checkpoint
        assert fast_decode.final_hidden_states(lm, ids, attention, positions) is not None


def reward_model(tiny_model):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).eval()
    assert model.config.pad_token_id is not None
    return model


def right_padded(pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of different lengths, right-padded as the scorer encodes them; one row holds the pad id inside its
    text (transformers then scores its rightmost other token) and one fills the whole width."""
    rows = [[5, 9, 13], [7, 8, 9, 10, 11, 12, 13, 14, 15], [20, pad_id, 21, pad_id], [30, 31, 32, 33, 34]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_reward_model_scores_on_the_fast_path_equal_its_forward(tiny_model, lora):
    model = reward_model(tiny_model)
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
        model = get_peft_model(model, config).eval()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.2)
    inputs = right_padded(model.config.pad_token_id)
    with torch.inference_mode():
        fast = fast_decode.sequence_classification_logits(model, inputs)
        theirs = model(**inputs).logits
    assert fast is not None and fast.shape == theirs.shape == (4, 1)
    torch.testing.assert_close(fast, theirs, atol=1e-5, rtol=1e-5)
    assert fast.std() > 0  # the rows score differently: a wrong pick or mask would show


def test_reward_models_the_fast_path_does_not_run_take_their_forward(tiny_model, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = reward_model(tiny_model)
    inputs = right_padded(model.config.pad_token_id)
    assert fast_decode.sequence_classification_logits(model, {**inputs, "token_type_ids": inputs["input_ids"]}) is None
    llama_dir = tiny_local_model("llama", tmp_path / "llama", str(tiny_model))
    llama = AutoModelForSequenceClassification.from_pretrained(llama_dir, num_labels=1).eval()
    assert "not a GPT2ForSequenceClassification" in fast_decode.refusal(llama, type(model))
    assert fast_decode.sequence_classification_logits(llama, inputs) is None
    # A causal LM is not a classifier, and a classifier is not what the decoder takes.
    assert fast_decode.sequence_classification_logits(load(tiny_model), inputs) is None
    assert "not a GPT2LMHeadModel" in fast_decode.refusal(model)
