"""Server bootstrap shared by the four services: grpc.aio server, health, reflection, limits, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rlhf.runtime.auth import Authorization, TokenStore
from rlhf.runtime.config import ServerConfig
from rlhf.runtime.decoding import LenientDecoding
from rlhf.runtime.interceptors import RequestLog
from rlhf.runtime.metrics import ServerMetrics
from rlhf.runtime.tls import server_credentials

log = logging.getLogger(__name__)


class PortInUse(RuntimeError):
    """The server's address is taken; the message says how to pick another."""


@dataclasses.dataclass
class ServiceBinding:
    """One gRPC service to host: its full name, servicer, and generated `add_*_to_server` function."""

    full_name: str
    servicer: object
    add_to_server: Callable[[object, grpc.aio.Server], None]


@dataclasses.dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    bindings: list[ServiceBinding]
    on_stop: list[Callable[[], Awaitable[None]]] = dataclasses.field(default_factory=list)
    # The service's domain object, for tests and in-process callers.
    domain: object = None
    # Its Prometheus registry (RPC figures; the app adds its collectors), and where /metrics is served (0: not).
    metrics: ServerMetrics = dataclasses.field(default_factory=ServerMetrics)
    metrics_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let in-flight calls finish for `grace` seconds, then run the cleanups."""
        for binding in self.bindings:
            await self.health.set(binding.full_name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        self.metrics.close()
        for cleanup in self.on_stop:
            await cleanup()


async def start_server(config: ServerConfig, bindings: list[ServiceBinding]) -> RunningServer:
    """Start serving `bindings` on config.host:config.port (0 picks a free port) with health and reflection."""
    # Undecodable request bytes: INVALID_ARGUMENT naming the field, not UNKNOWN (rlhf.runtime.decoding).
    # Tokens first (rlhf.runtime.auth), when configured: an unauthenticated call learns nothing else.
    security = config.security
    interceptors: list[grpc.aio.ServerInterceptor] = [LenientDecoding()]
    if security.tokens_file:
        interceptors.insert(0, Authorization(TokenStore.load(security.tokens_file), str(config.artifact_root)))
    # Outermost: request ids, the request log and RPC metrics see every call, refused ones included.
    metrics = ServerMetrics()
    interceptors.insert(0, RequestLog(metrics))
    credentials = server_credentials(security)  # None: plaintext
    server = grpc.aio.server(options=config.grpc_options(), interceptors=interceptors)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for binding in bindings:
        binding.add_to_server(binding.servicer, server)
    names = [b.full_name for b in bindings]
    if security.reflection:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        if credentials is None:
            port = server.add_insecure_port(f"{config.host}:{config.port}")
        else:
            port = server.add_secure_port(f"{config.host}:{config.port}", credentials)
    except RuntimeError:
        port = 0  # some grpc versions raise instead of returning 0
    if port == 0:
        raise PortInUse(
            f"the {config.service} service could not bind {config.host}:{config.port}: the port is "
            f"already in use (another server?). Stop that server or pick another port "
            f"(--port or RLHF_{config.service.upper()}_PORT)."
        )
    metrics_port = 0
    if config.metrics_port is not None:
        try:
            metrics_port = metrics.serve(config.host, config.metrics_port)
        except OSError as error:
            await server.stop(None)
            raise PortInUse(
                f"the {config.service} service could not serve metrics on {config.host}:{config.metrics_port} "
                f"({error.strerror}). Stop what holds it or pick another port (RLHF_{config.service.upper()}"
                f"_METRICS_PORT or --metrics-port; empty: no metrics endpoint)."
            ) from None
        log.info("%s service metrics on http://%s:%d/metrics", config.service, config.host, metrics_port)
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if credentials is not None or security.tokens_file:
        log.info(
            "%s service security: %s, %s",
            config.service,
            "TLS" if credentials is not None else "plaintext",
            "bearer tokens required" if security.tokens_file else "no tokens",
        )
    log.info("%s service listening on %s:%d", config.service, config.host, port)
    return RunningServer(
        server=server, port=port, health=health_servicer, bindings=bindings, metrics=metrics, metrics_port=metrics_port
    )


async def serve_until_signal(
    running: RunningServer, grace: float, when_handled: Callable[[], None] | None = None
) -> None:
    """Block until SIGINT or SIGTERM, then shut down gracefully. `when_handled` runs once the signals are
    handled (work done before would delay the handlers, and a signal meanwhile would kill the process
    without its graceful shutdown)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if when_handled is not None:
        when_handled()
    await stop.wait()
    log.info("shutting down (grace %.1fs)", grace)
    await running.stop(grace)
    log.info("stopped")
