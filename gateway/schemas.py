"""The seed's JSON: request bodies (camelCase, types checked strictly) and answers built from the services' messages.

Numbers are JSON numbers (int64 counts too), times are RFC 3339 in UTC, absent values are null.
"""

from __future__ import annotations

from typing import Any, Literal

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from gateway.errors import invalid, rest_field
from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.sdk.clients import algorithm_number
from rlhf.sdk.protojson import message_to_dict

_STRICT = ConfigDict(alias_generator=to_camel, populate_by_name=False, extra="forbid", strict=True)
INTEGER_TYPES = {
    FieldDescriptor.CPPTYPE_INT32,
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT32,
    FieldDescriptor.CPPTYPE_UINT64,
}


# -- requests ----------------------------------------------------------------------------------------------


class FeedbackIn(BaseModel):
    """A rating (prompt, response, score) as in the seed, or a comparison (prompt, chosen, rejected)."""

    model_config = _STRICT
    prompt: str = Field("", description="What the agent was asked.")
    response: str = Field("", description="The agent's answer (a rating).")
    score: float | None = Field(None, description="0 (bad) to 1 (excellent); required for a rating.")
    run_id: str = Field("", description="The agent run the answer came from.")
    notes: str | None = Field(None, description="Optional free text.")
    chosen: str = Field("", description="A comparison: the better answer.")
    rejected: str = Field("", description="A comparison: the worse answer.")
    margin: float | None = Field(None, description="A comparison: how much better (>= 0).")
    generation_id: str = Field("", description="Id of the inference service's generation that is rated.")
    request_id: str = Field("", description="Idempotency key: a retry with the same key is stored once.")
    metadata: dict[str, str] = Field(default_factory=dict, description="Free string pairs.")

    def to_fields(self) -> dict[str, Any]:
        """The SubmitFeedbackRequest fields that are set."""
        fields = {name: value for name, value in self.model_dump().items() if value not in ("", None, {})}
        return fields


class TrainIn(BaseModel):
    """The seed's dryRun, maxSteps and learningRate, plus optional config fields and a reward model to reuse."""

    model_config = _STRICT
    dry_run: bool = Field(False, description="Estimate only: nothing is trained.")
    max_steps: int | None = Field(None, description="PPO steps (default 1000).")
    learning_rate: float | None = Field(None, description="Learning rate (default 1e-5).")
    config: dict[str, Any] | None = Field(
        None, description="More TrainingConfig fields, snake_case as in the dry run's modelConfig."
    )
    reward_model_version: str = Field(
        "", description="Reuse this reward-model version ('latest' for the newest); default: train a new one."
    )
    algorithm: Literal["ppo", "grpo", "rloo"] = Field(
        "ppo", description="The RL algorithm: PPO (ours), or GRPO / RLOO (TRL's trainers)."
    )
    algorithm_config: dict[str, Any] | None = Field(
        None, description="GRPO's or RLOO's own knobs (GRPOConfig / RLOOConfig fields; unset: TRL's defaults)."
    )


def config_message(fields: dict[str, Any], message: Message, prefix: str) -> None:
    """Set `fields` (snake_case or camelCase names) on `message`; an unknown name or a wrong type is a 400
    naming `prefix.name`."""
    names = message.DESCRIPTOR.fields_by_name
    for key, value in fields.items():
        descriptor = names.get(key) or next((f for f in names.values() if f.json_name == key), None)
        field = rest_field(f"{prefix}.{key}".removeprefix("."))
        if descriptor is None:
            raise invalid(field, f"is not a field of {message.DESCRIPTOR.name}")
        field = rest_field(f"{prefix}.{descriptor.name}".removeprefix("."))
        # JSON's true is not a number, and 2.5 is not an integer (ParseDict would take both).
        wrong = isinstance(value, bool) != (descriptor.cpp_type == FieldDescriptor.CPPTYPE_BOOL) or (
            descriptor.cpp_type in INTEGER_TYPES and isinstance(value, float) and not value.is_integer()
        )
        try:
            if wrong:
                raise json_format.ParseError
            json_format.ParseDict({descriptor.name: value}, message, ignore_unknown_fields=False)
        except (json_format.ParseError, ValueError, TypeError):  # out of range: ValueError
            raise invalid(field, f"must be a {_json_type(descriptor)} in range, got {value!r}") from None


def _json_type(descriptor: FieldDescriptor) -> str:
    if descriptor.is_repeated:
        return "list"
    if descriptor.cpp_type in INTEGER_TYPES:
        return "integer"
    if descriptor.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return "boolean"
    if descriptor.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        return "string"
    return "number"


# -- answers -----------------------------------------------------------------------------------------------


def timestamp(value: Timestamp, present: bool = True) -> str | None:
    return value.ToJsonString() if present and (value.seconds or value.nanos) else None


def feedback_json(answer: fb.SubmitFeedbackResponse) -> dict[str, Any]:
    return {
        "id": answer.id,
        "agentId": answer.agent_id,
        "score": answer.score if answer.HasField("score") else None,
        "createdAt": timestamp(answer.created_at),
        "requestId": answer.request_id,
        "duplicate": answer.duplicate,
    }


def model_config_json(config: Any) -> dict[str, Any]:
    """The resolved TrainingConfig (a Struct: every number a double) with integers as integers."""
    values = json_format.MessageToDict(config)
    order = [f.name for f in pol.TrainingConfig.DESCRIPTOR.fields]  # a Struct keeps no order: the config's
    out = {}
    for key in sorted(values, key=lambda k: order.index(k) if k in order else len(order)):
        value = values[key]
        descriptor = pol.TrainingConfig.DESCRIPTOR.fields_by_name.get(key)
        if descriptor is not None and descriptor.cpp_type in INTEGER_TYPES and isinstance(value, float):
            value = int(value)
        out[key] = value
    return out


def dry_run_json(answer: pol.TrainPolicyResponse) -> dict[str, Any]:
    return {
        "status": "dry_run",
        "feedbackCount": answer.feedback_count,
        "estimatedSteps": answer.estimated_steps,
        "estimatedTimeMinutes": answer.estimated_time_minutes,
        "scoreMean": answer.score_mean,
        "scoreStd": answer.score_std,
        "modelConfig": model_config_json(answer.model_config),
        "estimateBasis": answer.estimate_basis,
        "estimatedRewardModelMinutes": answer.estimated_reward_model_minutes,
        "estimatedLoadingMinutes": answer.estimated_loading_minutes,
        "estimatedTrainingMinutes": answer.estimated_training_minutes,
        "estimatedSavingMinutes": answer.estimated_saving_minutes,
        "estimatedPeakMemoryBytes": answer.estimated_peak_memory_bytes,
        "estimatedResponseTokens": answer.estimated_response_tokens,
        "algorithm": pol.Algorithm.Name(answer.algorithm).removeprefix("ALGORITHM_").lower(),
        **_algorithm_config_json(answer),
    }


def _algorithm_config_json(answer: pol.TrainPolicyResponse) -> dict[str, Any]:
    """GRPO's or RLOO's knobs as the run would use them, snake_case like modelConfig (nothing for PPO)."""
    for field in ("grpo_config", "rloo_config"):
        if answer.HasField(field):
            return {"algorithmConfig": message_to_dict(getattr(answer, field))}
    return {}


def trained_json(policy: pol.Policy) -> dict[str, Any]:
    """The seed's answer of a finished training."""
    return {
        "status": "trained",
        "policyId": policy.id,
        "version": policy.version,
        "modelPath": policy.model_path,
        "rewardModelPath": policy.reward_model_path,
        "feedbackCount": policy.metrics.feedback_count,
        "trainingSteps": policy.metrics.training_steps,
        "rewardMean": policy.metrics.reward_mean,
        "rewardStd": policy.metrics.reward_std,
        "jobId": policy.job_id,
    }


def policy_json(policy: pol.Policy) -> dict[str, Any]:
    """One entry of the seed's policy list."""
    m = policy.metrics
    return {
        "id": policy.id,
        "agentId": policy.agent_id,
        "version": policy.version,
        "createdAt": timestamp(policy.created_at),
        "metrics": {
            "feedbackCount": m.feedback_count,
            "rewardMean": m.reward_mean,
            "rewardStd": m.reward_std,
            "trainingSteps": m.training_steps,
            "initialRewardMean": m.initial_reward_mean,
            "kl": m.kl,
        },
        "modelPath": policy.model_path,
        "rewardModelPath": policy.reward_model_path,
        "rewardModelVersion": policy.reward_model_version,
        "baseModel": policy.base_model,
        "jobId": policy.job_id,
    }


def job_state(job: pol.TrainingJob) -> str:
    """ "queued", "running", "succeeded", "failed", "cancelled" or "interrupted"."""
    return pol.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()


def job_json(job: pol.TrainingJob, url: str) -> dict[str, Any]:
    p = job.progress
    return {
        "jobId": job.job_id,
        "agentId": job.agent_id,
        "state": job_state(job),
        "progress": {
            "phase": p.phase,
            "step": p.step,
            "totalSteps": p.total_steps,
            "metrics": dict(p.metrics),
            "stepsPerSecond": p.steps_per_second,
            "etaSeconds": p.eta_seconds,
            "message": p.message,
        },
        "version": job.policy_version or None,
        "rewardModelVersion": job.reward_model_version or None,
        "error": job.error or None,
        "createdAt": timestamp(job.created_at),
        "startedAt": timestamp(job.started_at),
        "finishedAt": timestamp(job.finished_at),
        "url": url,
        "events": f"{url}/events",
    }


def train_request(
    agent_id: str,
    body: TrainIn,
    defaults: dict[str, Any],
    overrides: dict[str, Any],
    reward_model_config: dict[str, Any],
) -> pol.TrainPolicyRequest:
    """TrainPolicyRequest for `body`: the operator's defaults, then the request's config, maxSteps and
    learningRate, then the operator's overrides (rlhf gateway config)."""
    training = pol.TrainingConfig()
    config_message(defaults, training, "training_defaults")
    config_message(body.config or {}, training, "config")
    top = {"max_steps": body.max_steps, "learning_rate": body.learning_rate}
    config_message({k: v for k, v in top.items() if v is not None}, training, "")
    config_message(overrides, training, "training_overrides")
    request = pol.TrainPolicyRequest(
        agent_id=agent_id,
        dry_run=body.dry_run,
        config=training,
        reward_model_version=body.reward_model_version,
        algorithm=algorithm_number(body.algorithm),
    )
    if body.algorithm_config:
        if body.algorithm == "ppo":
            raise invalid("algorithmConfig", "is for GRPO and RLOO; PPO takes its knobs in config")
        config_message(body.algorithm_config, getattr(request, f"{body.algorithm}_config"), "algorithm_config")
    if not body.reward_model_version and reward_model_config:
        config_message(reward_model_config, request.reward_model_config, "reward_model_config")
    return request
