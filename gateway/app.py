"""Start the REST gateway: `python -m gateway` or `rlhf serve all` (FastAPI on uvicorn)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from gateway.config import GatewayConfig
from gateway.errors import ApiError, from_rpc_error
from gateway.observability import GatewayMetrics, RequestObserver
from gateway.routes import Backends, router
from gateway.schemas import TrainIn, train_request
from rlhf.runtime.logs import setup_logging
from rlhf.runtime.tls import forwarding

log = logging.getLogger(__name__)
DESCRIPTION = """The seed's REST API over the platform's gRPC services: submit feedback, train a policy (or
estimate it), list an agent's policies; training jobs can also run asynchronously with a live event stream.

Errors are JSON: `{"error": name, "message": text, "fields": [{"field", "description"}]}`."""
HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed", 415: "unsupported_media_type"}


def check_operator_config(config: GatewayConfig) -> None:
    """Fail at start, not on the first request, when the configured training fields are wrong."""
    try:
        train_request(
            "check",
            TrainIn(),
            config.training_defaults,
            config.training_overrides,
            config.reward_model_config,
        )
    except ApiError as error:
        raise ValueError(f"gateway configuration: {error.message}") from None


def create_app(config: GatewayConfig) -> FastAPI:
    check_operator_config(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.backends = Backends.open(config)
        try:
            yield
        finally:
            await app.state.backends.close()
            log.info("stopped")

    app = FastAPI(title="RLHF platform REST API", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.include_router(router)
    app.add_middleware(ForwardToken)
    # Outermost: request ids, the request log and the metrics served at GET /metrics (gateway.observability).
    metrics = GatewayMetrics()
    app.add_middleware(RequestObserver, metrics=metrics)
    app.add_route("/metrics", metrics.endpoint, methods=["GET"], include_in_schema=False)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(grpc.RpcError)
    async def rpc_error(request: Request, error: grpc.RpcError) -> JSONResponse:
        return await api_error(request, from_rpc_error(error, config.retry_after_seconds))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
        fields = [_violation(item) for item in error.errors()]
        message = "; ".join(f"{f['field']}: {f['description']}" for f in fields)
        return JSONResponse({"error": "invalid_argument", "message": message, "fields": fields}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        name = HTTP_ERRORS.get(error.status_code, "http_error")
        return JSONResponse(
            {"error": name, "message": str(error.detail), "fields": []},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal(_request: Request, error: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        log.error("internal error (incident %s)", incident, exc_info=error)
        message = f"internal error in the gateway; its log has incident {incident}"
        return JSONResponse({"error": "internal", "message": message, "fields": []}, status_code=500)

    return app


def _violation(item: dict) -> dict[str, str]:
    """A pydantic error as {field, description}: the field's path without "body", "path" or "query"."""
    location = [str(part) for part in item.get("loc", ())]
    if location and location[0] in ("body", "path", "query", "header"):
        location = location[1:]
    if item.get("type") == "json_invalid":
        return {"field": "body", "description": f"is not valid JSON ({item.get('ctx', {}).get('error', '')})"}
    if item.get("type") == "extra_forbidden":
        return {"field": ".".join(location), "description": "is not a field of this request"}
    return {"field": ".".join(location) or "body", "description": str(item.get("msg", "is invalid"))}


class ForwardToken:
    """ASGI middleware: the services' calls made for a request carry that request's bearer token (or none),
    so the services' rules decide, and answer 401 or 403 (UNAUTHENTICATED, PERMISSION_DENIED) through here."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.strip().partition(" ")
        with forwarding(token.strip() if scheme.lower() == "bearer" else ""):
            await self.app(scope, receive, send)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (bound here, so that port 0 is known before serving and logged like the services)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise SystemExit(
                f"error: the gateway could not bind {host}:{port}: the port is already in use (another server?). "
                f"Stop that server or pick another port (--port or RLHF_GATEWAY_PORT)."
            ) from None
        raise SystemExit(f"error: the gateway could not bind {host}:{port}: {error.strerror}") from None
    sock.listen(2048)
    return sock


def serve(config: GatewayConfig) -> None:
    try:
        app = create_app(config)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    sock = bind(config.host, config.port)
    log.info("gateway service listening on %s:%d", config.host, sock.getsockname()[1])
    security = config.security
    tls: dict[str, Any] = {}
    if security.server_tls:  # HTTPS with the services' certificate settings (README "Security")
        tls = dict(
            ssl_certfile=security.cert_file, ssl_keyfile=security.key_file, ssl_ca_certs=security.ca_file or None
        )
        if security.require_client_cert:
            tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=5, server_header=False, access_log=False, **tls)
    )
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gateway", description="RLHF REST gateway: the seed's HTTP API")
    parser.add_argument("--host", help="interface to bind (env RLHF_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (env RLHF_GATEWAY_PORT, default 8000); 0 picks one")
    parser.add_argument("--feedback-addr", help="feedback service address (env RLHF_FEEDBACK_ADDR)")
    parser.add_argument("--policy-addr", help="policy service address (env RLHF_POLICY_ADDR)")
    args = parser.parse_args(argv)
    setup_logging("gateway")
    try:
        config = GatewayConfig.from_env(
            host=args.host, port=args.port, feedback_address=args.feedback_addr, policy_address=args.policy_addr
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    serve(config)
