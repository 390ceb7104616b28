"""The policy service as the inference service needs it: "which folder holds this agent's version?".

Only the gRPC contract is used (never the policy service's code or tables). Failures become domain errors
that tell the caller what is wrong: an unknown agent or version is NOT_FOUND, an unreachable service is
UNAVAILABLE with the cause.
"""

from __future__ import annotations

import dataclasses

import grpc

from rlhf.policy.v1 import policy_service_pb2, policy_service_pb2_grpc
from rlhf.runtime.config import SecurityConfig
from rlhf.runtime.errors import FailedPrecondition, NotFound, Unavailable, from_rpc_error
from rlhf.runtime.tls import open_aio_channel


@dataclasses.dataclass(frozen=True)
class PolicyRef:
    """A registered version and the folder from_pretrained loads it from."""

    version: str
    model_path: str


class PolicyClient:
    def __init__(
        self,
        address: str,
        timeout_seconds: float = 10.0,
        options: list | None = None,
        security: SecurityConfig | None = None,
    ) -> None:
        self.address = address
        self._timeout = timeout_seconds
        self._channel = open_aio_channel(address, options or [], security, request_ids=True)
        self._stub = policy_service_pb2_grpc.PolicyServiceStub(self._channel)
        # Registered versions are immutable, so a pinned version's folder is looked up once.
        self._pinned: dict[tuple[str, str], PolicyRef] = {}

    async def close(self) -> None:
        await self._channel.close()

    async def get(self, agent_id: str, version: str = "") -> PolicyRef:
        """The version ("" = the agent's latest) and its model folder."""
        key = (agent_id, version)
        if version and key in self._pinned:
            return self._pinned[key]
        try:
            response = await self._stub.GetPolicy(
                policy_service_pb2.GetPolicyRequest(agent_id=agent_id, version=version), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise self._error(error, agent_id, version) from error
        policy = response.policy
        if not policy.model_path:
            raise FailedPrecondition(
                f"policy {policy.version or version} of agent '{agent_id}' has no model_path in the policy "
                f"service's registry",
                subject=f"{agent_id}/{policy.version or version}",
            )
        ref = PolicyRef(version=policy.version, model_path=policy.model_path)
        self._pinned[(agent_id, ref.version)] = ref
        return ref

    def _error(self, error: grpc.aio.AioRpcError, agent_id: str, version: str) -> Exception:
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.NOT_FOUND:
            if version in ("", "latest"):
                return NotFound(
                    f"agent '{agent_id}' has no policy versions yet: train one first "
                    f"(PolicyService.TrainPolicy), or use version 'base' ({details})"
                )
            return NotFound(f"agent '{agent_id}' has no policy version '{version}' ({details})")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return Unavailable(
                f"policy service at {self.address} is unavailable ({code.name}: {details}); retry when it is back"
            )
        return from_rpc_error(error, "policy service")
