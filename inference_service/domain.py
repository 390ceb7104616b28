"""The inference service's logic, transport-neutral: deployments, routing, generation and its log.

Blocking work never runs on the event loop: the store's calls go through asyncio.to_thread, model loading
through the model cache (also a thread), generation through each model's engine (inference_service.engine:
a decode thread shared by concurrent requests, or one thread per request with batching off).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator

from inference_service import checks
from inference_service.config import InferenceServiceConfig
from inference_service.engine import GenerationEngine, engine_for
from inference_service.generation import GenerationResult, SamplingParams
from inference_service.models import LoadedModel, ModelCache
from inference_service.policy_client import PolicyClient
from inference_service.records import Deployment, GenerateInput, GenerationRecord, StreamChunk, Target
from inference_service.routing import route
from inference_service.store import InferenceStore, now
from rlhf.runtime import validation
from rlhf.runtime.errors import NotFound
from rlhf.training.modeling import resolve_model

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """A validated generate request with its version chosen and model loaded."""

    request: GenerateInput
    params: SamplingParams
    version: str
    loaded: LoadedModel


class InferenceDomain:
    def __init__(
        self, config: InferenceServiceConfig, store: InferenceStore, policies: PolicyClient, models: ModelCache
    ) -> None:
        self.config = config
        self.store = store
        self.policies = policies
        self.models = models
        self._base_path: str | None = None
        self._base_lock = asyncio.Lock()

    # --- deployments -------------------------------------------------------------------------------

    async def set_deployment(self, agent_id: str, targets: list[Target]) -> Deployment:
        validation.agent_id(agent_id)
        targets = checks.targets(targets)
        # Every version must exist now, so a typo fails here rather than on live traffic.
        await asyncio.gather(*(self.policies.get(agent_id, t.version) for t in targets if t.version != checks.BASE))
        deployment = await asyncio.to_thread(self.store.set_deployment, agent_id, targets)
        log.info(
            "deployment of %s is now revision %d: %s",
            agent_id,
            deployment.revision,
            ", ".join(f"{t.version}={t.weight:g}" for t in deployment.targets),
        )
        return deployment

    async def get_deployment(self, agent_id: str) -> Deployment:
        """The stored deployment, or (is_default) the agent's latest version; NOT_FOUND if it has none."""
        validation.agent_id(agent_id)
        stored = await asyncio.to_thread(self.store.get_deployment, agent_id)
        if stored is not None:
            return stored
        latest = await self.policies.get(agent_id, "")
        return Deployment(
            agent_id=agent_id, targets=(Target(latest.version, 1.0),), revision=0, updated_at=None, is_default=True
        )

    # --- generation --------------------------------------------------------------------------------

    async def generate(self, request: GenerateInput) -> GenerationRecord:
        prepared = await self._prepare(request)
        generation = self._engine(prepared).submit(request.prompt, prepared.params)
        try:
            result = await generation.result()
        finally:  # no-op when finished; the caller gone or its deadline passed: leave the batch at once
            generation.cancel()
        return await self._log(str(uuid.uuid4()), prepared, result)

    async def generate_stream(self, request: GenerateInput) -> AsyncIterator[StreamChunk]:
        """Text pieces as they are produced, then a done chunk with the logged record."""
        prepared = await self._prepare(request)
        generation_id = str(uuid.uuid4())
        generation = self._engine(prepared).submit(request.prompt, prepared.params)
        try:
            async for piece in generation:
                yield StreamChunk(text=piece, generation_id=generation_id, policy_version=prepared.version)
            result = await generation.result()
        finally:
            generation.cancel()  # no-op when finished; stops it if the client went away
        record = await self._log(generation_id, prepared, result)
        yield StreamChunk(
            text="", generation_id=generation_id, policy_version=prepared.version, done=True, record=record
        )

    async def get_generation(self, generation_id: str) -> GenerationRecord:
        checks.generation_id(generation_id)
        record = await asyncio.to_thread(self.store.get_generation, generation_id)
        if record is None:
            raise NotFound(f"generation '{generation_id}' was not found")
        return record

    # --- helpers -----------------------------------------------------------------------------------

    def _engine(self, prepared: _Prepared) -> GenerationEngine:
        return engine_for(prepared.loaded, self.config.batching, self.config.max_batch_size)

    async def _prepare(self, request: GenerateInput) -> _Prepared:
        validation.agent_id(request.agent_id)
        validation.text(request.prompt, "prompt", self.config.max_prompt_chars)
        checks.request_version(request.version)
        checks.routing_key(request.routing_key)
        params = checks.sampling(request.params, self.config)
        version, path = await self._choose(request)
        loaded = await self.models.get(path)
        return _Prepared(request=request, params=params, version=version, loaded=loaded)

    async def _choose(self, request: GenerateInput) -> tuple[str, str]:
        """(version that answers, its model folder): pinned, else routed by the deployment, else latest."""
        agent_id, version = request.agent_id, request.version
        if not version:
            deployment = await asyncio.to_thread(self.store.get_deployment, agent_id)
            if deployment is not None:
                version = route(agent_id, deployment.targets, deployment.revision, request.routing_key)
        if version == checks.BASE:
            return checks.BASE, await self._base_model_path()
        ref = await self.policies.get(agent_id, "" if version == "latest" else version)
        return ref.version, ref.model_path

    async def _base_model_path(self) -> str:
        async with self._base_lock:  # the tiny model may be built on first use (~40 s), once
            if self._base_path is None:
                self._base_path = await asyncio.to_thread(
                    resolve_model, self.config.base_model, self.config.server.data_dir
                )
            return self._base_path

    async def _log(self, generation_id: str, prepared: _Prepared, result: GenerationResult) -> GenerationRecord:
        request = prepared.request
        record = GenerationRecord(
            generation_id=generation_id,
            agent_id=request.agent_id,
            policy_version=prepared.version,
            prompt=request.prompt,
            text=result.text,
            routing_key=request.routing_key,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            created_at=now(),
        )
        await asyncio.to_thread(self.store.add_generation, record)
        return record
