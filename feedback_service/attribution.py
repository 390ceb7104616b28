"""Attribution: feedback that cites a generation_id but no policy_version gets the version that produced
the answer, from the inference service's generation log (GetGeneration). That is what makes per-version
stats (the A/B readout) work for agent runtimes that only pass the generation id along.

Attribution is best effort: if the inference service is not configured, is down, or does not know the
generation, the item is stored as sent (never rejected, never delayed past a short deadline). Streams resolve
a whole commit group at once, off the read path (see FeedbackDomain.ingest_batches).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging

import grpc

from feedback_service.models import NewFeedback
from rlhf.inference.v1 import inference_service_pb2 as inf
from rlhf.inference.v1 import inference_service_pb2_grpc as inf_grpc
from rlhf.runtime.config import SecurityConfig
from rlhf.runtime.tls import open_aio_channel

log = logging.getLogger(__name__)


class Attributor:
    def __init__(
        self,
        inference_address: str,
        timeout_seconds: float = 2.0,
        cache_size: int = 10_000,
        concurrency: int = 32,
        security: SecurityConfig | None = None,
    ) -> None:
        # TLS and the service's own token (security) as every other service-to-service call.
        self._channel = (
            open_aio_channel(inference_address, [], security, request_ids=True) if inference_address else None
        )
        self._stub = inf_grpc.InferenceServiceStub(self._channel) if self._channel else None
        self._timeout = timeout_seconds
        self._cache_size = cache_size
        self._concurrency = concurrency  # lookups in flight at once for one batch
        # generation_id -> (agent_id, policy_version); generations are immutable, so answers never go stale.
        self._known: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def attribute_many(self, items: list[NewFeedback]) -> list[NewFeedback]:
        """`items` with policy_version filled in where a cited generation tells it. The generations not yet
        known are looked up concurrently (one GetGeneration each, at most `concurrency` at a time), so a
        batch costs one round trip, not one per new id; items citing nothing cost a field check."""
        if self._stub is None:
            return items
        wanted = [i for i, item in enumerate(items) if item.generation_id and not item.policy_version]
        if not wanted:
            return items
        unknown = sorted({items[i].generation_id for i in wanted} - self._known.keys())
        if unknown:
            limit = asyncio.Semaphore(self._concurrency)
            await asyncio.gather(*(self._look_up(generation_id, limit) for generation_id in unknown))
        out = list(items)
        for i in wanted:
            item = items[i]
            found = self._known.get(item.generation_id)
            # Unknown (not found, or the lookup failed): stored as sent. Another agent's generation: its
            # version is not borrowed.
            if found is not None and found[0] == item.agent_id:
                out[i] = dataclasses.replace(item, policy_version=found[1])
        return out

    async def _look_up(self, generation_id: str, limit: asyncio.Semaphore) -> None:
        assert self._stub is not None
        async with limit:
            try:
                generation = (
                    await self._stub.GetGeneration(
                        inf.GetGenerationRequest(generation_id=generation_id), timeout=self._timeout
                    )
                ).generation
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning(
                        "attribution of generation %s skipped: inference service %s (%s)",
                        generation_id,
                        error.code().name,
                        error.details(),
                    )
                return
        self._known[generation_id] = (generation.agent_id, generation.policy_version)
        while len(self._known) > self._cache_size:
            self._known.popitem(last=False)
