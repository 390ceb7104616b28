"""What users touch: typed clients of the four services (blocking and asyncio), the background feedback sender,
the `rlhf` command line, the demo and its simulated rater.

    from rlhf.sdk import FeedbackClient, AsyncFeedbackClient, FeedbackSender, SenderConfig

Names are imported on first use, so `import rlhf.sdk` (and the command line) stays light; none of this
package needs torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FeedbackClient": "rlhf.sdk.clients",
    "RewardClient": "rlhf.sdk.clients",
    "PolicyClient": "rlhf.sdk.clients",
    "InferenceClient": "rlhf.sdk.clients",
    "AsyncFeedbackClient": "rlhf.sdk.clients",
    "AsyncRewardClient": "rlhf.sdk.clients",
    "AsyncPolicyClient": "rlhf.sdk.clients",
    "AsyncInferenceClient": "rlhf.sdk.clients",
    "feedback_request": "rlhf.sdk.clients",
    "new_request_id": "rlhf.sdk.clients",
    "FeedbackSender": "rlhf.sdk.sender",
    "SenderConfig": "rlhf.sdk.sender",
    "SenderStats": "rlhf.sdk.sender",
    "SenderClosed": "rlhf.sdk.sender",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlhf.sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
