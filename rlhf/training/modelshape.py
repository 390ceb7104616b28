"""What sizing a run needs to know about a model, read without loading (or downloading) its weights: its
shape (ModelShape: parameters, layers, width, vocabulary, dtype), whether it can be loaded at all, and which
kind of device a run uses."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import struct

from rlhf.training.errors import ModelLoadError
from rlhf.training.modeling import TINY_MODEL

# Files a local model folder needs: one of each group.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# Bytes per weight for the dtype names config.json and safetensors use.
DTYPE_BYTES = {
    "float32": 4,
    "float": 4,
    "F32": 4,
    "float16": 2,
    "half": 2,
    "F16": 2,
    "bfloat16": 2,
    "BF16": 2,
    "float64": 8,
    "F64": 8,
}


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What sizing a run needs to know about a model, read without loading its weights (config.json and the
    safetensors headers of a local folder, the hub's config.json for a hub id)."""

    name: str
    parameters: int
    # True when counted from the weight files' headers, False when computed from the config.
    exact: bool
    layers: int
    width: int  # hidden size
    heads: int
    vocab: int
    context: int | None
    # Bytes per weight as loaded: transformers loads a checkpoint in its own dtype (dtype="auto").
    weight_bytes: int
    model_type: str
    # Output widths of the modules LoRA adapts by default (peft's choice for the architecture), per layer.
    lora_module_outputs: tuple[int, ...]


# Where a config says the model's context window, in the order they are asked.
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


def _first(config: dict, *keys: str, default=None):
    for key in keys:
        value = config.get(key)
        if value is not None:
            return value
    return default


def shape_from_config(name: str, config: dict, parameters: int | None = None, weight_bytes: int | None = None):
    """A ModelShape from a config.json dict; the parameter count from the config when not given."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    config = {**config, **(text or {})}
    width = int(_first(config, "n_embd", "hidden_size", "d_model", default=0) or 0)
    layers = int(_first(config, "n_layer", "num_hidden_layers", "num_layers", default=0) or 0)
    heads = int(_first(config, "n_head", "num_attention_heads", default=1) or 1)
    vocab = int(config.get("vocab_size") or 0)
    if not width or not layers or not vocab:
        raise ModelLoadError(
            f"the config of model '{name}' does not say its width, layers and vocabulary (n_embd/hidden_size, "
            f"n_layer/num_hidden_layers, vocab_size); pass a folder of a causal language model or '{TINY_MODEL}'",
            name,
        )
    context = _first(config, *CONTEXT_KEYS)
    context = int(context) if isinstance(context, int) and context > 0 else None
    ffn = int(_first(config, "n_inner", "intermediate_size", "ffn_dim", default=0) or 4 * width)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    kv_width = width * kv_heads // max(1, heads)
    gated = "intermediate_size" in config and config.get("model_type") not in ("gpt2", "gpt_neox", "gptj", "opt")
    if parameters is None:
        attention = 2 * width * width + 2 * width * kv_width
        mlp = (3 if gated else 2) * width * ffn
        embeddings = vocab * width * (1 if config.get("tie_word_embeddings", True) else 2)
        positions = width * context if config.get("model_type") == "gpt2" and context else 0
        parameters = layers * (attention + mlp + 4 * width) + embeddings + positions
    dtype = _first(config, "dtype", "torch_dtype")
    if weight_bytes is None:
        weight_bytes = DTYPE_BYTES.get(str(dtype), 4)
    model_type = str(config.get("model_type") or "")
    # peft's defaults: GPT-2's fused c_attn (width -> 3 x width); q_proj and v_proj elsewhere.
    lora_outputs = (3 * width,) if model_type == "gpt2" else (width, kv_width)
    return ModelShape(
        name, int(parameters), False, layers, width, heads, vocab, context, int(weight_bytes), model_type, lora_outputs
    )


def _safetensors_header(path: pathlib.Path) -> dict:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(size))


def count_parameters(folder: pathlib.Path) -> tuple[int, int] | None:
    """(parameters, bytes per weight of the largest tensor) from the safetensors headers of a folder (a few
    kilobytes read; no weights), or None when the folder has no safetensors weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    total, largest, dtype = 0, 0, "F32"
    for file in files:
        for key, entry in _safetensors_header(folder / file).items():
            if key == "__metadata__":
                continue
            count = math.prod(entry["shape"])
            total += count
            if count > largest:
                largest, dtype = count, entry["dtype"]
    return total, DTYPE_BYTES.get(dtype, 4)


def describe_model(name: str, data_dir: pathlib.Path | None = None) -> ModelShape:
    """The shape of `name` without loading weights or downloading them, or ModelLoadError saying what to do.

    "" / "rlhf-tiny": the built tiny model's config (or its recipe when it is not built yet). A local folder:
    its config.json must load with transformers' AutoConfig, and a weights file and a tokenizer file must be
    there. Anything else is a hub id: AutoConfig fetches its config.json only (fails at once offline, e.g.
    with HF_HUB_OFFLINE=1). Blocking (disk, maybe network): call it from a thread in a server."""
    if not name or name == TINY_MODEL:
        from rlhf.training import tinymodel

        folder = tinymodel.tiny_model_dir(data_dir or pathlib.Path("."))
        if (folder / "build_info.json").is_file():
            return _describe_folder(TINY_MODEL, folder)
        return shape_from_config(TINY_MODEL, tinymodel.TINY_CONFIG, parameters=tinymodel.TINY_PARAMETERS)
    what_to_do = f"Pass a local model folder (no model hub is reachable here) or '{TINY_MODEL}'."
    folder = pathlib.Path(name).expanduser()
    if folder.is_dir():
        return _describe_folder(name, folder)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a hub id (org/name)
        raise ModelLoadError(f"could not load model '{name}': no such folder. {what_to_do}", name)
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name)
    except Exception as error:  # noqa: BLE001 - the message tells the user what to do
        raise ModelLoadError(
            f"could not load model '{name}': it is not a local folder and its config could not be fetched from a "
            f"model hub ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). {what_to_do}",
            name,
        ) from error
    return shape_from_config(name, config.to_dict())


def _describe_folder(name: str, folder: pathlib.Path) -> ModelShape:
    what_to_do = f"Pass a folder saved by save_pretrained (model and tokenizer) or '{TINY_MODEL}'."
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any((folder / f).is_file() for f in WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        missing.append("weights (" + " or ".join(WEIGHT_FILES[::2]) + ")")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        missing.append("a tokenizer (" + " or ".join(TOKENIZER_FILES[:3]) + ")")
    if missing:
        message = f"could not load model '{name}': the folder has no {', no '.join(missing)}. {what_to_do}"
        raise ModelLoadError(message, name)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        message = f"could not load model '{name}': config.json is not readable ({error}). {what_to_do}"
        raise ModelLoadError(message, name) from error
    if name != TINY_MODEL:
        try:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(str(folder))
        except Exception as error:  # noqa: BLE001
            raise ModelLoadError(f"could not load model '{name}': {error}. {what_to_do}", name) from error
    counted = count_parameters(folder)
    if counted is None:
        return shape_from_config(name, config)
    shape = shape_from_config(name, config, parameters=counted[0])
    dtype = _first(config, "dtype", "torch_dtype")
    weight_bytes = DTYPE_BYTES.get(str(dtype), counted[1]) if dtype else counted[1]
    return dataclasses.replace(shape, exact=True, weight_bytes=weight_bytes)


def device_kind(device: str) -> str:
    """Which hardware a device string runs on, for telling runs apart: "cpu (N cores)", "cuda: <GPU name>",
    "mps". Timings from one kind say nothing about another. ValueError when this machine has no such device."""
    if device.startswith("cpu"):
        return f"cpu ({os.cpu_count()} cores)"
    import torch

    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise ValueError(f"'{device}' is not a device of this machine ({count} CUDA devices); use 'auto' or 'cpu'")
        return f"cuda: {torch.cuda.get_device_name(index)}"
    if device.startswith("mps"):
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"'{device}' is not available on this machine; use 'auto' or 'cpu'")
        return "mps"
    return f"cpu ({os.cpu_count()} cores)"
