"""Collectors that read a service's state when Prometheus scrapes it (rlhf.runtime.metrics): the jobs in the
job store by state, the latest step figures of running policy jobs, the models a cache holds in memory.

Reading at scrape time keeps the figures true whichever replica or process changed them, and keeps the code
that does the work free of metrics calls. Collectors run in the metrics endpoint's thread: they only read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from rlhf.runtime.jobs import QUEUED, RUNNING, TERMINAL, JobStore
from rlhf.training.modelcache import ModelCache, parameter_bytes

log = logging.getLogger(__name__)

STATES = (QUEUED, RUNNING, *TERMINAL)
# The progress metrics a training worker reports each step (rlhf.training.ppo_trainer, trl_trainers): the step's
# seconds, and the seconds of it spent waiting for the reward service (PPO's name, then TRL's).
STEP_SECONDS = "time/step_s"
REWARD_WAIT_SECONDS = ("time/score_wait_s", "time/score_s")


class JobsCollector(Collector):
    """`rlhf_training_jobs{kind,state}`: the jobs in the store by state; for running jobs that report steps,
    `rlhf_training_step_seconds` and `rlhf_training_reward_wait_ratio` of their latest step and
    `rlhf_training_step` (labels kind, job_id, agent_id, algorithm)."""

    def __init__(self, store: JobStore, kind: str) -> None:
        self._store = store
        self._kind = kind  # "reward_model" or "policy"

    def describe(self) -> list[Metric]:
        return []  # the families vary with the jobs running; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        try:
            counts, running = self._read()
        except SQLAlchemyError as error:  # the database is down: no job figures this scrape, the rest stays
            log.warning("metrics: could not read the %s jobs: %s", self._kind, error)
            return
        jobs = GaugeMetricFamily("rlhf_training_jobs", "Training jobs by state.", labels=["kind", "state"])
        for state in STATES:
            jobs.add_metric([self._kind, state], counts.get(state, 0))
        yield jobs
        labels = ["kind", "job_id", "agent_id", "algorithm"]
        step = GaugeMetricFamily("rlhf_training_step", "Latest step a running job reported.", labels=labels)
        seconds = GaugeMetricFamily(
            "rlhf_training_step_seconds", "Seconds of the latest step of a running job.", labels=labels
        )
        wait = GaugeMetricFamily(
            "rlhf_training_reward_wait_ratio",
            "Share of the latest step of a running job spent waiting for the reward service's scores.",
            labels=labels,
        )
        for job_id, agent_id, spec, progress in running:
            metrics = progress.get("metrics") or {}
            if STEP_SECONDS not in metrics:
                continue
            values = [self._kind, job_id, agent_id, str(spec.get("algorithm", ""))]
            step.add_metric(values, float(progress.get("step", 0)))
            step_seconds = float(metrics[STEP_SECONDS])
            seconds.add_metric(values, step_seconds)
            waited = next((float(metrics[name]) for name in REWARD_WAIT_SECONDS if name in metrics), None)
            if waited is not None and step_seconds > 0:
                wait.add_metric(values, min(1.0, waited / step_seconds))
        yield from (step, seconds, wait)

    def _read(self) -> tuple[dict[str, int], list[tuple[str, str, dict[str, Any], dict[str, Any]]]]:
        t = self._store.table
        with self._store.engine.connect() as conn:
            counts = dict(conn.execute(select(t.c.state, func.count()).group_by(t.c.state)).all())
            rows = conn.execute(select(t.c.job_id, t.c.agent_id, t.c.spec, t.c.progress).where(t.c.state == RUNNING))
            running = [(r.job_id, r.agent_id, _json(r.spec), _json(r.progress)) for r in rows]
        return counts, running


def _json(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class ModelCacheCollector(Collector):
    """`rlhf_models_loaded{cache}`: models in a cache's memory; `rlhf_model_bytes{cache,model}`: the parameter and
    buffer bytes of each (a value's `nbytes` when it knows them, else counted from its `model`)."""

    def __init__(self, cache: ModelCache[Any], name: str) -> None:
        self._cache = cache
        self._name = name  # e.g. "reward_scorer", "inference"
        self._sizes: dict[int, int] = {}  # by id of the loaded value: its tensors' sizes do not change

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        loaded = self._cache.loaded()
        count = GaugeMetricFamily("rlhf_models_loaded", "Models held in memory.", labels=["cache"])
        count.add_metric([self._name], len(loaded))
        sizes = GaugeMetricFamily(
            "rlhf_model_bytes", "Parameter and buffer bytes of each model held in memory.", labels=["cache", "model"]
        )
        known = {}
        for key, value in loaded:
            size = self._sizes.get(id(value))
            if size is None:
                size = _bytes_of(value)
            known[id(value)] = size
            sizes.add_metric([self._name, key], size)
        self._sizes = known
        yield count
        yield sizes


def _bytes_of(value: Any) -> int:
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    model = getattr(value, "model", None)
    return parameter_bytes([model]) if model is not None and hasattr(model, "parameters") else 0
