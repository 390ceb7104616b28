"""Configuration of the feedback service: the shared server settings plus this service's own limits."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from rlhf.runtime.config import ServerConfig


@dataclasses.dataclass
class FeedbackServiceConfig:
    """Everything the feedback service needs; each own field reads RLHF_FEEDBACK_<FIELD> from the environment."""

    # Host, port, data dir, database URL and message limits shared by every service.
    server: ServerConfig
    # Longest prompt, response, chosen, rejected or notes, in characters (RLHF_FEEDBACK_MAX_TEXT_CHARS).
    max_text_chars: int = 20_000
    # Longest request_id, run_id, generation_id or policy_version, in characters.
    max_id_chars: int = 128
    # Most metadata entries per item (RLHF_FEEDBACK_MAX_METADATA_ENTRIES).
    max_metadata_entries: int = 64
    # Most metadata bytes per item, keys plus values in UTF-8 (RLHF_FEEDBACK_MAX_METADATA_BYTES).
    max_metadata_bytes: int = 16_384
    # A stream commits at most this many items in one transaction (RLHF_FEEDBACK_STREAM_GROUP_SIZE).
    stream_group_size: int = 256
    # ...and waits at most this long for a group to fill before committing what it has.
    stream_group_wait_ms: float = 5.0
    # Items a stream may hold read but not yet committed (plus the items of the one message being read: a
    # batch is taken whole); beyond it reading pauses, and HTTP/2 flow control slows the client down, so a
    # fast client cannot exhaust the server's memory.
    stream_max_buffered: int = 1024
    # Rows per ExportFeedback message (RLHF_FEEDBACK_EXPORT_CHUNK_SIZE).
    export_chunk_size: int = 500
    # Most bytes of rows in one ListFeedback page or ExportFeedback message (RLHF_FEEDBACK_MAX_PAGE_BYTES): a
    # page of large rows ends early (its next_page_token, or the export's next message, goes on), so no answer
    # exceeds the message size limit. Capped at half of server.max_message_bytes.
    max_page_bytes: int = 16 * 1024 * 1024
    # Most ids one DeleteFeedback request may name.
    max_delete_ids: int = 10_000
    # Inference service address for attribution (RLHF_FEEDBACK_INFERENCE_ADDRESS): feedback citing a
    # generation_id without a policy_version gets the version from GetGeneration. Empty: no attribution.
    inference_address: str = ""

    @classmethod
    def from_env(cls, **overrides: Any) -> FeedbackServiceConfig:
        """Defaults < environment < `overrides` (None values are ignored, so unset CLI flags fall through).

        `server=` gives a whole ServerConfig; host, port, data_dir, database_url, ... go to ServerConfig.from_env.
        """
        overrides = {k: v for k, v in overrides.items() if v is not None}
        own_names = {f.name for f in dataclasses.fields(cls)} - {"server"}
        own = {k: overrides.pop(k) for k in list(overrides) if k in own_names}
        server = overrides.pop("server", None)
        if server is None:
            server = ServerConfig.from_env("feedback", **overrides)
        elif overrides:
            server = dataclasses.replace(server, **overrides)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name == "server":
                continue
            raw = os.environ.get(f"RLHF_FEEDBACK_{field.name.upper()}")
            if raw:
                default: Any = field.default  # own fields are int, float or str; the default says which
                values[field.name] = type(default)(raw)
        values.update(own)
        return cls(server=server, **values)

    @property
    def page_bytes(self) -> int:
        """The byte budget of one page or export message (see max_page_bytes)."""
        return max(1, min(self.max_page_bytes, self.server.max_message_bytes // 2))
