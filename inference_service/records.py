"""Plain data shared by the layers (no protobuf, no SQLAlchemy)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum


class FinishReason(enum.Enum):
    """Why generation stopped; values match the proto enum's numbers."""

    STOP = 1  # the model produced EOS
    LENGTH = 2  # max_new_tokens reached
    STOP_SEQUENCE = 3  # a stop sequence appeared (the text is cut before it)


@dataclasses.dataclass(frozen=True)
class Target:
    """One version of a deployment and its (unnormalised) share of traffic."""

    version: str
    weight: float


@dataclasses.dataclass(frozen=True)
class Deployment:
    agent_id: str
    targets: tuple[Target, ...]
    revision: int
    updated_at: dt.datetime | None
    # True when none was set and the agent's latest version serves.
    is_default: bool = False


@dataclasses.dataclass(frozen=True)
class ParamsInput:
    """Sampling parameters as requested; None means "use the default"."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclasses.dataclass(frozen=True)
class GenerateInput:
    agent_id: str
    prompt: str
    version: str = ""
    routing_key: str = ""
    params: ParamsInput = ParamsInput()


@dataclasses.dataclass(frozen=True)
class GenerationRecord:
    """One logged generation."""

    generation_id: str
    agent_id: str
    policy_version: str
    prompt: str
    text: str
    routing_key: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """A piece of streamed text; the last chunk has done=True and the logged record."""

    text: str
    generation_id: str
    policy_version: str
    done: bool = False
    record: GenerationRecord | None = None
