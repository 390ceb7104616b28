"""Loaded (tokenizer, causal LM) pairs for generation, kept in the shared model cache."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from rlhf.training.modelcache import ModelCache as SharedModelCache
from rlhf.training.modelcache import parameter_bytes
from rlhf.training.modeling import fuse_activations, load_model, load_tokenizer, pick_device, serving_dtype


@dataclasses.dataclass
class LoadedModel:
    path: str
    tokenizer: Any
    model: Any
    device: str
    # Parameter and buffer bytes, for the cache's optional byte limit.
    nbytes: int
    # Its generation engine (inference_service.engine.engine_for), made on first use.
    engine: Any = None
    # Intra-op CPU threads each thread generating with it uses (rlhf.training.threads.serving_threads; None
    # on GPUs).
    cpu_threads: int | None = None


def load_for_inference(path: str, device: str, dtype: str = "auto") -> LoadedModel:
    """Blocking: tokenizer and causal LM from `path`, in eval mode on `device` in `dtype` (see
    rlhf.training.modeling.serving_dtype: "auto" is float32 on CPUs, bf16/fp16 on CUDA)."""
    from transformers import AutoModelForCausalLM

    from rlhf.training.threads import serving_threads

    device = pick_device(device)
    tokenizer = load_tokenizer(path, padding_side="left")
    model = load_model(AutoModelForCausalLM, path)
    model.to(device=device, dtype=serving_dtype(dtype, device)).eval()
    fuse_activations(model)  # GPT-2's GELU as one kernel instead of seven (the same formula)
    return LoadedModel(
        path=path,
        tokenizer=tokenizer,
        model=model,
        device=device,
        nbytes=parameter_bytes([model]),
        cpu_threads=serving_threads(model, device),
    )


class ModelCache(SharedModelCache[LoadedModel]):
    """The shared cache (rlhf.training.modelcache) loading causal LMs for generation on one device."""

    def __init__(
        self,
        capacity: int = 4,
        device: str = "auto",
        max_bytes: int = 0,
        loader: Callable[..., LoadedModel] = load_for_inference,
        dtype: str = "auto",
    ) -> None:
        self.device = pick_device(device)
        self.dtype = dtype
        super().__init__(
            lambda path: loader(path, self.device, self.dtype),
            capacity=capacity,
            max_bytes=max_bytes,
            size_of=lambda loaded: loaded.nbytes,
        )
