"""The feedback service's own Prometheus figures, read from its domain when scraped (rlhf.runtime.metrics)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from feedback_service.domain import FeedbackDomain

OUTCOMES = ("stored", "duplicate", "rejected")


class FeedbackCollector(Collector):
    """`rlhf_feedback_items_total{outcome}`: items acknowledged (SubmitFeedback and StreamFeedback) since the
    server started, its rate the ingestion rate; `rlhf_feedback_write_queue_depth`: writes waiting for or
    running in the writer thread (a growing queue: the database falls behind)."""

    def __init__(self, domain: FeedbackDomain) -> None:
        self._domain = domain

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        items = CounterMetricFamily(
            "rlhf_feedback_items", "Feedback items acknowledged, by outcome.", labels=["outcome"]
        )
        counts = self._domain.items.copy()
        for outcome in OUTCOMES:
            items.add_metric([outcome], counts.get(outcome, 0))
        yield items
        yield GaugeMetricFamily(
            "rlhf_feedback_write_queue_depth",
            "Database writes waiting for or running in the feedback writer thread.",
            value=self._domain.writes_waiting,
        )
