"""The typed clients, blocking and asyncio, against a real feedback server on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import pathlib
import re
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.sdk.clients import AsyncFeedbackClient, AsyncPolicyClient, FeedbackClient
from tests.servers import ServerThread, feedback_thread


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with feedback_thread(tmp_path_factory.mktemp("sdk")) as thread:
        yield thread


@pytest.fixture
def agent() -> str:
    return f"sdk-{uuid.uuid4().hex[:12]}"


def rating(agent: str, i: int, score: float = 0.5, **fields) -> fb.SubmitFeedbackRequest:
    return fb.SubmitFeedbackRequest(agent_id=agent, prompt=f"Q{i}?", response=f"A{i}.", score=score, **fields)


def test_submit_sets_a_request_id_so_a_retry_stores_once(server: ServerThread, agent: str) -> None:
    with FeedbackClient(server.address) as client:
        first = client.submit(agent, prompt="Q?", response="A.", score=0.8)
        assert len(first.request_id) == 32 and not first.duplicate
        # The caller's own retry with the answer's request_id: the original row, nothing new stored.
        again = client.submit(agent, prompt="Q?", response="A.", score=0.8, request_id=first.request_id)
        assert again.duplicate and again.id == first.id
        other = client.submit(agent, prompt="Q?", response="A.", score=0.8)
        assert other.request_id != first.request_id and other.id != first.id
        assert client.stats(agent).stats.feedback_count == 2
        rows, next_token = client.list_feedback(agent, page_size=10)
        assert next_token == "" and {r.request_id for r in rows} == {first.request_id, other.request_id}


def test_submit_retries_while_the_service_is_unavailable(tmp_path: pathlib.Path, agent: str) -> None:
    # A client pointed at a port where the server starts a moment later: submit waits it out (same request id).
    with feedback_thread(tmp_path) as early:
        address = early.address
    port = int(address.rsplit(":", 1)[1])
    holder: dict[str, ServerThread] = {}
    starter = threading.Timer(0.6, lambda: holder.setdefault("s", feedback_thread(tmp_path, port).__enter__()))
    starter.start()
    try:
        with FeedbackClient(address, timeout=5) as client:
            began = time.monotonic()
            answer = client.submit(agent, prompt="Q?", response="A.", score=0.1, retries=6)
            assert answer.id and time.monotonic() - began >= 0.5
    finally:
        starter.join()
        if "s" in holder:
            holder["s"].stop()


def test_submit_does_not_retry_invalid_input(server: ServerThread, agent: str) -> None:
    with FeedbackClient(server.address) as client:
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            client.submit(agent, prompt="Q?", response="A.", score=1.5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "score" in error.value.details()
        assert time.monotonic() - began < 0.5


def test_stream_yields_each_acknowledgement_before_the_stream_ends(server: ServerThread, agent: str) -> None:
    # The requests wait for the first acknowledgement: a client that collected everything would deadlock.
    first_ack = threading.Event()

    def items():
        yield rating(agent, 0)
        assert first_ack.wait(10), "no acknowledgement arrived while the stream was open"
        yield rating(agent, 1, request_id="mine")
        yield rating(agent, 2, score=7.0)

    with FeedbackClient(server.address) as client:
        acks = []
        for ack in client.stream(items(), timeout=20):
            acks.append(ack)
            first_ack.set()
        assert [a.index for a in acks] == [0, 1, 2]
        assert [a.accepted for a in acks] == [True, True, False] and acks[2].field == "score"
        assert len(acks[0].request_id) == 32 and acks[1].request_id == "mine"
        assert client.stats(agent).stats.feedback_count == 2


def test_asyncio_client_has_the_same_methods(server: ServerThread, agent: str) -> None:
    async def main() -> None:
        async with AsyncFeedbackClient(server.address) as client:
            answer = await client.submit(agent, prompt="Q?", response="A.", score=0.25)
            assert answer.id and len(answer.request_id) == 32

            async def items():
                for i in range(5):
                    yield rating(agent, i, request_id=f"a{i}")
                yield rating(agent, 0, request_id="a0")  # a replay: duplicate

            acks = [ack async for ack in client.stream(items())]
            assert [a.accepted for a in acks] == [True] * 6 and [a.duplicate for a in acks] == [False] * 5 + [True]
            # A plain list works too.
            acks = [ack async for ack in client.stream([rating(agent, 9)])]
            assert acks[0].accepted
            stats = await client.stats(agent)
            assert stats.stats.feedback_count == 7
            rows, watermark = await client.export(agent)
            assert len(rows) == 7 and watermark == max(r.sequence for r in rows)
            assert await client.delete_feedback(agent, all=True) == 7
            assert (await client.stats(agent)).stats.feedback_count == 0
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.submit(agent, prompt="", response="A.", score=0.5)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())


def test_asyncio_clients_of_other_services_fail_with_the_grpc_status(agent: str) -> None:
    # Nothing listens on port 1: UNAVAILABLE as a grpc.aio error, not a hang.
    async def main() -> None:
        async with AsyncPolicyClient("127.0.0.1:1", timeout=5) as client:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.list_policies(agent)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_the_readme_client_sdk_examples_run_as_shown(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Client SDK (Python)") :]
    section = section[: section.index("\n### ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    with feedback_thread(tmp_path) as server:
        for block in blocks:
            exec(block.replace("127.0.0.1:50051", server.address), {})  # only the address differs
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"1 [0-9a-f]{32} False", lines[0])
    expected = ["1 True", "0 True", "1 True", "2 False score", "4 0.6", "True", "True"]
    assert [line.strip() for line in lines[1:8]] == expected
    assert lines[8].startswith("SenderStats(queued=100, sent=100, resent=0, acknowledged=100, duplicate=0")


def test_algorithm_names_map_to_the_contracts_numbers():
    from rlhf.policy.v1 import policy_service_pb2 as pol
    from rlhf.sdk.clients import algorithm_number

    assert [algorithm_number(n) for n in ("ppo", "GRPO", "rloo")] == [
        pol.ALGORITHM_PPO,
        pol.ALGORITHM_GRPO,
        pol.ALGORITHM_RLOO,
    ]
    with pytest.raises(ValueError, match="unknown algorithm 'dpo'"):
        algorithm_number("dpo")
