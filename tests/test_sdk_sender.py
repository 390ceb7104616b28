"""The background feedback sender against real feedback servers: a restart of the server process in the middle
of sending loses and duplicates nothing; full queues drop (counted) or block; flush, close, rejections."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from rlhf.sdk.clients import FeedbackClient
from rlhf.sdk.sender import FeedbackSender, SenderClosed, SenderConfig
from tests.helpers import wait_for
from tests.servers import ServerThread, ServiceProcess, feedback_thread

NOWHERE = "127.0.0.1:1"  # nothing listens there: every stream fails at once
FAST = dict(initial_backoff=0.05, max_backoff=0.3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with feedback_thread(tmp_path_factory.mktemp("sender")) as thread:
        yield thread


@pytest.fixture
def agent() -> str:
    return f"sender-{uuid.uuid4().hex[:12]}"


def stored_request_ids(address: str, agent: str) -> list[str]:
    with FeedbackClient(address) as client:
        rows, _ = client.export(agent)
    return [row.request_id for row in rows]


def feedback_process(data_dir: pathlib.Path) -> ServiceProcess:
    return ServiceProcess("feedback_service", data_dir, "--database-url", f"sqlite:///{data_dir / 'feedback.db'}")


def test_a_server_restart_in_the_middle_loses_and_duplicates_nothing(tmp_path: pathlib.Path, agent: str) -> None:
    total = 600
    first = feedback_process(tmp_path)
    where = {"address": first.address}
    # The restarted server listens on another port: the sender asks where before each reconnection.
    sender = FeedbackSender(SenderConfig(resolve_address=lambda: where["address"], max_in_flight=64, **FAST))
    ids: list[str | None] = []

    def produce() -> None:  # an agent submitting at a steady pace, unaware of the restart
        for i in range(total):
            ids.append(sender.submit(agent, prompt=f"Q{i}?", response=f"A{i}.", score=(i % 11) / 10))
            time.sleep(0.002)

    producer = threading.Thread(target=produce)
    second = None
    try:
        producer.start()
        wait_for(lambda: sender.stats().acknowledged >= 100, timeout=30, interval=0.005)
        first.kill()  # SIGKILL, with items in flight: some committed but never acknowledged
        at_kill = sender.stats()
        second = feedback_process(tmp_path)  # same database file, new port
        where["address"] = second.address
        producer.join(60)
        assert sender.flush(60), sender.stats()
        stats = sender.stats()
        stored = stored_request_ids(second.address, agent)
    finally:
        sender.close(5)
        producer.join(5)
        first.kill()
        if second is not None:
            second.kill()
    assert None not in ids and len(set(ids)) == total
    assert len(stored) == total and sorted(stored) == sorted(ids), "lost or stored twice"
    assert at_kill.acknowledged < total and stats.reconnects >= 1
    assert stats.acknowledged == total and stats.rejected == stats.dropped == stats.pending == 0
    # Only unacknowledged items were sent again; those the dead server had committed came back as duplicates.
    assert stats.sent == total + stats.resent and stats.duplicate <= stats.resent <= 64
    print(f"\nrestart: {stats}")


class LossyProxy:
    """A TCP proxy in front of a server; once `frozen` is set it drops everything the server sends back (the
    acknowledgements), as a network that breaks one way would; cut() then closes every connection."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.frozen = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, to_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if not (to_client and self.frozen.is_set()):
                    sink.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def test_items_committed_but_never_acknowledged_are_resent_and_stored_once(server: ServerThread, agent: str) -> None:
    proxy = LossyProxy(server.address)
    where = {"address": proxy.address}
    with FeedbackSender(SenderConfig(resolve_address=lambda: where["address"], **FAST)) as sender:
        before = [sender.submit(agent, prompt=f"Q{i}?", response="A.", score=0.5) for i in range(20)]
        assert sender.flush(10)
        proxy.frozen.set()  # from now on the acknowledgements are lost on the way back
        after = [sender.submit(agent, prompt=f"R{i}?", response="A.", score=0.5) for i in range(30)]
        with FeedbackClient(server.address) as direct:  # the server has committed all 50
            wait_for(lambda: direct.stats(agent).stats.feedback_count == 50, timeout=10, interval=0.02)
        assert sender.stats().acknowledged == 20
        where["address"] = server.address
        proxy.cut()  # the stream breaks; the sender reconnects, straight to the server
        assert sender.flush(10)
        stats = sender.stats()
    # Only the 30 unacknowledged items were sent again, and the server knew them all.
    assert stats.sent == 80 and stats.resent == 30 and stats.duplicate == 30 and stats.acknowledged == 50
    assert sorted(stored_request_ids(server.address, agent)) == sorted(before + after)


def test_drop_mode_counts_what_a_full_queue_drops_and_sends_the_rest(server: ServerThread, agent: str) -> None:
    where = {"address": NOWHERE}
    config = SenderConfig(
        resolve_address=lambda: where["address"], when_full="drop", max_queue=5, max_in_flight=2, **FAST
    )
    with FeedbackSender(config) as sender:
        began = time.monotonic()
        ids = [sender.submit(agent, prompt=f"Q{i}?", response="A.", score=0.5) for i in range(50)]
        assert time.monotonic() - began < 1.0, "drop mode must never make the agent wait"
        kept = [i for i in ids if i is not None]
        stats = sender.stats()
        assert stats.dropped == 50 - len(kept) >= 50 - 5 - 2 and stats.queued == len(kept)
        assert stats.acknowledged == 0
        wait_for(lambda: sender.stats().reconnects >= 2, timeout=10, interval=0.01)  # it keeps trying
        where["address"] = server.address  # the service appears
        assert sender.flush(30)
        stats = sender.stats()
    assert stats.acknowledged == len(kept) and stats.dropped == 50 - len(kept) and stats.pending == 0
    assert sorted(stored_request_ids(server.address, agent)) == sorted(kept)


def test_block_mode_waits_for_room_at_most_block_timeout(agent: str) -> None:
    config = SenderConfig(address=NOWHERE, max_queue=2, max_in_flight=1, block_timeout=0.1, **FAST)
    sender = FeedbackSender(config)
    try:
        began = time.monotonic()
        ids = [sender.submit(agent, prompt="Q?", response="A.", score=0.5) for _ in range(6)]
        waited = time.monotonic() - began
        dropped = ids.count(None)
        assert dropped >= 3 and sender.stats().dropped == dropped
        assert waited >= 0.1 * dropped * 0.9
    finally:
        sender.close(0)


def test_flush_times_out_and_close_counts_what_was_abandoned(agent: str) -> None:
    sender = FeedbackSender(SenderConfig(address=NOWHERE, **FAST))
    for i in range(3):
        sender.submit(agent, prompt=f"Q{i}?", response="A.", score=0.5)
    began = time.monotonic()
    assert sender.flush(0.3) is False
    assert 0.3 <= time.monotonic() - began < 2
    assert sender.stats().pending == 3
    assert sender.close(timeout=0.2) is False
    stats = sender.stats()
    assert stats.abandoned == 3 and stats.acknowledged == 0
    assert not sender._thread.is_alive()
    with pytest.raises(SenderClosed):
        sender.submit(agent, prompt="Q?", response="A.", score=0.5)


def test_close_sends_everything_first(server: ServerThread, agent: str) -> None:
    sender = FeedbackSender(SenderConfig(address=server.address))
    ids = [sender.submit(agent, prompt=f"Q{i}?", response="A.", score=0.5) for i in range(20)]
    assert sender.close(timeout=30) is True
    stats = sender.stats()
    assert stats.acknowledged == 20 and stats.abandoned == stats.pending == 0 and stats.reconnects == 0
    assert sorted(stored_request_ids(server.address, agent)) == sorted(ids)
    assert not sender._thread.is_alive()
    with pytest.raises(SenderClosed):
        sender.submit(agent, prompt="Q?", response="A.", score=0.5)


def test_rejected_items_are_counted_and_not_retried(server: ServerThread, agent: str) -> None:
    with FeedbackSender(SenderConfig(address=server.address)) as sender:
        good = [sender.submit(agent, prompt=f"Q{i}?", response="A.", score=0.5) for i in range(10)]
        bad_score = sender.submit(agent, prompt="Q?", response="A.", score=1.5)
        no_prompt = sender.submit(agent, prompt="", response="A.", score=0.5)
        sender.submit(agent, prompt="Q?", response="A.", score=0.5, request_id=good[0])  # a replay
        assert sender.flush(30)
        stats = sender.stats()
    assert stats.acknowledged == 11 and stats.duplicate == 1 and stats.rejected == 2
    assert stats.sent == 13 and stats.resent == 0, "a rejected item is not sent again"
    assert {(r.request_id, r.field) for r in stats.rejections} == {(bad_score, "score"), (no_prompt, "prompt")}
    assert sorted(stored_request_ids(server.address, agent)) == sorted(good)


def test_a_sender_left_open_sends_what_it_holds_when_the_program_exits(server: ServerThread, agent: str) -> None:
    code = (
        "from rlhf.sdk import FeedbackSender, SenderConfig\n"
        f"sender = FeedbackSender(SenderConfig(address={server.address!r}))\n"
        f"for i in range(50): sender.submit({agent!r}, prompt=f'Q{{i}}?', response='A.', score=0.5)\n"
    )
    root = pathlib.Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
    assert len(stored_request_ids(server.address, agent)) == 50
