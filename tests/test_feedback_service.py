"""Feedback service through a real gRPC server and real channels (no transport mocks).

Runs on SQLite; also on PostgreSQL when RLHF_TEST_POSTGRES_URL is set (that parameter is skipped otherwise).
Tests share one server per database and isolate themselves by using a fresh agent id each.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import os
import pathlib
import random
import signal
import statistics
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `tests.servers` and the service packages live at the repository root
    sys.path.insert(0, str(ROOT))

from feedback_service.app import SERVICE_NAME, start  # noqa: E402
from feedback_service.config import FeedbackServiceConfig  # noqa: E402
from feedback_service.domain import FeedbackDomain  # noqa: E402
from feedback_service.models import FeedbackInput, ListFilters, NewFeedback  # noqa: E402
from feedback_service.store import FeedbackStore  # noqa: E402
from rlhf.feedback.v1 import feedback_service_pb2 as pb  # noqa: E402
from rlhf.feedback.v1 import feedback_service_pb2_grpc as pb_grpc  # noqa: E402
from rlhf.runtime.config import ServerConfig  # noqa: E402
from rlhf.runtime.db import make_engine  # noqa: E402
from tests.servers import ServerThread, ServiceProcess  # noqa: E402

POSTGRES_URL = os.environ.get("RLHF_TEST_POSTGRES_URL", "")
EXPORT_CHUNK = 4  # small, so exports span several messages


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "postgres":
        if not POSTGRES_URL:
            pytest.skip("RLHF_TEST_POSTGRES_URL is not set")
        return POSTGRES_URL
    return f"sqlite:///{tmp_path_factory.mktemp('feedback-db') / 'feedback.db'}"


def make_config(data_dir: pathlib.Path, database_url: str = "") -> FeedbackServiceConfig:
    server = ServerConfig(service="feedback", port=0, data_dir=data_dir, database_url=database_url)
    return FeedbackServiceConfig.from_env(server=server, export_chunk_size=EXPORT_CHUNK)


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(start, make_config(tmp_path_factory.mktemp("data"), database_url)) as thread:
        yield thread


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.FeedbackServiceStub]:
    channel = server.channel()
    yield pb_grpc.FeedbackServiceStub(channel)
    channel.close()


@pytest.fixture
def agent() -> str:
    return f"agent-{uuid.uuid4().hex[:12]}"


def rating(agent_id: str, score: float = 0.5, **fields: object) -> pb.SubmitFeedbackRequest:
    values: dict[str, object] = dict(
        agent_id=agent_id, prompt="How do I reset my password?", response="Open settings, then security.", score=score
    )
    values.update(fields)
    return pb.SubmitFeedbackRequest(**values)


def comparison(agent_id: str, **fields: object) -> pb.SubmitFeedbackRequest:
    values: dict[str, object] = dict(
        agent_id=agent_id, prompt="Summarise the ticket.", chosen="Customer cannot log in.", rejected="A ticket."
    )
    values.update(fields)
    return pb.SubmitFeedbackRequest(**values)


def stream(stub: pb_grpc.FeedbackServiceStub, items: list[pb.SubmitFeedbackRequest]) -> list:
    requests = (pb.StreamFeedbackRequest(feedback=item) for item in items)
    return list(stub.StreamFeedback(requests, timeout=60))


def list_all(stub: pb_grpc.FeedbackServiceStub, agent_id: str, **filters: object) -> list[pb.Feedback]:
    rows: list[pb.Feedback] = []
    token = ""
    while True:
        page = stub.ListFeedback(pb.ListFeedbackRequest(agent_id=agent_id, page_size=1000, page_token=token, **filters))
        rows.extend(page.feedback)
        token = page.next_page_token
        if not token:
            return rows


def field_violation(error: grpc.RpcError) -> str:
    """The field named by the BadRequest detail of an INVALID_ARGUMENT error."""
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    status = rpc_status.from_call(error)
    assert status is not None, "no google.rpc.Status in the trailers"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return bad_request.field_violations[0].field
    raise AssertionError(f"no BadRequest detail in {status}")


def micros(row: pb.Feedback) -> int:
    """A stored row's created_at, as the server wrote it (microseconds)."""
    return row.created_at.ToMicroseconds()


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(us)
    return stamp


def split_point(rows: list[pb.Feedback]) -> int:
    """A created_at taken from the rows themselves with rows on both sides of it (start_time is inclusive,
    end_time exclusive). Windows are built from the server's own timestamps, never from the test's clock, and
    what each window should hold is computed from those same timestamps."""
    distinct = sorted({micros(r) for r in rows})
    # Rows from separate transactions: their timestamps differ (each transaction takes one, in microseconds).
    assert len(distinct) >= 2, distinct
    return distinct[len(distinct) // 2]


# -- submit, replay, stream ---------------------------------------------------------------------------


def test_submit_rating_and_comparison_round_trip(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    # The seed API's body: agentId, prompt, response, score, runId, notes.
    seed = pb.SubmitFeedbackRequest(
        agent_id=agent, prompt="What is 2+2?", response="4", score=0.9, run_id="exec-42", notes="correct and short"
    )
    answer = stub.SubmitFeedback(seed)
    assert answer.id and answer.agent_id == agent and answer.score == pytest.approx(0.9)
    assert answer.HasField("created_at") and answer.created_at.seconds > 0
    assert not answer.duplicate and len(answer.request_id) >= 16  # generated by the server
    assert answer.kind == pb.FEEDBACK_KIND_RATING

    pair = comparison(
        agent,
        margin=0.5,
        policy_version="v2",
        generation_id="gen-1",
        metadata={"channel": "web", "lang": "en"},
        request_id="cmp-1",
    )
    second = stub.SubmitFeedback(pair)
    assert second.kind == pb.FEEDBACK_KIND_COMPARISON and not second.HasField("score")
    assert second.request_id == "cmp-1" and second.policy_version == "v2"
    assert int(second.id) > int(answer.id)

    newest, oldest = list_all(stub, agent)
    assert (oldest.id, oldest.agent_id, oldest.prompt, oldest.response, oldest.score, oldest.run_id, oldest.notes) == (
        answer.id,
        agent,
        "What is 2+2?",
        "4",
        pytest.approx(0.9),
        "exec-42",
        "correct and short",
    )
    assert oldest.kind == pb.FEEDBACK_KIND_RATING and oldest.request_id == answer.request_id
    assert oldest.created_at == answer.created_at and oldest.sequence == int(answer.id)
    assert not oldest.HasField("margin")
    assert newest.id == second.id and newest.kind == pb.FEEDBACK_KIND_COMPARISON
    assert (newest.chosen, newest.rejected, newest.margin) == (pair.chosen, pair.rejected, 0.5)
    assert not newest.HasField("score") and newest.response == ""
    assert (newest.generation_id, newest.policy_version) == ("gen-1", "v2")
    assert dict(newest.metadata) == {"channel": "web", "lang": "en"}


def test_replay_returns_original_and_stores_nothing(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    first = stub.SubmitFeedback(rating(agent, score=0.25, request_id="req-1"))
    again = stub.SubmitFeedback(rating(agent, score=0.75, request_id="req-1"))  # different body, same key
    assert not first.duplicate and again.duplicate
    assert again.id == first.id and again.score == pytest.approx(0.25)
    assert again.created_at == first.created_at

    # Streamed replays (and a repeat inside one stream) behave the same.
    acks = stream(
        stub, [rating(agent, request_id="req-1"), rating(agent, request_id="req-2"), rating(agent, request_id="req-2")]
    )
    assert [(a.accepted, a.duplicate) for a in acks] == [(True, True), (True, False), (True, True)]
    assert acks[0].id == first.id and acks[2].id == acks[1].id

    # The same request_id for another agent is a different item.
    other = stub.SubmitFeedback(rating(agent + "-b", request_id="req-1"))
    assert not other.duplicate and other.id != first.id
    assert sorted(r.request_id for r in list_all(stub, agent)) == ["req-1", "req-2"]


def test_stream_rejects_bad_item_alone(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    items = [rating(agent, score=i / 10, request_id=f"s-{i}") for i in range(7)]
    items[3] = rating(agent, score=1.5, request_id="s-3")
    items[5] = comparison(agent, chosen="same", rejected="same", request_id="s-5")
    acks = stream(stub, items)
    assert [a.index for a in acks] == list(range(7))
    assert [a.request_id for a in acks] == [f"s-{i}" for i in range(7)]
    bad = {a.index: a for a in acks if not a.accepted}
    assert set(bad) == {3, 5}
    assert bad[3].field == "score" and "[0.0, 1.0]" in bad[3].reason and bad[3].id == ""
    assert bad[5].field == "rejected"
    good = [a for a in acks if a.accepted]
    assert all(not a.duplicate for a in good)
    ids = [int(a.id) for a in good]
    assert ids == sorted(ids) and len(set(ids)) == 5
    stored = list_all(stub, agent)
    assert sorted(r.id for r in stored) == sorted(a.id for a in good)


def test_stream_spanning_many_groups(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    count = 1200  # several commit groups of 256
    acks = stream(stub, [rating(agent, score=(i % 11) / 10) for i in range(count)])
    assert len(acks) == count and all(a.accepted and not a.duplicate for a in acks)
    assert [a.index for a in acks] == list(range(count))
    ids = [int(a.id) for a in acks]
    assert ids == sorted(ids) and len(set(ids)) == count
    assert len({a.request_id for a in acks}) == count  # generated, unique
    stats = stub.GetFeedbackStats(pb.GetFeedbackStatsRequest(agent_id=agent)).stats
    assert stats.feedback_count == count and stats.watermark == ids[-1]


def test_concurrent_streams_replaying_the_same_ids_store_each_once(
    stub: pb_grpc.FeedbackServiceStub, agent: str
) -> None:
    items = [rating(agent, score=i / 200, request_id=f"c-{i}") for i in range(200)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda shift: stream(stub, items[shift:] + items[:shift]), [0, 50, 100, 150]))
    by_request: dict[str, set[str]] = {}
    fresh = collections.Counter[str]()
    for acks in results:
        assert len(acks) == 200 and all(a.accepted for a in acks)
        for ack in acks:
            by_request.setdefault(ack.request_id, set()).add(ack.id)
            fresh[ack.request_id] += not ack.duplicate
    assert all(len(ids) == 1 for ids in by_request.values())  # every stream got the same id
    assert set(fresh.values()) == {1}  # exactly one stream stored each item
    assert len(list_all(stub, agent)) == 200


@pytest.mark.parametrize(
    "request_factory, field",
    [
        (lambda a: rating("../x"), "agent_id"),
        (lambda a: rating(""), "agent_id"),
        (lambda a: rating("a" * 65), "agent_id"),
        (lambda a: rating(a, score=1.5), "score"),
        (lambda a: rating(a, score=-0.1), "score"),
        (lambda a: rating(a, score=math.nan), "score"),
        (lambda a: rating(a, score=math.inf), "score"),
        (lambda a: pb.SubmitFeedbackRequest(agent_id=a, prompt="p", response="r"), "score"),
        (lambda a: rating(a, prompt=""), "prompt"),
        (lambda a: rating(a, prompt="   "), "prompt"),
        (lambda a: rating(a, response=""), "response"),
        (lambda a: rating(a, response="x" * 20_001), "response"),
        (lambda a: rating(a, notes="x\x00y"), "notes"),
        (lambda a: comparison(a, chosen="same", rejected="same"), "rejected"),
        (lambda a: comparison(a, rejected=""), "rejected"),
        (lambda a: comparison(a, margin=-1.0), "margin"),
        (lambda a: comparison(a, margin=math.nan), "margin"),
        (lambda a: rating(a, request_id="r" * 129), "request_id"),
        (lambda a: rating(a, metadata={f"k{i}": "v" for i in range(65)}), "metadata"),
        (lambda a: rating(a, metadata={"k": "v" * 20_000}), "metadata"),
        (lambda a: rating(a, kind=pb.FEEDBACK_KIND_COMPARISON), "chosen"),
    ],
    ids=[
        "agent-path",
        "agent-empty",
        "agent-long",
        "score-high",
        "score-negative",
        "score-nan",
        "score-inf",
        "score-missing",
        "prompt-empty",
        "prompt-blank",
        "response-empty",
        "response-too-long",
        "notes-nul",
        "chosen-equals-rejected",
        "rejected-empty",
        "margin-negative",
        "margin-nan",
        "request-id-long",
        "metadata-entries",
        "metadata-bytes",
        "kind-mismatch",
    ],
)
def test_invalid_submit_names_the_field(
    stub: pb_grpc.FeedbackServiceStub, agent: str, request_factory, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitFeedback(request_factory(agent))
    assert field_violation(caught.value) == field
    assert list_all(stub, agent) == []  # a rejected request leaves nothing behind


# -- list ---------------------------------------------------------------------------------------------


def test_list_pagination_is_exact_under_concurrent_inserts(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    initial = [a.id for a in stream(stub, [rating(agent, score=i / 40) for i in range(30)])]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = stub.ListFeedback(pb.ListFeedbackRequest(agent_id=agent, page_size=7, page_token=token))
        seen.extend(row.id for row in page.feedback)
        pages += 1
        # New rows arrive between pages (newer than every row already listed).
        stream(stub, [rating(agent, score=0.5) for _ in range(3)])
        token = page.next_page_token
        if not token:
            break
    assert pages == 5
    assert sorted(seen, key=int) == initial  # every row exactly once, none of the later ones
    assert seen == sorted(seen, key=int, reverse=True)  # newest first


def test_list_filters(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    stub.SubmitFeedback(rating(agent, score=0.1, policy_version="v1", run_id="run-a"))
    stub.SubmitFeedback(rating(agent, score=0.6, policy_version="v2", run_id="run-a"))
    stub.SubmitFeedback(rating(agent, score=0.9, policy_version="v2", run_id="run-b"))
    stub.SubmitFeedback(comparison(agent, policy_version="v1", run_id="run-b"))

    def score(row: pb.Feedback) -> float | None:
        return row.score if row.HasField("score") else None

    def scores(**filters: object) -> list[float | None]:
        return [score(r) for r in list_all(stub, agent, **filters)]

    assert scores() == [None, 0.9, 0.6, 0.1]
    assert scores(kind=pb.FEEDBACK_KIND_RATING) == [0.9, 0.6, 0.1]
    assert scores(kind=pb.FEEDBACK_KIND_COMPARISON) == [None]
    assert scores(min_score=0.5) == [0.9, 0.6]
    assert scores(min_score=0.5, max_score=0.8) == [0.6]
    assert scores(policy_version="v2") == [0.9, 0.6]
    assert scores(run_id="run-b") == [None, 0.9]

    # Time windows: bounds and expectations both from the created_at values the server stored.
    rows = list_all(stub, agent)
    middle = split_point(rows)
    inside = [score(r) for r in rows if micros(r) >= middle]
    before = [score(r) for r in rows if micros(r) < middle]
    assert inside and before  # the window really splits the rows
    assert scores(start_time=timestamp(middle)) == inside
    assert scores(end_time=timestamp(middle)) == before
    first, last = min(micros(r) for r in rows), max(micros(r) for r in rows)
    assert scores(start_time=timestamp(first), end_time=timestamp(last + 1)) == scores()
    assert scores(start_time=timestamp(first), end_time=timestamp(first)) == []  # empty: end is exclusive
    assert scores(start_time=timestamp(last + 1)) == []

    for request, field in [
        (pb.ListFeedbackRequest(agent_id=agent, page_token="not-a-token"), "page_token"),
        (pb.ListFeedbackRequest(agent_id=agent, page_size=-1), "page_size"),
        (pb.ListFeedbackRequest(agent_id=agent, min_score=0.8, max_score=0.2), "max_score"),
        (pb.ListFeedbackRequest(agent_id="../etc"), "agent_id"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListFeedback(request)
        assert field_violation(caught.value) == field


# -- stats --------------------------------------------------------------------------------------------


def expected_stats(scores: list[float], comparisons: int, watermark: int) -> dict[str, object]:
    histogram, _ = np.histogram(scores, bins=10, range=(0.0, 1.0))
    return dict(
        feedback_count=len(scores) + comparisons,
        rating_count=len(scores),
        comparison_count=comparisons,
        score_mean=pytest.approx(statistics.fmean(scores)),
        score_std=pytest.approx(statistics.pstdev(scores), abs=1e-12),
        score_min=min(scores),
        score_max=max(scores),
        score_histogram=histogram.tolist(),
        watermark=watermark,
    )


def actual_stats(stats: pb.FeedbackStats) -> dict[str, object]:
    return dict(
        feedback_count=stats.feedback_count,
        rating_count=stats.rating_count,
        comparison_count=stats.comparison_count,
        score_mean=stats.score_mean,
        score_std=stats.score_std,
        score_min=stats.score_min,
        score_max=stats.score_max,
        score_histogram=list(stats.score_histogram),
        watermark=stats.watermark,
    )


def test_stats_match_independent_computation(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    rng = random.Random(7)
    versions = ["v1", "v2", ""]
    items = [rating(agent, score=rng.random(), policy_version=versions[i % 3]) for i in range(90)]
    items += [
        rating(agent, score=0.0, policy_version="v1"),
        rating(agent, score=1.0, policy_version="v2"),
        rating(agent, score=0.5, policy_version=""),
    ]
    items += [comparison(agent, policy_version="v2", rejected=f"r{i}") for i in range(4)]
    acks = stream(stub, items)
    assert all(a.accepted for a in acks)

    answer = stub.GetFeedbackStats(pb.GetFeedbackStatsRequest(agent_id=agent, group_by_policy_version=True))
    scores = [item.score for item in items if item.HasField("score")]
    assert actual_stats(answer.stats) == expected_stats(scores, 4, max(int(a.id) for a in acks))

    by_version = {entry.policy_version: entry.stats for entry in answer.by_policy_version}
    assert sorted(by_version) == ["", "v1", "v2"]
    for version in versions:
        mine = [(item, ack) for item, ack in zip(items, acks, strict=True) if item.policy_version == version]
        version_scores = [item.score for item, _ in mine if item.HasField("score")]
        version_comparisons = sum(1 for item, _ in mine if not item.HasField("score"))
        watermark = max(int(ack.id) for _, ack in mine)
        assert actual_stats(by_version[version]) == expected_stats(version_scores, version_comparisons, watermark)

    # A time window counts only the rows inside it; the bound is a created_at the server stored (the later
    # stream's rows), and which rows fall inside is read from the rows' own created_at values.
    stream(stub, [rating(agent, score=0.2), rating(agent, score=0.4)])
    rows = list_all(stub, agent)
    later_start = max(micros(r) for r in rows)
    inside = [r for r in rows if micros(r) >= later_start]
    outside = [r for r in rows if micros(r) < later_start]
    assert inside and outside, "the two streams were committed with the same timestamp"
    window = stub.GetFeedbackStats(pb.GetFeedbackStatsRequest(agent_id=agent, start_time=timestamp(later_start)))
    inside_scores = [r.score for r in inside if r.HasField("score")]
    assert actual_stats(window.stats) == expected_stats(
        inside_scores, len(inside) - len(inside_scores), inside[0].sequence
    )
    before = stub.GetFeedbackStats(pb.GetFeedbackStatsRequest(agent_id=agent, end_time=timestamp(later_start))).stats
    outside_scores = [r.score for r in outside if r.HasField("score")]
    assert actual_stats(before) == expected_stats(
        outside_scores, len(outside) - len(outside_scores), outside[0].sequence
    )

    empty = stub.GetFeedbackStats(pb.GetFeedbackStatsRequest(agent_id=agent + "-none")).stats
    assert (empty.feedback_count, empty.score_mean, empty.watermark) == (0, 0.0, 0)
    assert list(empty.score_histogram) == [0] * 10


# -- export -------------------------------------------------------------------------------------------


def test_export_watermark_excludes_later_rows(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    initial = stream(
        stub, [rating(agent, score=i / 10) if i % 3 else comparison(agent, rejected=f"r{i}") for i in range(10)]
    )
    initial_ids = [int(a.id) for a in initial]

    export = stub.ExportFeedback(pb.ExportFeedbackRequest(agent_id=agent), timeout=30)
    first = next(export)
    # Rows that arrive once the export has started are not part of it.
    stream(stub, [rating(agent, score=0.3) for _ in range(5)])
    chunks = [first, *export]
    assert len(chunks) == math.ceil(10 / EXPORT_CHUNK)
    assert {c.watermark for c in chunks} == {initial_ids[-1]}
    exported = [row.sequence for c in chunks for row in c.feedback]
    assert exported == initial_ids  # id order, nothing after the watermark

    # Resuming after a sequence, at the recorded watermark, gives the rest and nothing newer.
    watermark = chunks[0].watermark
    resumed = stub.ExportFeedback(
        pb.ExportFeedbackRequest(agent_id=agent, watermark=watermark, after_sequence=initial_ids[4])
    )
    assert [row.sequence for c in resumed for row in c.feedback] == initial_ids[5:]

    ratings = stub.ExportFeedback(
        pb.ExportFeedbackRequest(agent_id=agent, kind=pb.FEEDBACK_KIND_RATING, watermark=watermark)
    )
    assert [row.sequence for c in ratings for row in c.feedback] == [int(a.id) for i, a in enumerate(initial) if i % 3]

    fresh = list(stub.ExportFeedback(pb.ExportFeedbackRequest(agent_id=agent)))
    assert sum(len(c.feedback) for c in fresh) == 15 and fresh[0].watermark > watermark

    nothing = list(stub.ExportFeedback(pb.ExportFeedbackRequest(agent_id=agent + "-none")))
    assert len(nothing) == 1 and nothing[0].watermark == 0 and not nothing[0].feedback


# -- delete -------------------------------------------------------------------------------------------


def test_delete_by_ids_and_all(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    ids = [a.id for a in stream(stub, [rating(agent, score=i / 10) for i in range(6)])]
    neighbour = stub.SubmitFeedback(rating(agent + "-b")).id

    deleted = stub.DeleteFeedback(pb.DeleteFeedbackRequest(agent_id=agent, ids=[ids[0], ids[1], "999999999"]))
    assert deleted.deleted_count == 2
    # Another agent's id is not this agent's to delete.
    assert stub.DeleteFeedback(pb.DeleteFeedbackRequest(agent_id=agent, ids=[neighbour])).deleted_count == 0
    assert sorted(r.id for r in list_all(stub, agent)) == sorted(ids[2:])

    for request, field in [
        (pb.DeleteFeedbackRequest(agent_id=agent, ids=["abc"]), "ids"),
        (pb.DeleteFeedbackRequest(agent_id=agent, ids=["-1"]), "ids"),
        (pb.DeleteFeedbackRequest(agent_id=agent), "ids"),
        (pb.DeleteFeedbackRequest(agent_id=agent, ids=[ids[2]], all=True), "all"),
        (pb.DeleteFeedbackRequest(agent_id="../x", all=True), "agent_id"),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            stub.DeleteFeedback(request)
        assert field_violation(caught.value) == field

    assert stub.DeleteFeedback(pb.DeleteFeedbackRequest(agent_id=agent, all=True)).deleted_count == 4
    assert list_all(stub, agent) == []
    assert [r.id for r in list_all(stub, agent + "-b")] == [neighbour]
    # The stats watermark never goes back to a deleted sequence for new rows.
    new = stub.SubmitFeedback(rating(agent))
    assert int(new.id) > int(ids[-1])


# -- storage alone ------------------------------------------------------------------------------------


@pytest.fixture
def store(database_url: str) -> Iterator[FeedbackStore]:
    engine = make_engine(database_url)
    feedback_store = FeedbackStore(engine)
    feedback_store.create_tables()
    yield feedback_store
    engine.dispose()


def new_item(agent_id: str, request_id: str, score: float = 0.5) -> NewFeedback:
    return NewFeedback(
        agent_id=agent_id,
        kind="rating",
        prompt="p",
        response="r",
        score=score,
        chosen="",
        rejected="",
        margin=None,
        run_id="",
        notes="",
        generation_id="",
        policy_version="",
        metadata_json="{}",
        request_id=request_id,
    )


def test_store_insert_many_is_idempotent_and_survives_a_race(
    store: FeedbackStore, agent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = store.insert_many([new_item(agent, "a"), new_item(agent, "b"), new_item(agent, "a")])
    assert [s.duplicate for s in first] == [False, False, True]
    assert first[2].sequence == first[0].sequence and first[1].sequence > first[0].sequence

    # Another writer inserted "b" after our lookup: the unique constraint fails the group, which is
    # retried as a whole; "b" comes back as the original row and "c" is stored once.
    real_existing = store._existing
    calls = []

    def stale_lookup(conn, items):
        calls.append(1)
        return {} if len(calls) == 1 else real_existing(conn, items)

    monkeypatch.setattr(store, "_existing", stale_lookup)
    second = store.insert_many([new_item(agent, "c"), new_item(agent, "b")])
    assert len(calls) == 2
    assert second[1].duplicate and second[1].sequence == first[1].sequence
    assert not second[0].duplicate
    monkeypatch.undo()
    rows = store.list_feedback(agent, ListFilters(), limit=10)
    assert sorted(r.request_id for r in rows) == ["a", "b", "c"]


def test_store_answers_match_the_rows_on_every_insert_path(
    store: FeedbackStore, agent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite inserts without a lookup first and rolls back when an id was stored before; the sequences it
    answers are counted back from the last rowid, across several INSERT statements per group."""
    import feedback_service.store as store_module

    monkeypatch.setattr(store_module, "_SQLITE_MAX_ROWS_PER_INSERT", 7)  # 20 items: 3 statements
    fresh = store.insert_many([new_item(agent, f"new-{i}", score=i / 20) for i in range(20)])
    # One stored before, in the middle of new ones: nothing of the first (optimistic) try may remain.
    mixed = store.insert_many([new_item(agent, "late-0"), new_item(agent, "new-5"), new_item(agent, "late-1")])
    assert [s.duplicate for s in fresh] == [False] * 20
    assert [s.duplicate for s in mixed] == [False, True, False]
    assert mixed[1].sequence == fresh[5].sequence and mixed[1].score == fresh[5].score
    rows = {r.request_id: r for r in store.list_feedback(agent, ListFilters(), limit=100)}
    assert len(rows) == 22
    answered = {f"new-{i}": s for i, s in enumerate(fresh)} | {"late-0": mixed[0], "late-1": mixed[2]}
    for request_id, stored in answered.items():
        assert rows[request_id].sequence == stored.sequence, request_id
        assert rows[request_id].score == stored.score
    assert len({s.sequence for s in answered.values()}) == 22


class _FailingStore(FeedbackStore):
    """A real SQLite store whose `fail_on`-th group write fails after a while, as a full disk would."""

    def __init__(self, engine, fail_on: int) -> None:  # noqa: ANN001
        super().__init__(engine)
        self.fail_on, self.writes = fail_on, 0

    def insert_many(self, items):  # noqa: ANN001, ANN201
        self.writes += 1
        if self.writes == self.fail_on:
            import time

            time.sleep(0.2)  # the next groups are queued behind this write meanwhile
            raise OSError("database or disk is full")
        return super().insert_many(items)


def test_a_failed_group_commit_ends_the_stream_and_nothing_after_it_is_stored(tmp_path: pathlib.Path) -> None:
    """Commits are pipelined (the next group's write waits in the writer thread while the previous group's
    acks go out); when one fails, the stream fails and the groups queued behind it write nothing."""
    group = 8
    config = FeedbackServiceConfig.from_env(
        server=ServerConfig(service="feedback", data_dir=tmp_path), stream_group_size=group, stream_max_buffered=64
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'feedback.db'}")
    store = _FailingStore(engine, fail_on=3)
    store.create_tables()
    domain = FeedbackDomain(store, config)

    async def source() -> AsyncIterator[list[FeedbackInput]]:
        yield [
            FeedbackInput(agent_id="failing", prompt="p", response="r", score=0.5, request_id=f"r{i}")
            for i in range(10 * group)
        ]

    async def scenario() -> tuple[list[int], BaseException | None]:
        acked: list[int] = []
        try:
            async for acks in domain.ingest_batches(source()):
                acked.extend(ack.index for ack in acks if ack.accepted)
        except OSError as error:
            return acked, error
        finally:
            await domain.close()
        return acked, None

    acked, error = asyncio.run(scenario())
    rows = store.list_feedback("failing", ListFilters(), limit=1000)
    engine.dispose()
    assert error is not None and "disk is full" in str(error)
    assert acked == list(range(2 * group)), "the two groups before the failure, and nothing else"
    assert sorted(int(r.request_id[1:]) for r in rows) == acked


def test_stream_buffering_is_bounded(tmp_path: pathlib.Path) -> None:
    """A client that stops reading acks stops the server from reading more items (bounded memory)."""
    group, capacity = 8, 32
    config = FeedbackServiceConfig.from_env(
        server=ServerConfig(service="feedback", data_dir=tmp_path),
        stream_group_size=group,
        stream_max_buffered=capacity,
    )
    engine = make_engine(f"sqlite:///{tmp_path / 'feedback.db'}")
    feedback_store = FeedbackStore(engine)
    feedback_store.create_tables()
    domain = FeedbackDomain(feedback_store, config)
    pulled = 0

    async def source() -> AsyncIterator[FeedbackInput]:
        nonlocal pulled
        for _ in range(2000):
            pulled += 1
            yield FeedbackInput(agent_id="bounded", prompt="p", response="r", score=0.5)

    async def scenario() -> tuple[int, int]:
        acks = domain.ingest(source())
        received = len(await acks.__anext__())
        await asyncio.sleep(0.3)  # the caller stops taking acks for a while
        stalled_at = pulled
        async for batch in acks:
            received += len(batch)
        await domain.close()
        return stalled_at, received

    stalled_at, received = asyncio.run(scenario())
    engine.dispose()
    # Taken by the caller + 1 group whose commit is handed on + 1 group committing (queued behind it) + the
    # buffer + 1 item in hand.
    assert stalled_at <= group + group + group + capacity + 1
    assert received == 2000


# -- process level ------------------------------------------------------------------------------------


def test_data_survives_a_restart(tmp_path: pathlib.Path) -> None:
    config = make_config(tmp_path)
    with ServerThread(start, config) as server:
        with server.channel() as channel:
            stub = pb_grpc.FeedbackServiceStub(channel)
            acks = stream(stub, [rating("agent-r", score=i / 10, request_id=f"k{i}") for i in range(5)])
    with ServerThread(start, config) as server:
        with server.channel() as channel:
            stub = pb_grpc.FeedbackServiceStub(channel)
            assert sorted(r.id for r in list_all(stub, "agent-r")) == sorted(a.id for a in acks)
            replay = stub.SubmitFeedback(rating("agent-r", request_id="k2"))
            assert replay.duplicate and replay.id == acks[2].id
    assert (tmp_path / "feedback.db").exists()


def FeedbackProcess(data_dir: pathlib.Path) -> ServiceProcess:
    """`python -m feedback_service` on its own SQLite file in data_dir."""
    return ServiceProcess("feedback_service", data_dir, "--database-url", f"sqlite:///{data_dir / 'feedback.db'}")


def test_python_dash_m_serves_and_stops_on_sigterm(tmp_path: pathlib.Path) -> None:
    with FeedbackProcess(tmp_path) as server:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            answer = pb_grpc.FeedbackServiceStub(channel).SubmitFeedback(rating("cli-agent"), timeout=10)
            assert answer.id
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    assert (tmp_path / "feedback.db").exists()


def test_kill_9_mid_stream_keeps_every_acknowledged_item_and_replays_are_idempotent(tmp_path: pathlib.Path) -> None:
    """An ack is a promise: the item is committed. SIGKILL the server while a stream is running, restart it on
    the same data, and every acknowledged item is there with the id its ack gave; sending every item again
    (same request_ids) stores the rest once and nothing twice."""
    agent, count, kill_after = f"crash-{uuid.uuid4().hex[:8]}", 4000, 300
    items = [rating(agent, score=(i % 11) / 10, request_id=f"crash-{i}") for i in range(count)]
    acked: dict[str, str] = {}  # request_id -> id, from acks received before the kill
    with FeedbackProcess(tmp_path) as server:
        with grpc.insecure_channel(server.address) as channel:
            acks = pb_grpc.FeedbackServiceStub(channel).StreamFeedback(
                (pb.StreamFeedbackRequest(feedback=item) for item in items), timeout=120
            )
            with pytest.raises(grpc.RpcError) as cut:
                for ack in acks:
                    assert ack.accepted and not ack.duplicate, ack
                    acked[ack.request_id] = ack.id
                    if len(acked) == kill_after:
                        server.process.send_signal(signal.SIGKILL)  # mid-stream: thousands of items still to go
        assert server.process.wait(timeout=30) == -signal.SIGKILL
    assert cut.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)
    assert kill_after <= len(acked) < count, "the stream must have been cut while it ran"

    with FeedbackProcess(tmp_path) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.FeedbackServiceStub(channel)
            stored = {row.request_id: row.id for row in list_all(stub, agent)}
            missing = {rid for rid in acked if stored.get(rid) != acked[rid]}
            assert not missing, f"{len(missing)} acknowledged items lost or changed, e.g. {sorted(missing)[:5]}"
            # Items committed whose acks never arrived are allowed; nothing may be stored twice.
            assert len(stored) == len(list_all(stub, agent)) >= len(acked)

            again = stream(stub, items)  # the client's retry after the crash: every item, same request_ids
            assert [a.request_id for a in again] == [i.request_id for i in items]
            assert all(a.accepted for a in again)
            assert {a.request_id for a in again if a.duplicate} == set(stored)  # exactly the stored ones
            assert all(a.id == stored[a.request_id] for a in again if a.duplicate)
            final = list_all(stub, agent)
            assert len(final) == count and len({r.request_id for r in final}) == count
            assert {r.request_id: r.id for r in final} == {a.request_id: a.id for a in again}
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
