"""Configuration shared by every server: where data lives, where the other services are, server limits.

Each field reads an environment variable (named in its comment) and may be overridden by a CLI flag.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

# The four gRPC services, and the REST gateway (gateway/: the seed's HTTP API over them).
DEFAULT_PORTS = {"feedback": 50051, "reward": 50052, "policy": 50053, "inference": 50054, "gateway": 8000}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


def data_dir_default() -> pathlib.Path:
    """RLHF_DATA_DIR, else ./.rlhf."""
    return pathlib.Path(env_str("RLHF_DATA_DIR", ".rlhf")).resolve()


def service_address(service: str) -> str:
    """Where clients reach `service`: RLHF_<SERVICE>_ADDR, else localhost on its port."""
    port = env_int(f"RLHF_{service.upper()}_PORT", DEFAULT_PORTS[service])
    return env_str(f"RLHF_{service.upper()}_ADDR", f"127.0.0.1:{port}")


@dataclasses.dataclass
class ServerConfig:
    """How one service's gRPC server runs; every service's config holds one."""

    # Which service this is: feedback, reward, policy or inference.
    service: str
    # Interface to bind (RLHF_HOST); 0.0.0.0 in containers.
    host: str = "127.0.0.1"
    # Port to bind (RLHF_<SERVICE>_PORT); 0 picks a free one (tests).
    port: int = 0
    # Root of databases, artifacts and caches (RLHF_DATA_DIR, default ./.rlhf).
    data_dir: pathlib.Path = dataclasses.field(default_factory=data_dir_default)
    # SQLAlchemy URL of the service's database (RLHF_<SERVICE>_DATABASE_URL); default SQLite in data_dir.
    database_url: str = ""
    # Largest message accepted or sent, in bytes (RLHF_MAX_MESSAGE_BYTES).
    max_message_bytes: int = 64 * 1024 * 1024
    # Seconds in-flight calls get to finish on shutdown.
    grace_seconds: float = 5.0

    @classmethod
    def from_env(cls, service: str, **overrides) -> ServerConfig:
        up = service.upper()
        values = dict(
            service=service,
            host=env_str("RLHF_HOST", "127.0.0.1"),
            port=env_int(f"RLHF_{up}_PORT", DEFAULT_PORTS[service]),
            data_dir=data_dir_default(),
            database_url=env_str(f"RLHF_{up}_DATABASE_URL", ""),
            max_message_bytes=env_int("RLHF_MAX_MESSAGE_BYTES", 64 * 1024 * 1024),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / f'{self.service}.db'}"

    @property
    def artifact_root(self) -> pathlib.Path:
        """Model artifacts: one immutable folder per version (RLHF_ARTIFACT_ROOT, default data_dir/artifacts)."""
        return pathlib.Path(env_str("RLHF_ARTIFACT_ROOT", str(self.data_dir / "artifacts"))).resolve()

    def grpc_options(self) -> list[tuple[str, int]]:
        # so_reuseport off: with it a second server (another data dir) could bind the same port and calls
        # would alternate between the two; now the second one fails to start.
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
