"""Where models come from and where they run: the tiny default, local folders or hub ids; device and dtype."""

from __future__ import annotations

import logging
import os
import pathlib
import threading

from rlhf.training.errors import ModelLoadError

log = logging.getLogger(__name__)

# The name that stands for the project's own tiny model (built on first use, see rlhf.training.tinymodel).
TINY_MODEL = "rlhf-tiny"


def data_dir_default() -> pathlib.Path:
    """RLHF_DATA_DIR, else ./.rlhf: where models are built and cached (the services keep their data there too)."""
    return pathlib.Path(os.environ.get("RLHF_DATA_DIR", ".rlhf")).resolve()


def resolve_model(name: str | None, data_dir: pathlib.Path) -> str:
    """A path or hub id for from_pretrained; "" or "rlhf-tiny" builds/uses the tiny model in data_dir."""
    if not name or name == TINY_MODEL:
        from rlhf.training.tinymodel import ensure_tiny_model

        return str(ensure_tiny_model(data_dir))
    return name


def pick_device(preference: str = "auto") -> str:
    """ "auto" picks cuda, then mps, then cpu; anything else is used as given (e.g. "cuda:1").
    Every model here is placed through this, so it also sets up CUDA when that is the choice."""
    import torch

    if preference and preference != "auto":
        device = preference
    elif torch.cuda.is_available():
        device = "cuda"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = "mps"
    else:
        device = "cpu"
    if device.startswith("cuda"):
        # torch sends masked half-precision attention to cuDNN first on Hopper and newer cards, and cuDNN
        # builds a plan for every new shape (~60 ms): with a KV cache growing by one token per step that
        # made bf16 generation on an H200 24 times slower than fp32 (bench/bench_gpu.py). The flash and
        # memory-efficient kernels need no plan.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def autocast_dtype(mixed_precision: str, device: str):
    """The autocast dtype for "fp16"/"bf16" on a GPU, else None (full precision; CPUs stay fp32)."""
    import torch

    if device.startswith("cpu") or mixed_precision in ("", "no", None):
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


# Names accepted for a serving dtype (inference and scoring): "auto" or one of these.
SERVING_DTYPES = ("float32", "bf16", "fp16")


def serving_dtype(name: str, device: str):
    """The dtype a model is served in (generation, reward scoring) on `device`: "float32", "bf16" or "fp16"
    as given; "auto" keeps float32 on CPUs and MPS (their half-precision kernels are slower or missing) and
    uses bf16 on a CUDA card that has it, else fp16 (half the memory and memory traffic of fp32; sampled
    text differs from fp32's at the same seed)."""
    import torch

    if name not in ("auto", *SERVING_DTYPES):
        raise ValueError(f"dtype must be auto, {', '.join(SERVING_DTYPES)}; got {name!r}")
    if name == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_tokenizer(path: str, padding_side: str = "left"):
    """AutoTokenizer with a pad token (eos stands in when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 - the message tells the user what to do
        raise ModelLoadError(
            f"could not load tokenizer '{path}': {error}. Pass a local model folder (no model hub is "
            f"reachable here) or '{TINY_MODEL}'.",
            path,
        ) from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


# transformers' from_pretrained patches process-wide state while it runs (PreTrainedModel.tie_weights is
# swapped for a stub and put back): two loads in two threads of one process could leave the stub in place
# for good, after which every model loaded had an uninitialised (meta) LM head and a reward or inference
# server answered INTERNAL. One load at a time per process.
_LOADING = threading.Lock()


def load_model(loader, path: str, **kwargs):
    """`loader.from_pretrained(path)` with a clear error when the model can't be found or read; one load at
    a time in this process (see _LOADING)."""
    try:
        with _LOADING:
            return loader.from_pretrained(path, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(
            f"could not load model '{path}': {error}. Pass a local model folder (no model hub is "
            f"reachable here) or '{TINY_MODEL}'.",
            path,
        ) from error


def disable_dropout(model) -> None:
    """Every dropout layer of `model` off (p = 0), LoRA's included when called after peft wraps it."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def add_lora(model, config, task_type: str):
    """`model` wrapped with LoRA adapters as `config` (a ModelTrainingConfig) asks; task_type is peft's
    ("CAUSAL_LM" for policies, "SEQ_CLS" for reward models)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        model,
        LoraConfig(
            task_type=task_type,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules or None,
        ),
    )


def store_frozen_matrices(model, dtype) -> list[str]:
    """Store the frozen weights and biases of `model`'s linear layers (nn.Linear, transformers' Conv1D) in
    `dtype`, the autocast dtype (fp16/bf16), and return their names.

    Under autocast every matmul casts its fp32 operands to that dtype anyway, so the layers compute exactly the
    same (the cast is the same rounding, done once instead of per call). What it saves, for LoRA on a GPU: half
    the frozen weights' memory, and the per-call copies, since autograd keeps each call's cast weight for the
    backward pass (autocast caches casts only of weights that require grad). On GPT-2 124M in bf16 those copies
    made LoRA's peak larger than in fp32 (bench/bench_gpu.py). Weights shared with an embedding (a tied LM
    head) stay as they are: the embedding lookup is not autocast. Afterwards every forward pass must run under
    autocast(dtype), and a merge must start from the checkpoint's own weights (PPOTrainer.save reloads them)."""
    import torch
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    stored = []
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)) or id(module.weight) in embeddings:
            continue
        for name in ("weight", "bias"):
            parameter = getattr(module, name, None)
            if parameter is None or parameter.requires_grad or not parameter.is_floating_point():
                continue
            with torch.no_grad():
                parameter.data = parameter.data.to(dtype)
            stored.append(f"{module_name}.{name}")
    return stored


def fuse_activations(model) -> int:
    """Swap transformers' tanh-approximated GELU modules written as Python arithmetic (NewGELUActivation,
    "gelu_new", GPT-2's; FastGELUActivation) for GELUTanh, torch's single kernel of the same formula (which
    transformers documents as their faster equivalent; results agree to float rounding). Each composed one
    runs about seven elementwise operations and keeps most of their outputs for the backward pass: at the
    seed's PPO settings they held about a third of a GPT-2 step's activation memory. The saved model's config
    is unchanged. Returns how many modules were swapped."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(parent, name, GELUTanh())
                swapped += 1
    return swapped


def use_gradient_checkpointing(lm) -> bool:
    """Recompute `lm`'s activations in the backward pass instead of keeping them. Non-reentrant: correct with
    frozen weights and no_grad passes around it. The embeddings' output requires grad so that LoRA adapters,
    whose inputs come from frozen layers, still get gradients through recomputed blocks. False (with a
    warning) where the architecture does not support it."""
    if not getattr(lm, "supports_gradient_checkpointing", False):
        log.warning("%s does not support gradient checkpointing; training without it", type(lm).__name__)
        return False
    if hasattr(lm, "activation_checkpointing_enable"):  # the newer name in transformers 5; the old one warns
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.enable_input_require_grads()
    return True
