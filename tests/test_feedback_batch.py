"""Batched StreamFeedback (many items per message, many acknowledgements per response) through real servers:
batches mixed with single items, a bad item rejected alone with its index, duplicates inside and across
batches, acknowledgements only after commit (kill -9), the SDK's batching sender and client, attribution."""

from __future__ import annotations

import collections
import concurrent.futures
import pathlib
import signal
import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest

from feedback_service.app import start
from rlhf.feedback.v1 import feedback_service_pb2 as pb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as pb_grpc
from rlhf.inference.v1 import inference_service_pb2 as inf
from rlhf.inference.v1 import inference_service_pb2_grpc as inf_grpc
from rlhf.sdk.clients import FeedbackClient
from rlhf.sdk.sender import FeedbackSender, SenderConfig
from tests.servers import ServerThread
from tests.test_feedback_service import FeedbackProcess, list_all, make_config, rating

INVALID_UTF8 = b"\xff\xfe"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(start, make_config(tmp_path_factory.mktemp("batch"))) as thread:
        yield thread


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.FeedbackServiceStub]:
    channel = server.channel()
    yield pb_grpc.FeedbackServiceStub(channel)
    channel.close()


@pytest.fixture
def agent() -> str:
    return f"batch-{uuid.uuid4().hex[:12]}"


def flat(responses: list[pb.StreamFeedbackResponse]) -> list:
    """Every acknowledgement in order, whichever form it came in."""
    return [ack for r in responses for ack in (r.results or [r])]


def test_batches_mixed_with_single_items(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    one = lambda i: rating(agent, score=i / 10, request_id=f"m{i}")  # noqa: E731
    messages = [
        pb.StreamFeedbackRequest(feedback=one(0)),
        pb.StreamFeedbackRequest(items=[one(1), one(2), one(3)]),
        pb.StreamFeedbackRequest(feedback=one(4)),
        pb.StreamFeedbackRequest(items=[one(5), one(6)]),
    ]
    responses = list(stub.StreamFeedback(iter(messages), timeout=30))
    acks = flat(responses)
    assert [a.index for a in acks] == list(range(7))
    assert [a.request_id for a in acks] == [f"m{i}" for i in range(7)]
    assert all(a.accepted and not a.duplicate and a.id for a in acks)
    # Single items are answered in the single form, batched ones only inside results.
    singles = [r.index for r in responses if not r.results]
    assert singles == [0, 4]
    assert sorted(a.index for r in responses for a in r.results) == [1, 2, 3, 5, 6]
    stored = {row.request_id: row.id for row in list_all(stub, agent)}
    assert stored == {a.request_id: a.id for a in acks}


def test_a_bad_item_inside_a_batch_is_rejected_alone_with_its_index(
    stub: pb_grpc.FeedbackServiceStub, agent: str
) -> None:
    items = [
        rating(agent, request_id="b0"),
        rating(agent, score=7.0, request_id="b1"),  # out of range
        rating(agent, request_id="b2", kind=9),  # an unknown kind
        rating(agent, request_id="b3"),
        pb.SubmitFeedbackRequest(agent_id=agent, prompt="p", chosen="same", rejected="same", request_id="b4"),
    ]
    acks = flat(list(stub.StreamFeedback(iter([pb.StreamFeedbackRequest(items=items)]), timeout=30)))
    assert [a.accepted for a in acks] == [True, False, False, True, False]
    assert [(a.index, a.field) for a in acks if not a.accepted] == [(1, "score"), (2, "kind"), (4, "rejected")]
    assert sorted(row.request_id for row in list_all(stub, agent)) == ["b0", "b3"]


def test_an_undecodable_item_inside_a_batch_is_rejected_alone(server: ServerThread, agent: str) -> None:
    items = [rating(agent, prompt=f"marker{i}?", request_id=f"u{i}") for i in range(3)]
    data = (
        pb.StreamFeedbackRequest(items=items).SerializeToString().replace(b"marker1", INVALID_UTF8 + b"arker")
    )  # same length
    with server.channel() as channel:
        call = channel.stream_stream(
            "/rlhf.feedback.v1.FeedbackService/StreamFeedback",
            response_deserializer=pb.StreamFeedbackResponse.FromString,
        )
        following = pb.StreamFeedbackRequest(feedback=rating(agent, request_id="u3")).SerializeToString()
        acks = flat(list(call(iter([data, following]), timeout=30)))
        rows = list_all(pb_grpc.FeedbackServiceStub(channel), agent)
    assert [a.accepted for a in acks] == [True, False, True, True]
    assert (acks[1].index, acks[1].field) == (1, "prompt") and "UTF-8" in acks[1].reason
    assert sorted(row.request_id for row in rows) == ["u0", "u2", "u3"]


def test_duplicates_inside_and_across_batches(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    item = lambda key: rating(agent, request_id=key)  # noqa: E731
    messages = [
        pb.StreamFeedbackRequest(items=[item("a"), item("b"), item("a")]),
        pb.StreamFeedbackRequest(items=[item("b"), item("c")]),
    ]
    acks = flat(list(stub.StreamFeedback(iter(messages), timeout=30)))
    assert [(a.request_id, a.accepted, a.duplicate) for a in acks] == [
        ("a", True, False),
        ("b", True, False),
        ("a", True, True),
        ("b", True, True),
        ("c", True, False),
    ]
    assert acks[2].id == acks[0].id and acks[3].id == acks[1].id
    again = flat(list(stub.StreamFeedback(iter(messages[1:]), timeout=30)))  # another stream, later
    assert [(a.duplicate, a.id) for a in again] == [(True, acks[1].id), (True, acks[4].id)]
    assert len(list_all(stub, agent)) == 3


def expanded(responses: list[pb.StreamFeedbackResponse]) -> list[tuple[int, str, str]]:
    """(index, id, form) of every acknowledgement in order; form: "range", "result" or "single"."""
    out = []
    for response in responses:
        forms = [bool(response.stored_ranges), bool(response.results), bool(response.request_id)]
        assert sum(forms) == 1, f"a response carries exactly one form: {response}"
        for stored in response.stored_ranges:
            out += [(stored.first_index + k, str(stored.first_id + k), "range") for k in range(stored.count)]
        out += [(ack.index, ack.id, "result") for ack in response.results]
        if response.request_id:
            out.append((response.index, response.id, "single"))
    return out


def test_compact_acks_acknowledge_new_rows_in_ranges_and_the_rest_one_by_one(
    stub: pb_grpc.FeedbackServiceStub, agent: str
) -> None:
    item = lambda key, **fields: rating(agent, request_id=key, **fields)  # noqa: E731
    stub.SubmitFeedback(item("old"))  # stored before the stream: its replay is a duplicate
    messages = [
        pb.StreamFeedbackRequest(items=[item(f"n{i}") for i in range(5)], compact_acks=True),
        # The flag holds for the rest of the stream.
        pb.StreamFeedbackRequest(
            items=[item("n5"), item("old"), item("n6"), item("bad", score=3.0), item(""), item("n7")]
        ),
        pb.StreamFeedbackRequest(feedback=item("n8")),
        pb.StreamFeedbackRequest(items=[item("n9"), item("n10")]),
    ]
    responses = list(stub.StreamFeedback(iter(messages), timeout=30))
    acks = expanded(responses)
    assert [index for index, _, _ in acks] == list(range(14)), "every item once, in index order"
    forms = [form for _, _, form in acks]
    assert forms == ["range"] * 6 + ["result", "range", "result", "result", "range", "single", "range", "range"]
    results = {ack.index: ack for r in responses for ack in r.results}
    assert results[6].duplicate and results[6].request_id == "old"
    assert (results[8].accepted, results[8].field) == (False, "score")
    assert results[9].accepted and len(results[9].request_id) == 32  # made up by the server, so sent back
    rows = {row.request_id: row.id for row in list_all(stub, agent)}
    sent = ["n0", "n1", "n2", "n3", "n4", "n5", "old", "n6", "bad", results[9].request_id, "n7", "n8", "n9", "n10"]
    for (index, row_id, form), request_id in zip(acks, sent, strict=True):
        if request_id != "bad":
            assert rows[request_id] == row_id, (index, form)
    assert len(rows) == 13


def test_without_compact_acks_every_batched_item_has_its_own_ack(stub: pb_grpc.FeedbackServiceStub, agent: str) -> None:
    """Clients that predate compact acks (the flag unset) get one FeedbackAck per batched item, as before."""
    messages = [pb.StreamFeedbackRequest(items=[rating(agent, request_id=f"p{i}") for i in range(300)])]
    responses = list(stub.StreamFeedback(iter(messages), timeout=30))
    assert not any(r.stored_ranges for r in responses)
    assert [a.index for a in flat(responses)] == list(range(300))


def test_kill_9_after_batched_acks_loses_nothing(tmp_path: pathlib.Path) -> None:
    """Every item acknowledged in a batch response before a SIGKILL is in the database after a restart."""
    agent, count, batch, kill_after = f"crash-{uuid.uuid4().hex[:8]}", 20_000, 100, 1000
    items = [rating(agent, score=(i % 11) / 10, request_id=f"k{i}") for i in range(count)]
    messages = (pb.StreamFeedbackRequest(items=items[i : i + batch]) for i in range(0, count, batch))
    acked: dict[str, str] = {}
    with FeedbackProcess(tmp_path) as server:
        with grpc.insecure_channel(server.address) as channel:
            responses = pb_grpc.FeedbackServiceStub(channel).StreamFeedback(messages, timeout=120)
            with pytest.raises(grpc.RpcError):
                for response in responses:
                    for ack in response.results:
                        assert ack.accepted and not ack.duplicate, ack
                        acked[ack.request_id] = ack.id
                    if len(acked) >= kill_after:
                        server.process.send_signal(signal.SIGKILL)
        assert server.process.wait(timeout=30) == -signal.SIGKILL
    assert kill_after <= len(acked) < count, "the stream must have been cut while it ran"
    with FeedbackProcess(tmp_path) as server:
        with grpc.insecure_channel(server.address) as channel:
            stored = {row.request_id: row.id for row in list_all(pb_grpc.FeedbackServiceStub(channel), agent)}
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
    missing = [rid for rid in acked if stored.get(rid) != acked[rid]]
    assert not missing, f"{len(missing)} acknowledged items lost or changed, e.g. {missing[:5]}"


def test_the_sender_batches_what_is_queued(server: ServerThread, agent: str) -> None:
    total = 3000
    with FeedbackSender(SenderConfig(address=server.address, max_batch_items=200)) as sender:
        for i in range(total):
            sender.submit(agent, prompt=f"Q{i}?", response="A.", score=0.5, request_id=f"s{i}")
        sender.submit(agent, prompt="Q?", response="A.", score=9.0, request_id="bad")
        assert sender.flush(60)
        stats = sender.stats()
    assert stats.acknowledged == total and stats.rejected == 1 and stats.pending == 0
    assert stats.rejections[0].request_id == "bad" and stats.rejections[0].field == "score"
    assert stats.messages < stats.sent / 5, f"hardly batched: {stats}"
    with FeedbackClient(server.address) as client:
        rows, _ = client.export(agent)
    assert sorted(r.request_id for r in rows) == sorted(f"s{i}" for i in range(total))


def test_the_client_stream_batches_and_yields_one_ack_per_item(server: ServerThread, agent: str) -> None:
    """The client asks for compact acks and turns each StoredRange back into a FeedbackAck per item."""
    items = [rating(agent, request_id=f"c{i}") for i in range(1000)]
    items += [rating(agent, score=-1.0), rating(agent, request_id="c3"), rating(agent, request_id="c1000")]
    with FeedbackClient(server.address) as client:
        acks = list(client.stream(items, timeout=60))
        rows = {row.request_id: row.id for row in client.export(agent)[0]}
    assert [a.index for a in acks] == list(range(1003))
    assert all(a.accepted for a in acks[:1000]) and (acks[1000].accepted, acks[1000].field) == (False, "score")
    assert len(acks[1000].request_id) == 32  # a request_id was given to the item that had none
    assert acks[1001].duplicate and acks[1001].id == acks[3].id
    assert [a.request_id for a in acks[:1000]] == [f"c{i}" for i in range(1000)]
    assert {a.request_id: a.id for a in acks if a.accepted} == rows


class Generations(inf_grpc.InferenceServiceServicer):
    """A real gRPC server answering GetGeneration from a table, counting the calls (a stand-in for the
    inference service's generation log; the feedback service's attribution is what is under test)."""

    def __init__(self, known: dict[str, tuple[str, str]]) -> None:
        self.known = known
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def GetGeneration(self, request: inf.GetGenerationRequest, context: grpc.ServicerContext) -> object:
        with self.lock:
            self.calls[request.generation_id] += 1
        if request.generation_id not in self.known:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such generation")
        agent_id, version = self.known[request.generation_id]
        generation = inf.Generation(generation_id=request.generation_id, agent_id=agent_id, policy_version=version)
        return inf.GetGenerationResponse(generation=generation)


def test_batched_items_are_attributed_with_one_lookup_per_generation(tmp_path: pathlib.Path, agent: str) -> None:
    generations = Generations({"g1": (agent, "v3"), "g2": (agent, "v4"), "other": ("someone-else", "v9")})
    inference = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    inf_grpc.add_InferenceServiceServicer_to_server(generations, inference)
    port = inference.add_insecure_port("127.0.0.1:0")
    inference.start()
    try:
        config = make_config(tmp_path)
        config.inference_address = f"127.0.0.1:{port}"
        cited = ["g1", "g2", "g1", "missing", "other", "g2"] * 20
        items = [rating(agent, generation_id=g, request_id=f"a{i}") for i, g in enumerate(cited)]
        items.append(rating(agent, generation_id="g1", policy_version="v7", request_id="explicit"))
        with ServerThread(start, config) as feedback, feedback.channel() as channel:
            stub = pb_grpc.FeedbackServiceStub(channel)
            messages = [pb.StreamFeedbackRequest(items=items[i : i + 25]) for i in range(0, len(items), 25)]
            acks = flat(list(stub.StreamFeedback(iter(messages), timeout=30)))
            assert all(a.accepted for a in acks) and len(acks) == len(items)
            versions = {row.request_id: row.policy_version for row in list_all(stub, agent)}
    finally:
        inference.stop(None)
    expected = {"g1": "v3", "g2": "v4", "missing": "", "other": ""}  # another agent's version is not borrowed
    assert {f"a{i}": expected[g] for i, g in enumerate(cited)} == {k: v for k, v in versions.items() if k != "explicit"}
    assert versions["explicit"] == "v7"  # a version the caller gave is kept
    # Known generations are cached: one lookup each; an unknown one is asked again per commit group at most.
    assert generations.calls["g1"] == generations.calls["g2"] == generations.calls["other"] == 1
    assert generations.calls["missing"] <= len(messages)
