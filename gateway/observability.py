"""The gateway's request ids, request log and Prometheus metrics (README "Metrics and logs").

Each HTTP request takes its id from the `X-Request-ID` header (or gets one), answers with it in the same header,
and the gRPC calls made for it carry it on (rlhf.runtime.requestids), so a request can be followed from the
gateway's log into the services'. One line per request on the `rlhf.requests` logger:

    http POST /api/policies/feedback/{agent_id} code=200 ms=4.1 agent=support-bot request_id=4f0c...

GET /metrics (on the gateway's own port) serves `http_server_requests_total{method,route,code}` and
`http_server_request_duration_seconds{method,route}`, the route being the API's path template.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from rlhf.runtime import requestids
from rlhf.runtime.metrics import LATENCY_BUCKETS

log = logging.getLogger("rlhf.requests")
_HEADER = requestids.METADATA_KEY.encode()


class GatewayMetrics:
    """The registry of one gateway app (several may run in one process) and its HTTP figures."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "http_server_requests",
            "HTTP requests answered, by method, route and status code.",
            ["method", "route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_server_request_duration_seconds",
            "Time to answer an HTTP request (event streams: until they end), by method and route.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    async def endpoint(self, _request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def _route(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"  # the template, not the path: bounded label values


class RequestObserver:
    """ASGI middleware: request id, one log line and the metrics of every HTTP request (see module doc)."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or ()).get(_HEADER, b"").decode("latin-1")
        request_id = sent if requestids.acceptable(sent) else requestids.new()
        status = {"code": 500}  # what the client gets when the app fails before answering

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), (_HEADER, request_id.encode())]
            await send(message)

        started = time.perf_counter()
        try:
            with requestids.bound(request_id):
                await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            method, route = scope["method"], _route(scope)
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
            self.metrics.latency.labels(method, route).observe(seconds)
            agent = (scope.get("path_params") or {}).get("agent_id") or "-"
            log.info(
                "http %s %s code=%d ms=%.1f agent=%s request_id=%s",
                method,
                route,
                status["code"],
                seconds * 1000,
                agent,
                request_id,
            )
