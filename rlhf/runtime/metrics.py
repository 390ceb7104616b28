"""Prometheus metrics of one server: its own registry (several servers may share a process, as in the tests),
the RPC figures the request interceptor records (rlhf.runtime.interceptors), a service's collectors that read
its state when scraped (rlhf.runtime.collectors, feedback_service.metrics), and the HTTP endpoint serving them
(GET /metrics on the server's metrics_port; README "Metrics and logs")."""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Seconds: from a health check (well under a millisecond) to a training request that checks a model (seconds);
# a stream (WatchTrainingJob) counts until it ends and lands in the last buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


def split_method(full_method: str) -> tuple[str, str]:
    """("rlhf.feedback.v1.FeedbackService", "SubmitFeedback") of "/rlhf.feedback.v1.FeedbackService/SubmitFeedback"."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


class ServerMetrics:
    """The registry of one server and its RPC figures, named as go-grpc-prometheus names them (grpc_service,
    grpc_method, grpc_code labels) so that existing dashboards read them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to its status (streams: until they end), by method.",
            ["grpc_service", "grpc_method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._http: Any = None
        self._thread: threading.Thread | None = None

    def observe_rpc(self, full_method: str, code: str, seconds: float) -> None:
        service, method = split_method(full_method)
        self.handled.labels(service, method, code).inc()
        self.latency.labels(service, method).observe(seconds)

    def add(self, *collectors: Collector) -> None:
        """Collectors of the service's own figures, read at each scrape."""
        for collector in collectors:
            self.registry.register(collector)

    def text(self) -> str:
        """The exposition a scrape gets."""
        return generate_latest(self.registry).decode()

    def serve(self, host: str, port: int) -> int:
        """Serve GET /metrics on host:port (0: a free port) in a thread; the bound port. OSError when taken."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
