"""Configuration shared by every server: where data lives, where the other services are, server limits.

Each field reads an environment variable (named in its comment) and may be overridden by a CLI flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import uuid
from collections.abc import Callable

from rlhf.training.modeling import data_dir_default

# The four gRPC services, and the REST gateway (gateway/: the seed's HTTP API over them).
DEFAULT_PORTS = {"feedback": 50051, "reward": 50052, "policy": 50053, "inference": 50054, "gateway": 8000}
# The Prometheus ports compose gives each service (RLHF_<SERVICE>_METRICS_PORT); the gateway serves /metrics on
# its own HTTP port.
METRICS_PORTS = {"feedback": 9151, "reward": 9152, "policy": 9153, "inference": 9154}


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


def service_address(service: str) -> str:
    """Where clients reach `service`: RLHF_<SERVICE>_ADDR, else localhost on its port."""
    port = env_int(f"RLHF_{service.upper()}_PORT", DEFAULT_PORTS[service])
    return env_str(f"RLHF_{service.upper()}_ADDR", f"127.0.0.1:{port}")


def env_port(name: str) -> int | None:
    """An optional port: None when the variable is unset or empty."""
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else None


# gRPC's client-side load balancing policies a channel may use (RLHF_LOAD_BALANCING).
LOAD_BALANCING_POLICIES = ("round_robin", "pick_first")


def client_service_config() -> str:
    """The gRPC service config every channel of the platform opens with (SDK, CLI, gateway and the services' calls
    to each other): its load balancing policy is RLHF_LOAD_BALANCING, default "round_robin", which spreads calls
    over every address a service's name resolves to: a DNS name with one address per replica (compose's
    `deploy: replicas`, a headless Kubernetes service: "dns:///policy:50053") or a list
    ("ipv4:10.0.0.1:50053,10.0.0.2:50053"). "pick_first" keeps to one address. Names are resolved again when a
    connection fails, so replicas added later are found then."""
    policy = env_str("RLHF_LOAD_BALANCING", "round_robin").strip() or "round_robin"
    if policy not in LOAD_BALANCING_POLICIES:
        raise ValueError(f"RLHF_LOAD_BALANCING must be one of {', '.join(LOAD_BALANCING_POLICIES)}, not {policy!r}")
    return json.dumps({"loadBalancingConfig": [{policy: {}}]})


def env_flag(name: str, default: bool) -> bool:
    """A yes/no environment variable: 1, true, yes or on (any case) is yes; unset is `default`."""
    raw = os.environ.get(name, "").strip().lower()
    return raw in ("1", "true", "yes", "on") if raw else default


def _env_factory(name: str) -> Callable[[], str]:
    return lambda: env_str(name, "")


@dataclasses.dataclass
class SecurityConfig:
    """Tokens and TLS, for servers and clients alike (README "Security"). Every field defaults to its
    environment variable, so each process of a deployment (service, worker, CLI, gateway) reads the same."""

    # JSON file listing the accepted tokens, hashed (RLHF_AUTH_TOKENS_FILE): [{"sha256": "<hex>", "role":
    # "admin" | "agent", "agents": [...]}]. Empty: no tokens are checked and every call is allowed.
    tokens_file: str = dataclasses.field(default_factory=_env_factory("RLHF_AUTH_TOKENS_FILE"))
    # The bearer token this process sends (RLHF_TOKEN): a user's, or a service's own for its calls to others.
    token: str = dataclasses.field(default_factory=_env_factory("RLHF_TOKEN"))
    # PEM certificate chain and private key (RLHF_TLS_CERT_FILE, RLHF_TLS_KEY_FILE): a server serves TLS with
    # them; a client presents them as its client certificate when a CA is set too.
    cert_file: str = dataclasses.field(default_factory=_env_factory("RLHF_TLS_CERT_FILE"))
    key_file: str = dataclasses.field(default_factory=_env_factory("RLHF_TLS_KEY_FILE"))
    # PEM CA bundle (RLHF_TLS_CA_FILE): clients use TLS and trust it; servers check client certificates by it.
    ca_file: str = dataclasses.field(default_factory=_env_factory("RLHF_TLS_CA_FILE"))
    # Servers refuse clients without a certificate signed by ca_file (RLHF_TLS_REQUIRE_CLIENT_CERT=1).
    require_client_cert: bool = dataclasses.field(
        default_factory=lambda: env_flag("RLHF_TLS_REQUIRE_CLIENT_CERT", False)
    )
    # The name clients check the server's certificate against, when it differs from the address's host
    # (RLHF_TLS_SERVER_NAME).
    server_name: str = dataclasses.field(default_factory=_env_factory("RLHF_TLS_SERVER_NAME"))
    # Servers offer gRPC server reflection (RLHF_REFLECTION, default on; 0 switches it off).
    reflection: bool = dataclasses.field(default_factory=lambda: env_flag("RLHF_REFLECTION", True))

    @property
    def server_tls(self) -> bool:
        return bool(self.cert_file and self.key_file)

    @property
    def client_tls(self) -> bool:
        return bool(self.ca_file)


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
    # What the service does on meeting an older database schema (RLHF_DB_MIGRATE): "auto" upgrades it on start,
    # "check" refuses to start and says how to upgrade; empty: auto for SQLite, check for other databases.
    database_migrate: str = ""
    # Largest message accepted or sent, in bytes (RLHF_MAX_MESSAGE_BYTES).
    max_message_bytes: int = 64 * 1024 * 1024
    # Seconds in-flight calls get to finish on shutdown.
    grace_seconds: float = 5.0
    # Tokens, TLS and reflection (RLHF_AUTH_TOKENS_FILE, RLHF_TLS_*, RLHF_TOKEN, RLHF_REFLECTION).
    security: SecurityConfig = dataclasses.field(default_factory=SecurityConfig)
    # Port of the Prometheus endpoint, GET /metrics on `host` (RLHF_<SERVICE>_METRICS_PORT, compose: METRICS_PORTS);
    # 0 picks a free one (logged), None serves none: the RPC figures are still kept (RunningServer.metrics).
    metrics_port: int | None = None
    # This process's name among the service's replicas over one database (RLHF_REPLICA_ID); the jobs it runs carry
    # it as their owner. Each live replica needs its own. Empty: "embedded" on SQLite (one process per file, so a
    # restart marks its jobs INTERRUPTED at once), else "<host>-<random>", new in every process (a restarted
    # replica's old jobs are marked INTERRUPTED when their lease expires). Set it to a stable name (a pod's) to
    # have a restart interrupt its own jobs at once.
    replica_id: str = ""
    # Seconds a job's lease lasts (RLHF_JOB_LEASE_SECONDS, default 30): the owner renews it every third of that
    # (its heartbeat, which also picks up cancels asked of other replicas), and any replica marks a job whose
    # lease expired INTERRUPTED (its owner died). Replicas' clocks must agree to well within this.
    job_lease_seconds: float = 30.0

    @classmethod
    def from_env(cls, service: str, **overrides) -> ServerConfig:
        up = service.upper()
        values = dict(
            service=service,
            host=env_str("RLHF_HOST", "127.0.0.1"),
            port=env_int(f"RLHF_{up}_PORT", DEFAULT_PORTS[service]),
            data_dir=data_dir_default(),
            database_url=env_str(f"RLHF_{up}_DATABASE_URL", ""),
            database_migrate=env_str("RLHF_DB_MIGRATE", ""),
            max_message_bytes=env_int("RLHF_MAX_MESSAGE_BYTES", 64 * 1024 * 1024),
            metrics_port=env_port(f"RLHF_{up}_METRICS_PORT"),
            replica_id=env_str("RLHF_REPLICA_ID", ""),
            job_lease_seconds=float(env_str("RLHF_JOB_LEASE_SECONDS", "30")),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / f'{self.service}.db'}"

    def resolved_replica_id(self) -> str:
        """replica_id, or its default (see the field)."""
        if self.replica_id:
            return self.replica_id
        if self.resolved_database_url().startswith("sqlite"):
            return "embedded"
        return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"

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
