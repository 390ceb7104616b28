"""Choosing a version from a deployment's weighted targets.

With a routing key the choice is a pure function of (agent, key, deployment revision): the key is hashed
to a point in [0, 1) that falls into one target's share. So a user or session keeps its version while the
deployment is unchanged, and over many keys the shares match the weights. Without a key the point is
random. A new SetDeployment (new revision) reshuffles keys. Nothing else goes in, and each request reads the
deployment from the database, so every inference replica over one database routes a key alike.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from inference_service.records import Target


def key_point(agent_id: str, routing_key: str, revision: int) -> float:
    """A uniform, deterministic point in [0, 1) for this key under this deployment revision."""
    digest = hashlib.sha256(f"{agent_id}\x00{revision}\x00{routing_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def pick_version(targets: Sequence[Target], point: float) -> str:
    """The target whose cumulative weight share contains `point` (zero-weight targets get nothing)."""
    active = [t for t in targets if t.weight > 0]
    if not active:
        raise ValueError("a deployment needs a target with positive weight")
    threshold = point * sum(t.weight for t in active)
    cumulative = 0.0
    for target in active:
        cumulative += target.weight
        if threshold < cumulative:
            return target.version
    return active[-1].version  # rounding at the very top of the range


def route(
    agent_id: str, targets: Sequence[Target], revision: int, routing_key: str = "", rng: random.Random | None = None
) -> str:
    point = key_point(agent_id, routing_key, revision) if routing_key else (rng or random).random()
    return pick_version(targets, point)
