"""What the client install lacks: `pip install rlhf-platform` brings grpc, protobuf and rich (the clients, the
SDK and the command line); the services and training need the server extra. Commands that run services check
for it first, so a client-only install says what to install instead of failing somewhere inside."""

from __future__ import annotations

import importlib.util

INSTALL_SERVER = "pip install 'rlhf-platform[server]'"
# Modules of the server extra that the services import (a representative few: each package checked is one
# the client install never has).
SERVER_MODULES = ("torch", "transformers", "peft", "tokenizers", "sqlalchemy", "grpc_health", "grpc_reflection")


def require_server_extra() -> None:
    """Raise ModuleNotFoundError naming the first module of the server extra that is not installed."""
    for name in SERVER_MODULES:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def missing_extra_message(command: str, error: ModuleNotFoundError) -> str | None:
    """The line to show when `rlhf <command>` failed on a module the client install lacks (None when the
    missing module is one of the project's own: a broken install, not a missing extra)."""
    top = (error.name or "").split(".")[0]
    if not top or top == "rlhf" or top.endswith("_service"):
        return None
    return f"`rlhf {command}` needs the server extra, which is not installed (no module {top!r}): {INSTALL_SERVER}"
