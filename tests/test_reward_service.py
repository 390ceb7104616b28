"""Reward service over real gRPC: training jobs in worker processes, registry, ScoreBatch."""

from __future__ import annotations

import random

import grpc
import pytest
from grpc_status import rpc_status
from scipy.stats import spearmanr

from feedback_service.app import start as start_feedback
from feedback_service.config import FeedbackServiceConfig
from reward_service.app import start as start_reward
from reward_service.config import RewardServiceConfig
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.reward.v1 import reward_service_pb2_grpc as rw_grpc
from rlhf.sdk import rater
from rlhf.training import corpus
from tests.helpers import rated_answers, server_config, submit_ratings
from tests.servers import ServerThread

FAST_FULL = rw.RewardModelConfig(
    use_lora=False, learning_rate=5e-4, num_epochs=5, batch_size=16, validation_fraction=0.2, seed=0
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    data_dir = tmp_path_factory.mktemp("reward")
    feedback = ServerThread(
        start_feedback, FeedbackServiceConfig.from_env(server=server_config("feedback", data_dir))
    ).__enter__()
    reward = ServerThread(
        start_reward, RewardServiceConfig(server=server_config("reward", data_dir), feedback_address=feedback.address)
    ).__enter__()
    yield feedback, reward
    reward.stop()
    feedback.stop()


@pytest.fixture(scope="module")
def stub(stack):
    with stack[1].channel() as channel:
        yield rw_grpc.RewardServiceStub(channel)


def train(stub, agent_id: str, config: rw.RewardModelConfig) -> rw.TrainingJob:
    job = stub.CreateTrainingJob(rw.CreateTrainingJobRequest(agent_id=agent_id, config=config)).job
    assert job.state in (rw.JOB_STATE_QUEUED, rw.JOB_STATE_RUNNING)
    updates = [u.job for u in stub.WatchTrainingJob(rw.WatchTrainingJobRequest(job_id=job.job_id), timeout=300)]
    final = updates[-1]
    assert final.state == rw.JOB_STATE_SUCCEEDED, final.error
    assert any(u.progress.phase == "training" for u in updates)
    return final


TRAINING_RATINGS = rated_answers(200, seed=1)


@pytest.fixture(scope="module")
def trained(stack, stub):
    with stack[0].channel() as channel:
        submit_ratings(channel, "rated", TRAINING_RATINGS)
    return train(stub, "rated", FAST_FULL)


def held_out_pairs(n: int = 200) -> list[tuple[str, str, float]]:
    """Rated answers drawn like the training ones but none of them: no answer text the model was trained on."""
    seen = {response for _, response, _ in TRAINING_RATINGS}
    items = [item for item in rated_answers(2 * n, seed=99) if item[1] not in seen][:n]
    assert len(items) == n
    return items


@pytest.mark.slow  # the trained fixture trains a reward model
def test_training_registers_a_version_with_lineage_and_metrics(stub, trained):
    assert trained.reward_model_version == "v1"
    assert trained.feedback_watermark > 0
    model = stub.GetRewardModel(rw.GetRewardModelRequest(agent_id="rated")).reward_model
    assert model.version == "v1" and model.rating_count == 200 and model.comparison_count == 0
    assert model.feedback_watermark == trained.feedback_watermark
    assert set(model.metrics) >= {"mse", "mae", "pearson", "spearman"}
    assert model.config.learning_rate == pytest.approx(5e-4) and not model.config.use_lora
    assert model.normalization.std > 0
    listed = stub.ListRewardModels(rw.ListRewardModelsRequest(agent_id="rated")).reward_models
    assert [m.version for m in listed] == ["v1"]


@pytest.mark.slow  # the trained fixture trains a reward model
def test_scores_rank_held_out_answers_like_the_rater(stub, trained):
    items = held_out_pairs()
    response = stub.ScoreBatch(
        rw.ScoreBatchRequest(agent_id="rated", items=[rw.ScoreItem(prompt=p, response=r) for p, r, _ in items])
    )
    assert response.version == "v1" and len(response.scores) == len(items)
    assert all(s.ok for s in response.scores)
    rater_scores = [t for _, _, t in items]
    assert len(set(rater_scores)) >= 4  # graded: a rank correlation means something
    # scipy's, not the service's own rank code. The rater ties most answers at 0 (no sea word), which caps
    # what any ordering of the tied answers can reach at about 0.88 on these items.
    spearman = spearmanr([s.score for s in response.scores], rater_scores).statistic
    assert spearman >= 0.8, spearman
    assert all(0.0 <= s.rating <= 1.0 for s in response.scores)


@pytest.mark.slow  # the trained fixture trains a reward model
def test_saved_model_reloads_with_plain_transformers_and_scores_the_same(stub, trained):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.training.reward_inputs import join

    model_path = stub.GetRewardModel(rw.GetRewardModelRequest(agent_id="rated", version="v1")).reward_model.model_path
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path).eval()
    items = held_out_pairs(5)
    service = stub.ScoreBatch(
        rw.ScoreBatchRequest(
            agent_id="rated", version="v1", items=[rw.ScoreItem(prompt=p, response=r) for p, r, _ in items]
        )
    ).scores
    for (prompt, response, _), scored in zip(items, service, strict=False):
        with torch.inference_mode():
            local = model(**tokenizer(join(prompt, response), return_tensors="pt")).logits.item()
        assert local == pytest.approx(scored.score, abs=1e-4)


@pytest.mark.slow  # the trained fixture trains a reward model
def test_unscorable_items_are_reported_without_failing_the_batch(stub, trained):
    response = stub.ScoreBatch(
        rw.ScoreBatchRequest(
            agent_id="rated",
            items=[
                rw.ScoreItem(prompt="Hi?", response=" I love the calm sea."),
                rw.ScoreItem(prompt="Hi?", response="  "),
            ],
        )
    )
    assert response.scores[0].ok and not response.scores[1].ok
    assert "empty" in response.scores[1].error


def bad_request_field(error: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(error)
    for detail in status.details:
        violation = error_details_pb2.BadRequest()
        if detail.Unpack(violation):
            return violation.field_violations[0].field
    return ""


@pytest.mark.slow  # the trained fixture trains a reward model
def test_scoring_errors_have_clear_status_codes(stub, trained):
    with pytest.raises(grpc.RpcError) as error:
        stub.ScoreBatch(rw.ScoreBatchRequest(agent_id="nobody", items=[rw.ScoreItem(prompt="a", response="b")]))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        stub.ScoreBatch(
            rw.ScoreBatchRequest(agent_id="rated", version="v9", items=[rw.ScoreItem(prompt="a", response="b")])
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        stub.ScoreBatch(rw.ScoreBatchRequest(agent_id="rated", items=[]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_field(error.value) == "items"
    with pytest.raises(grpc.RpcError) as error:
        stub.ScoreBatch(rw.ScoreBatchRequest(agent_id="rated", items=[rw.ScoreItem(prompt="a", response="b")] * 5000))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        stub.ScoreBatch(rw.ScoreBatchRequest(agent_id="../etc", items=[rw.ScoreItem(prompt="a", response="b")]))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_request_field(error.value) == "agent_id"


def test_too_little_feedback_is_a_failed_precondition_with_the_count(stack, stub):
    with stack[0].channel() as channel:
        submit_ratings(channel, "sparse", rated_answers(4))
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateTrainingJob(rw.CreateTrainingJobRequest(agent_id="sparse"))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has 4 feedback items" in error.value.details()


def test_config_out_of_range_names_the_field(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateTrainingJob(rw.CreateTrainingJobRequest(agent_id="rated", config=rw.RewardModelConfig(batch_size=0)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(error.value) == "config.batch_size"


def comparison_pairs(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): an answer about the sea against one on another topic, as the rater prefers."""
    pairs = []
    for _ in range(count):
        sea = " " + corpus.answer(rng, "sea")
        other = " " + corpus.answer(rng, rng.choice(["city", "forest", "kitchen"]))
        chosen, rejected = (sea, other) if rater.prefer(sea, other) == 0 else (other, sea)
        pairs.append((rng.choice(corpus.QUESTIONS), chosen, rejected))
    return pairs


@pytest.mark.slow
def test_comparisons_train_a_pairwise_model_with_lora(stack, stub):
    from rlhf.feedback.v1 import feedback_service_pb2 as fb
    from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc

    training_pairs = comparison_pairs(random.Random(5), 160)
    requests = []
    for i, (prompt, chosen, rejected) in enumerate(training_pairs):
        requests.append(
            fb.StreamFeedbackRequest(
                feedback=fb.SubmitFeedbackRequest(
                    agent_id="pairs",
                    prompt=prompt,
                    chosen=chosen,
                    rejected=rejected,
                    request_id=f"p{i}",
                )
            )
        )
    with stack[0].channel() as channel:
        acks = list(fb_grpc.FeedbackServiceStub(channel).StreamFeedback(iter(requests)))
    assert all(a.accepted for a in acks)
    job = train(
        stub,
        "pairs",
        rw.RewardModelConfig(
            use_lora=True, lora_r=8, learning_rate=3e-3, num_epochs=4, batch_size=16, validation_fraction=0.25
        ),
    )
    assert "pairwise_accuracy" in job.metrics
    model = stub.GetRewardModel(rw.GetRewardModelRequest(agent_id="pairs")).reward_model
    assert model.comparison_count == 160 and model.config.use_lora

    # Measured here through ScoreBatch on pairs the model never saw: the rater's choice scores higher.
    seen = {text for _, chosen, rejected in training_pairs for text in (chosen, rejected)}
    held_out = [pair for pair in comparison_pairs(random.Random(6), 200) if not {pair[1], pair[2]} & seen][:80]
    assert len(held_out) == 80
    items = [rw.ScoreItem(prompt=p, response=text) for p, chosen, rejected in held_out for text in (chosen, rejected)]
    scores = [s.score for s in stub.ScoreBatch(rw.ScoreBatchRequest(agent_id="pairs", items=items)).scores]
    right = sum(chosen > rejected for chosen, rejected in zip(scores[::2], scores[1::2], strict=True))
    assert right / len(held_out) >= 0.8, (right, len(held_out))


@pytest.mark.slow
def test_one_active_job_per_agent_and_cancel(stack, stub):
    with stack[0].channel() as channel:
        submit_ratings(channel, "busy", rated_answers(120, seed=3))
    slow = rw.RewardModelConfig(use_lora=False, num_epochs=200, batch_size=4, learning_rate=1e-4)
    job = stub.CreateTrainingJob(rw.CreateTrainingJobRequest(agent_id="busy", config=slow)).job
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateTrainingJob(rw.CreateTrainingJobRequest(agent_id="busy", config=slow))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and job.job_id in error.value.details()
    for update in stub.WatchTrainingJob(rw.WatchTrainingJobRequest(job_id=job.job_id), timeout=120):
        if update.job.progress.phase == "training":
            break
    stub.CancelTrainingJob(rw.CancelTrainingJobRequest(job_id=job.job_id))
    final = list(stub.WatchTrainingJob(rw.WatchTrainingJobRequest(job_id=job.job_id), timeout=120))[-1].job
    assert final.state == rw.JOB_STATE_CANCELLED
    with pytest.raises(grpc.RpcError) as error:
        stub.GetRewardModel(rw.GetRewardModelRequest(agent_id="busy"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    listed = stub.ListTrainingJobs(rw.ListTrainingJobsRequest(agent_id="busy")).jobs
    assert [j.job_id for j in listed] == [job.job_id]


def test_unknown_job_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as error:
        stub.GetTrainingJob(rw.GetTrainingJobRequest(job_id="nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
