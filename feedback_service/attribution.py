"""Attribution: feedback that cites a generation_id but no policy_version gets the version that produced
the answer, from the inference service's generation log (GetGeneration). That is what makes per-version
stats (the A/B readout) work for agent runtimes that only pass the generation id along.

Attribution is best effort: if the inference service is not configured, is down, or does not know the
generation, the item is stored as sent (never rejected, never delayed past a short deadline).
"""

from __future__ import annotations

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
        security: SecurityConfig | None = None,
    ) -> None:
        # TLS and the service's own token (security) as every other service-to-service call.
        self._channel = open_aio_channel(inference_address, [], security) if inference_address else None
        self._stub = inf_grpc.InferenceServiceStub(self._channel) if self._channel else None
        self._timeout = timeout_seconds
        self._cache_size = cache_size
        # generation_id -> (agent_id, policy_version); generations are immutable, so answers never go stale.
        self._known: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def attribute(self, item: NewFeedback) -> NewFeedback:
        if self._stub is None or not item.generation_id or item.policy_version:
            return item
        found = self._known.get(item.generation_id)
        if found is None:
            try:
                generation = (
                    await self._stub.GetGeneration(
                        inf.GetGenerationRequest(generation_id=item.generation_id), timeout=self._timeout
                    )
                ).generation
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning(
                        "attribution of generation %s skipped: inference service %s (%s)",
                        item.generation_id,
                        error.code().name,
                        error.details(),
                    )
                return item
            found = (generation.agent_id, generation.policy_version)
            self._known[item.generation_id] = found
            while len(self._known) > self._cache_size:
                self._known.popitem(last=False)
        agent_id, version = found
        if agent_id != item.agent_id:  # another agent's generation: don't borrow its version
            return item
        return dataclasses.replace(item, policy_version=version)
