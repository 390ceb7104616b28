"""A simulated human rater: a deterministic function of the response text with a learnable preference.

It likes answers about the sea: each distinct sea word raises the score with diminishing returns, and an
empty or run-on answer scores low. The demo, tests and benchmarks use it to stand in for people.
"""

from __future__ import annotations

import math
import re

from rlhf.training.corpus import TOPICS

PREFERRED_WORDS = frozenset(TOPICS["sea"]["noun"] + TOPICS["sea"]["adj"] + ["sailed", "swam"])
_WORD = re.compile(r"[a-z]+")


def rate(response: str) -> float:
    """Score in [0, 1]: 1 - exp(-hits / 2) where hits counts sea words (at most 6), less a length penalty."""
    words = _WORD.findall(response.lower())
    if not words:
        return 0.0
    hits = min(6, sum(1 for w in words if w in PREFERRED_WORDS))
    score = 1.0 - math.exp(-hits / 2.0)
    if len(words) > 60:  # rambling answers lose a little
        score *= 0.8
    return round(max(0.0, min(1.0, score)), 6)


def prefer(first: str, second: str) -> int:
    """0 if `first` is preferred, 1 if `second` (ties go to the shorter answer)."""
    a, b = rate(first), rate(second)
    if a != b:
        return 0 if a > b else 1
    return 0 if len(first) <= len(second) else 1
