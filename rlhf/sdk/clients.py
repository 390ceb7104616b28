"""Typed, blocking clients for the four services (used by workers, the CLI, the demo and tests).

Each wraps one channel; calls take a deadline; ScoreBatch retries with backoff while the reward service
is unavailable, because a PPO step can wait a little but should not die on a blip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from rlhf.inference.v1 import inference_service_pb2 as inf
from rlhf.inference.v1 import inference_service_pb2_grpc as inf_grpc
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.policy.v1 import policy_service_pb2_grpc as pol_grpc
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.reward.v1 import reward_service_pb2_grpc as rw_grpc
from rlhf.runtime.config import service_address

log = logging.getLogger(__name__)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


class _Client:
    service = ""

    def __init__(self, address: str | None = None, timeout: float = 30.0) -> None:
        self.address = address or service_address(self.service)
        self.timeout = timeout
        self.channel = channel(self.address)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _JobsClient(_Client):
    """get, list, cancel and watch of a service with training jobs (policy and reward: same RPCs)."""

    # The service's *_pb2 module.
    messages: Any

    def get_job(self, job_id: str):
        return self.stub.GetTrainingJob(self.messages.GetTrainingJobRequest(job_id=job_id), timeout=self.timeout).job

    def list_jobs(self, agent_id: str = "", state: int = 0, page_size: int = 0, page_token: str = ""):
        """One page of jobs, newest first: (jobs, next_page_token)."""
        answer = self.stub.ListTrainingJobs(
            self.messages.ListTrainingJobsRequest(
                agent_id=agent_id, state=state, page_size=page_size, page_token=page_token
            ),
            timeout=self.timeout,
        )
        return list(answer.jobs), answer.next_page_token

    def cancel_job(self, job_id: str):
        return self.stub.CancelTrainingJob(
            self.messages.CancelTrainingJobRequest(job_id=job_id), timeout=self.timeout
        ).job

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[Any]:
        """The job now and after every change, until it ends."""
        for update in self.stub.WatchTrainingJob(self.messages.WatchTrainingJobRequest(job_id=job_id), timeout=timeout):
            yield update.job


class FeedbackClient(_Client):
    service = "feedback"

    def __init__(self, address: str | None = None, timeout: float = 30.0) -> None:
        super().__init__(address, timeout)
        self.stub = fb_grpc.FeedbackServiceStub(self.channel)

    def submit(self, agent_id: str, **fields) -> fb.SubmitFeedbackResponse:
        return self.stub.SubmitFeedback(fb.SubmitFeedbackRequest(agent_id=agent_id, **fields), timeout=self.timeout)

    def stream(
        self, requests: Iterable[fb.SubmitFeedbackRequest], timeout: float = 600.0
    ) -> list[fb.StreamFeedbackResponse]:
        items = (fb.StreamFeedbackRequest(feedback=r) for r in requests)
        return list(self.stub.StreamFeedback(items, timeout=timeout))

    def stats(self, agent_id: str, group_by_policy_version: bool = False) -> fb.GetFeedbackStatsResponse:
        return self.stub.GetFeedbackStats(
            fb.GetFeedbackStatsRequest(agent_id=agent_id, group_by_policy_version=group_by_policy_version),
            timeout=self.timeout,
        )

    def export(
        self, agent_id: str, kind: int = 0, watermark: int = 0, timeout: float = 600.0
    ) -> tuple[list[fb.Feedback], int]:
        """All of an agent's rows up to a watermark fixed when the export starts, and that watermark."""
        rows: list[fb.Feedback] = []
        mark = watermark
        for chunk in self.stub.ExportFeedback(
            fb.ExportFeedbackRequest(agent_id=agent_id, kind=kind, watermark=watermark), timeout=timeout
        ):
            rows.extend(chunk.feedback)
            mark = chunk.watermark
        return rows, mark


class RewardClient(_JobsClient):
    service = "reward"
    messages = rw

    def __init__(self, address: str | None = None, timeout: float = 60.0) -> None:
        super().__init__(address, timeout)
        self.stub = rw_grpc.RewardServiceStub(self.channel)

    def score(
        self, agent_id: str, pairs: list[tuple[str, str]], version: str = "", retries: int = 5, backoff: float = 0.5
    ) -> rw.ScoreBatchResponse:
        """One ScoreBatch call; retried with exponential backoff while the service is unavailable."""
        request = rw.ScoreBatchRequest(
            agent_id=agent_id, version=version, items=[rw.ScoreItem(prompt=p, response=r) for p, r in pairs]
        )
        for attempt in range(retries + 1):
            try:
                return self.stub.ScoreBatch(request, timeout=self.timeout)
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == retries:
                    raise
                delay = backoff * 2**attempt
                log.warning(
                    "ScoreBatch %s (%s); retry %d/%d in %.1fs",
                    error.code().name,
                    error.details(),
                    attempt + 1,
                    retries,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def create_job(self, agent_id: str, config: rw.RewardModelConfig | None = None) -> rw.TrainingJob:
        return self.stub.CreateTrainingJob(
            rw.CreateTrainingJobRequest(agent_id=agent_id, config=config), timeout=self.timeout
        ).job

    def get_model(self, agent_id: str, version: str = "") -> rw.RewardModel:
        return self.stub.GetRewardModel(
            rw.GetRewardModelRequest(agent_id=agent_id, version=version), timeout=self.timeout
        ).reward_model

    def list_models(self, agent_id: str) -> list[rw.RewardModel]:
        return list(
            self.stub.ListRewardModels(
                rw.ListRewardModelsRequest(agent_id=agent_id), timeout=self.timeout
            ).reward_models
        )


class PolicyClient(_JobsClient):
    service = "policy"
    messages = pol

    def __init__(self, address: str | None = None, timeout: float = 60.0) -> None:
        super().__init__(address, timeout)
        self.stub = pol_grpc.PolicyServiceStub(self.channel)

    def train(self, request: pol.TrainPolicyRequest, timeout: float | None = None) -> pol.TrainPolicyResponse:
        return self.stub.TrainPolicy(request, timeout=timeout or self.timeout)

    def list_policies(self, agent_id: str) -> list[pol.Policy]:
        return list(self.stub.ListPolicies(pol.ListPoliciesRequest(agent_id=agent_id), timeout=self.timeout).policies)

    def get_policy(self, agent_id: str, version: str = "") -> pol.Policy:
        return self.stub.GetPolicy(
            pol.GetPolicyRequest(agent_id=agent_id, version=version), timeout=self.timeout
        ).policy


class InferenceClient(_Client):
    service = "inference"

    def __init__(self, address: str | None = None, timeout: float = 120.0) -> None:
        super().__init__(address, timeout)
        self.stub = inf_grpc.InferenceServiceStub(self.channel)

    def generate(
        self, agent_id: str, prompt: str, version: str = "", routing_key: str = "", **params
    ) -> inf.GenerateResponse:
        return self.stub.Generate(
            inf.GenerateRequest(
                agent_id=agent_id,
                prompt=prompt,
                version=version,
                routing_key=routing_key,
                params=inf.SamplingParams(**params),
            ),
            timeout=self.timeout,
        )

    def set_deployment(self, agent_id: str, weights: dict[str, float]) -> inf.Deployment:
        targets = [inf.DeploymentTarget(version=v, weight=w) for v, w in weights.items()]
        return self.stub.SetDeployment(
            inf.SetDeploymentRequest(agent_id=agent_id, targets=targets), timeout=self.timeout
        ).deployment

    def get_deployment(self, agent_id: str) -> inf.Deployment:
        return self.stub.GetDeployment(inf.GetDeploymentRequest(agent_id=agent_id), timeout=self.timeout).deployment

    def get_generation(self, generation_id: str) -> inf.Generation:
        return self.stub.GetGeneration(
            inf.GetGenerationRequest(generation_id=generation_id), timeout=self.timeout
        ).generation


def wait_until_serving(address: str, timeout: float = 60.0) -> None:
    """Block until the server at `address` answers its health check with SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no server answered at {address} within {timeout:.0f}s")
            time.sleep(0.2)
