"""Request validation: each check raises InvalidArgument naming the offending field."""

from __future__ import annotations

import math
from collections.abc import Sequence

from inference_service.config import InferenceServiceConfig
from inference_service.generation import SamplingParams
from inference_service.records import ParamsInput, Target
from rlhf.runtime import validation
from rlhf.runtime.errors import InvalidArgument

BASE = "base"
MAX_TARGETS = 64
MAX_ROUTING_KEY_CHARS = 256
MAX_GENERATION_ID_CHARS = 64


def request_version(value: str, field: str = "version") -> str:
    """A pinned version: "vN", "base", or "" / "latest" (follow the deployment / the newest version)."""
    return validation.version(value, field, allow=("", "latest", BASE))


def routing_key(value: str, field: str = "routing_key") -> str:
    if len(value) > MAX_ROUTING_KEY_CHARS:
        raise InvalidArgument(field, f"is {len(value)} characters; at most {MAX_ROUTING_KEY_CHARS} are allowed")
    return value


def sampling(params: ParamsInput, config: InferenceServiceConfig, field: str = "params") -> SamplingParams:
    """Defaults filled in and ranges checked; max_new_tokens above the server cap is clamped to it."""
    max_new = params.max_new_tokens
    if max_new is None:
        max_new = config.default_max_new_tokens
    elif max_new < 1:
        raise InvalidArgument(f"{field}.max_new_tokens", f"must be at least 1, got {max_new}")
    max_new = min(max_new, config.max_new_tokens_cap)

    temperature = 1.0 if params.temperature is None else params.temperature
    validation.number_in(temperature, f"{field}.temperature", 0.0, 100.0)

    top_k = 50 if params.top_k is None else params.top_k
    validation.int_in(top_k, f"{field}.top_k", 0, 1_000_000)

    top_p = 1.0 if params.top_p is None else params.top_p
    validation.number_in(top_p, f"{field}.top_p", 0.0, 1.0)
    if top_p == 0:
        raise InvalidArgument(f"{field}.top_p", "must be greater than 0 (1.0 disables nucleus sampling)")

    if len(params.stop) > config.max_stop_sequences:
        raise InvalidArgument(f"{field}.stop", f"at most {config.max_stop_sequences} stop sequences are allowed")
    for i, stop in enumerate(params.stop):
        if not stop:
            raise InvalidArgument(f"{field}.stop[{i}]", "must not be empty")
        if len(stop) > config.max_stop_chars:
            raise InvalidArgument(f"{field}.stop[{i}]", f"is longer than {config.max_stop_chars} characters")

    return SamplingParams(
        max_new_tokens=max_new,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        stop=tuple(params.stop),
        seed=params.seed,
    )


def targets(values: Sequence[Target], field: str = "targets") -> list[Target]:
    """At least one target; versions "vN" or "base", each once; weights finite, >= 0, summing to > 0."""
    if not values:
        raise InvalidArgument(field, "at least one target is required")
    if len(values) > MAX_TARGETS:
        raise InvalidArgument(field, f"at most {MAX_TARGETS} targets are allowed")
    seen: set[str] = set()
    for i, target in enumerate(values):
        if not target.version:
            raise InvalidArgument(f"{field}[{i}].version", "is required ('vN' or 'base')")
        validation.version(target.version, f"{field}[{i}].version", allow=(BASE,))
        if target.version in seen:
            raise InvalidArgument(f"{field}[{i}].version", f"'{target.version}' is listed more than once")
        seen.add(target.version)
        if not math.isfinite(target.weight) or target.weight < 0:
            raise InvalidArgument(f"{field}[{i}].weight", f"must be a finite number >= 0, got {target.weight}")
    total = sum(t.weight for t in values)
    if total <= 0:
        raise InvalidArgument(field, "the weights must sum to more than 0")
    if not math.isfinite(total):  # 1e308 + 1e308: routing by shares of an infinite sum sends all to one
        raise InvalidArgument(field, "the weights' sum overflows; weights are relative, use smaller numbers")
    return list(values)


def generation_id(value: str, field: str = "generation_id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_GENERATION_ID_CHARS:
        raise InvalidArgument(field, "is not an id returned by this service")
    return value
