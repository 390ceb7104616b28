"""What the GPU paths decide, checked on the CPU (CI has no GPU; bench/bench_gpu.py runs them on one): the
serving dtype of inference, the attention backend set up for CUDA, and the memory estimate's CUDA branch."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
import torch

from inference_service.generation import SamplingParams, generate
from inference_service.models import ModelCache, load_for_inference
from policy_service.estimate import peak_memory
from rlhf.training.config import TrainingConfig
from rlhf.training.modeling import pick_device, serving_dtype
from rlhf.training.modelshape import describe_model


def test_serving_dtype_auto_keeps_float32_on_cpu_and_takes_explicit_choices():
    assert serving_dtype("auto", "cpu") == torch.float32
    assert serving_dtype("bf16", "cpu") == torch.bfloat16
    assert serving_dtype("fp16", "cuda") == torch.float16
    assert serving_dtype("float32", "cuda:1") == torch.float32
    with pytest.raises(ValueError, match="dtype must be auto, float32, bf16, fp16"):
        serving_dtype("int8", "cpu")


def test_inference_loads_and_generates_in_the_configured_dtype(tiny_model):
    loaded = load_for_inference(str(tiny_model), "cpu", "bf16")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    # Half the bytes of float32: the cache's byte limit sees what is really held.
    full = load_for_inference(str(tiny_model), "cpu", "float32")
    assert loaded.nbytes * 2 == full.nbytes
    result = generate(loaded, "How do I reset my password?", SamplingParams(max_new_tokens=8, seed=0))
    assert result.completion_tokens > 0

    cache = ModelCache(capacity=1, device="cpu", dtype="bf16")
    assert next(asyncio.run(cache.get(str(tiny_model))).model.parameters()).dtype == torch.bfloat16


def test_inference_service_refuses_an_unknown_dtype_at_start():
    done = subprocess.run(
        [sys.executable, "-m", "inference_service", "--port", "0", "--dtype", "int4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "--dtype / RLHF_INFERENCE_DTYPE must be auto, float32, bf16, fp16" in done.stderr
    assert "Traceback" not in done.stderr


def test_choosing_cuda_takes_cudnn_out_of_attention():
    # torch would send masked half-precision attention to cuDNN, which plans every new shape (bench_gpu.py:
    # bf16 generation 24 times slower on an H200); choosing a CUDA device turns that backend off.
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert pick_device("cpu") == "cpu"
        assert torch.backends.cuda.cudnn_sdp_enabled()
        assert pick_device("cuda:0") == "cuda:0"
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def test_memory_estimate_keeps_no_attention_scores_on_any_device(tiny_model):
    """torch's flash attention keeps one log-sum-exp per row for backward on CUDA and on CPUs alike, so the
    estimate counts no T x T attention scores anywhere (policy_service.estimate.peak_memory): in fp32 a CPU and
    a GPU run need the same, and the activations grow linearly with the sequence."""
    shape = describe_model(str(tiny_model))
    config = TrainingConfig(batch_size=8, mini_batch_size=8, max_new_tokens=128, device="cpu")
    on_cpu = peak_memory(shape, config, 32)
    assert peak_memory(shape, TrainingConfig(**{**config.__dict__, "device": "cuda"}), 32) == on_cpu
    # The activations kept for backward: 17 x width values per token and layer for every row (fp32).
    t = min(32 + 128, shape.context or 10**9)
    shorter = peak_memory(shape, config, 32 - 16)
    per_token = config.mini_batch_size * shape.layers * 17 * shape.width * 4
    per_token += (shape.layers + 1) * config.mini_batch_size * shape.width * 4  # what the value head reads
    assert t - 16 > 0 and on_cpu["training"] - shorter["training"] == pytest.approx(16 * per_token, rel=1e-6)
