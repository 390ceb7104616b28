"""A background feedback sender for agent runtimes: the agent hands items over and goes on; one thread streams
them to the feedback service on one StreamFeedback call and survives the service going away.

    with FeedbackSender(SenderConfig(address="127.0.0.1:50051")) as sender:
        sender.submit("my_agent", prompt="Q?", response="A.", score=0.8)
        ...
        sender.flush(timeout=5)          # optional: wait until the service has committed everything
    # close() (leaving the block, or the program ending) sends what is left, for up to close_timeout
    print(sender.stats())                # sent, acknowledged, duplicate, rejected, dropped, ...

How nothing is lost or stored twice: every item gets a request_id (the feedback service's idempotency key)
when it is submitted. An item stays "unacknowledged" from the moment it is handed to a stream until the
service acknowledges it (an ack is sent only once the item is committed). When the stream breaks, the sender
reconnects with exponential backoff and re-sends exactly the unacknowledged items, first and in order; one
that had been committed before the break comes back as a duplicate (counted), and is stored once.
A rejected item (invalid input) is counted and logged, never retried.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import itertools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import grpc

from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from rlhf.runtime.config import service_address
from rlhf.sdk.clients import channel, feedback_request, stream_message, with_request_id

log = logging.getLogger(__name__)
_POLL = 0.05  # how often a waiting stream checks whether it should end (seconds)
_CONNECT_WAIT = 1.0  # how long one attempt waits for the connection before backing off (seconds)


@dataclasses.dataclass
class SenderConfig:
    """How a FeedbackSender reaches the feedback service, buffers and retries."""

    # host:port of the feedback service; empty: RLHF_FEEDBACK_ADDR, else 127.0.0.1:50051.
    address: str = ""
    # Called before every (re)connection for the address to use (service discovery, a restarted server on
    # another port); when set, `address` is ignored.
    resolve_address: Callable[[], str] | None = None
    # Items the queue holds before it is full (items handed to the stream but not yet acknowledged are
    # counted by max_in_flight instead).
    max_queue: int = 10_000
    # When the queue is full: "block" makes submit() wait for room (at most block_timeout seconds, then the
    # item is dropped), "drop" drops the new item at once. Dropped items are counted, never sent.
    when_full: Literal["block", "drop"] = "block"
    # "block" mode: the longest submit() waits for room, in seconds; None waits as long as it takes.
    block_timeout: float | None = None
    # Items sent on the stream and not yet acknowledged, at most; the stream waits for acks beyond it.
    max_in_flight: int = 4_096
    # Items per stream message, at most: the sender sends whatever is queued (up to this many, and up to
    # max_batch_bytes) as one message, so a busy agent pays one message per batch, not per item, and a quiet
    # one still sends each item within `linger`.
    max_batch_items: int = 512
    # Serialised item bytes per stream message, at most (one larger item still goes, alone).
    max_batch_bytes: int = 1024 * 1024
    # How long a partial batch waits for more items before it is sent, in seconds: a steady trickle then
    # costs at most ~1/linger messages per second instead of one per item, for that much latency.
    linger: float = 0.002
    # Reconnection backoff: the first wait, the factor per failed attempt, and the longest wait (seconds);
    # each wait is jittered by +-jitter (a fraction). A stream that got an acknowledgement resets it.
    initial_backoff: float = 0.1
    backoff_multiplier: float = 2.0
    max_backoff: float = 10.0
    jitter: float = 0.2
    # How long close() (and leaving a `with` block) waits for unacknowledged items, in seconds; None: as
    # long as it takes.
    close_timeout: float | None = 10.0
    # How many rejected items (request_id, field, reason) stats() keeps, newest last.
    keep_rejections: int = 100

    def __post_init__(self) -> None:
        if self.when_full not in ("block", "drop"):
            raise ValueError(f"when_full must be 'block' or 'drop', not {self.when_full!r}")
        if self.max_queue < 1 or self.max_in_flight < 1 or self.max_batch_items < 1:
            raise ValueError("max_queue, max_in_flight and max_batch_items must be at least 1")


@dataclasses.dataclass(frozen=True)
class Rejection:
    """An item the feedback service refused (invalid input): not stored, not retried."""

    request_id: str
    field: str
    reason: str


@dataclasses.dataclass(frozen=True)
class SenderStats:
    """Counters of one FeedbackSender since it started."""

    # Items submit() accepted into the queue.
    queued: int
    # Item transmissions on a stream, re-sends after a reconnection included.
    sent: int
    # Of `sent`: re-sends of unacknowledged items after a reconnection.
    resent: int
    # Items the service acknowledged as stored (now, or earlier: duplicate).
    acknowledged: int
    # Of `acknowledged`: items the service already had (their request_id was stored before).
    duplicate: int
    # Items the service refused (invalid input); not stored, not retried.
    rejected: int
    # Items dropped because the queue was full.
    dropped: int
    # Items still unacknowledged when close() gave up waiting; they may or may not have been stored.
    abandoned: int
    # Items queued or sent and not yet acknowledged or rejected.
    pending: int
    # Connection attempts after the first one (reconnections).
    reconnects: int
    # The newest rejections (at most config.keep_rejections).
    rejections: tuple[Rejection, ...]
    # Stream messages sent: a batch of items is one message (sent / messages is the mean batch size).
    messages: int = 0


class SenderClosed(RuntimeError):
    """submit() after close()."""


class FeedbackSender:
    """Sends feedback items to the feedback service from a background thread (see the module docstring)."""

    def __init__(self, config: SenderConfig | None = None) -> None:
        self.config = config or SenderConfig()
        self._queue: queue.Queue[fb.SubmitFeedbackRequest] = queue.Queue(self.config.max_queue)
        self._lock = threading.Condition()
        # Items handed to a stream and not yet acknowledged, by a number of their own (request_ids may repeat).
        self._unacked: dict[int, fb.SubmitFeedbackRequest] = {}
        self._numbers = itertools.count()
        # Of those, the ones already sent on some stream (a send of one of them is a re-send).
        self._transmitted: set[int] = set()
        # Unacknowledged items the current stream still has to (re-)send, first.
        self._resend: collections.deque[int] = collections.deque()
        self._stream = 0  # the current stream's number; an older stream's request generator stops
        self._counts = collections.Counter[str]()
        self._rejections: collections.deque[Rejection] = collections.deque(maxlen=self.config.keep_rejections)
        self._closing = threading.Event()  # no new items; the stream ends once everything is acknowledged
        self._stop = threading.Event()  # end now
        self._call: Any = None
        self._channel: grpc.Channel | None = None
        self._address = ""
        self._thread = threading.Thread(target=self._run, name="feedback-sender", daemon=True)
        self._thread.start()
        # A sender left open when the program ends still sends what it holds (up to config.close_timeout).
        atexit.register(self.close)

    # -- the agent's side ---------------------------------------------------------------------------

    def submit(self, agent_id: str, **fields: Any) -> str | None:
        """Queue one item (fields of SubmitFeedbackRequest: prompt, response, score, or chosen/rejected,
        run_id, notes, generation_id, metadata, request_id...). Returns its request_id, or None when it was
        dropped because the queue was full."""
        return self.submit_request(feedback_request(agent_id, **fields))

    def submit_request(self, item: fb.SubmitFeedbackRequest) -> str | None:
        """Queue a ready SubmitFeedbackRequest (given a request_id if it has none); see submit()."""
        if self._closing.is_set():
            raise SenderClosed("the feedback sender is closed")
        item = with_request_id(item)
        block = self.config.when_full == "block"
        with self._lock:
            self._counts["pending"] += 1
        try:
            self._queue.put(item, block=block, timeout=self.config.block_timeout if block else None)
        except queue.Full:
            with self._lock:
                self._counts["pending"] -= 1
                self._counts["dropped"] += 1
            return None
        with self._lock:
            self._counts["queued"] += 1
        return item.request_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every item submitted so far is acknowledged or rejected; False if `timeout` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._counts["pending"] > 0:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._lock.wait(left if left is not None else 1.0)
        return True

    def close(self, timeout: float | None = -1.0) -> bool:
        """Stop taking items, send what is left (waiting at most `timeout` seconds, by default
        config.close_timeout; None: as long as it takes), end the stream and the thread. True when everything
        was acknowledged or rejected; what was not is counted as abandoned."""
        atexit.unregister(self.close)
        self._closing.set()
        done = self.flush(self.config.close_timeout if timeout == -1.0 else timeout)
        self._stop.set()
        call = self._call
        if call is not None and not done:
            call.cancel()
        self._thread.join(10)
        with self._lock:
            self._counts["abandoned"] = self._counts["pending"]
        if self._channel is not None:
            self._channel.close()
        return done

    def stats(self) -> SenderStats:
        with self._lock:
            c = self._counts
            return SenderStats(
                queued=c["queued"],
                sent=c["sent"],
                resent=c["resent"],
                acknowledged=c["acknowledged"],
                duplicate=c["duplicate"],
                rejected=c["rejected"],
                dropped=c["dropped"],
                abandoned=c["abandoned"],
                pending=c["pending"],
                reconnects=max(0, c["streams"] - 1),
                rejections=tuple(self._rejections),
                messages=c["messages"],
            )

    def __enter__(self) -> FeedbackSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the background thread ----------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if self._closing.is_set() and self._nothing_pending():
                return
            acknowledged, failure = self._one_stream()
            if self._stop.is_set():
                return
            if acknowledged:
                failures = 0
            if failure:
                # Once per outage; the attempts that follow are debug noise.
                level = logging.WARNING if failures == 0 else logging.DEBUG
                log.log(level, "feedback stream to %s broke (%s); reconnecting", self._address or "?", failure)
            failures += 1
            self._stop.wait(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        c = self.config
        delay = min(c.max_backoff, c.initial_backoff * c.backoff_multiplier ** (failures - 1))
        return delay * random.uniform(1 - c.jitter, 1 + c.jitter)

    def _nothing_pending(self) -> bool:
        with self._lock:
            return self._counts["pending"] == 0

    def _connect(self) -> fb_grpc.FeedbackServiceStub:
        c = self.config
        address = c.resolve_address() if c.resolve_address else c.address or service_address("feedback")
        if self._channel is None or address != self._address:
            if self._channel is not None:
                self._channel.close()
            # grpc's own reconnection backoff (up to 2 minutes by default) would keep failing our streams
            # fast long after the service is back: bound it by ours.
            options = [
                ("grpc.initial_reconnect_backoff_ms", max(1, int(c.initial_backoff * 1000))),
                ("grpc.min_reconnect_backoff_ms", max(1, int(c.initial_backoff * 1000))),
                ("grpc.max_reconnect_backoff_ms", max(1, int(c.max_backoff * 1000))),
            ]
            self._channel, self._address = channel(address, options), address
        return fb_grpc.FeedbackServiceStub(self._channel)

    def _one_stream(self) -> tuple[bool, str]:
        """Open a stream, re-send the unacknowledged items, then send new ones as they come, until the
        stream ends (closing) or breaks. Returns whether any item was acknowledged, and why it broke ("" if
        it did not)."""
        acknowledged = False
        call = None
        try:
            stub = self._connect()
            with self._lock:
                self._counts["streams"] += 1  # attempts count, connected or not
            if not self._wait_ready():
                return acknowledged, "UNAVAILABLE: the feedback service is not reachable"
            with self._lock:
                self._stream += 1
                stream = self._stream
                self._resend = collections.deque(self._unacked)
            sent: list[int] = []  # the number of the item at each index of this stream
            call = self._call = stub.StreamFeedback(self._requests(stream, sent))
            for response in call:
                # Items stored as new rows come in `stored_ranges` (compact acks), other acks of a batch in
                # `results`, and a single item's in the response itself.
                if response.stored_ranges:
                    self._acknowledge_stored(response.stored_ranges, sent)
                for ack in response.results or (() if response.stored_ranges else (response,)):
                    self._acknowledge(ack, sent)
                acknowledged = True
            return acknowledged, ""
        except grpc.RpcError as error:
            return acknowledged, f"{error.code().name}: {error.details()}"
        except Exception as error:  # noqa: BLE001 - e.g. resolve_address failed; the thread must go on
            log.exception("feedback stream failed")
            return acknowledged, repr(error)
        finally:
            with self._lock:
                self._stream += 1  # this stream's request generator stops
                self._lock.notify_all()
            if call is not None:
                call.cancel()
            self._call = None

    def _wait_ready(self) -> bool:
        """Wait (up to _CONNECT_WAIT seconds, or until stopped) for the channel to connect. Opening a stream on
        a dead connection would hand grpc a whole batch of re-sends just to fail again."""
        ready = grpc.channel_ready_future(self._channel)
        deadline = time.monotonic() + _CONNECT_WAIT
        try:
            while not self._stop.is_set():
                try:
                    ready.result(timeout=_POLL)
                    return True
                except grpc.FutureTimeoutError:
                    if time.monotonic() >= deadline:
                        return False
            return False
        finally:
            ready.cancel()

    def _requests(self, stream: int, sent: list[int]) -> Iterator[fb.StreamFeedbackRequest]:
        """The messages of one stream (runs in grpc's thread): whatever is queued, up to a batch, per message.
        Every item is put among the unacknowledged before it is handed to grpc, so one lost with a broken
        stream is re-sent by the next."""
        while True:
            numbers = self._next_batch(stream)
            if numbers is None:
                return
            with self._lock:
                if stream != self._stream:
                    continue  # the next _next_batch ends this stream; the items stay unacknowledged
                items = [self._unacked[n] for n in numbers if n in self._unacked]
                sent.extend(n for n in numbers if n in self._unacked)
                self._counts["sent"] += len(items)
                self._counts["messages"] += bool(items)
                resent = self._transmitted.intersection(numbers)
                self._counts["resent"] += len(resent)
                self._transmitted.update(numbers)
            if items:
                yield stream_message(items)

    def _next_batch(self, stream: int) -> list[int] | None:
        """The numbers of the next message's items: waits for one, then takes whatever else is ready (re-sends
        first, then the queue) up to a batch and within max_in_flight. None when the stream should end."""
        first = self._next_item(stream)
        if first is None:
            return None
        c = self.config
        numbers = [first]
        with self._lock:
            size = self._unacked[first].ByteSize() if first in self._unacked else 0
            while len(numbers) < c.max_batch_items and size < c.max_batch_bytes and self._resend:
                number = self._resend[0]
                item = self._unacked.get(number)
                if item is not None and numbers and size + item.ByteSize() > c.max_batch_bytes:
                    break
                self._resend.popleft()
                numbers.append(number)
                size += item.ByteSize() if item is not None else 0
            if self._resend:
                return numbers  # re-sends first: new items wait for the next message
            room = min(c.max_batch_items - len(numbers), c.max_in_flight - len(self._unacked))
        deadline = time.monotonic() + c.linger
        while room > 0 and size < c.max_batch_bytes:
            try:
                left = deadline - time.monotonic()
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                number = next(self._numbers)
                self._unacked[number] = item
                if stream != self._stream:
                    self._resend.append(number)  # this stream ended meanwhile: the current one sends it
                    break
            numbers.append(number)
            size += item.ByteSize()
            room -= 1
        return numbers

    def _next_item(self, stream: int) -> int | None:
        """The number of the next item to send on `stream`, or None when the stream should end."""
        while True:
            with self._lock:
                if stream != self._stream or self._stop.is_set():
                    return None
                if self._resend:
                    return self._resend.popleft()
                if len(self._unacked) >= self.config.max_in_flight:
                    self._lock.wait(_POLL)
                    continue
            try:
                item = self._queue.get(timeout=_POLL)
            except queue.Empty:
                if self._closing.is_set() and self._queue.empty():
                    with self._lock:
                        if not self._resend:
                            return None  # half-close: the service acknowledges what it has, then ends
                continue
            with self._lock:
                number = next(self._numbers)
                self._unacked[number] = item
                if stream != self._stream:
                    # This stream ended while we waited: the current one sends it.
                    self._resend.append(number)
                    return None
                return number

    def _settle(self, index: int, sent: list[int]) -> fb.SubmitFeedbackRequest | None:
        """Take the item at stream `index` out of the unacknowledged ones (under the lock); None, logged, for an
        index this stream did not send."""
        number = sent[index] if 0 <= index < len(sent) else None
        item = self._unacked.pop(number, None) if number is not None else None
        self._transmitted.discard(number)
        if item is None:
            log.error("acknowledgement for an item this stream did not send (index %d)", index)
        return item

    def _acknowledge_stored(self, ranges: Iterable[fb.StoredRange], sent: list[int]) -> None:
        """Items the service stored as new rows, a range at a time (compact acks)."""
        with self._lock:
            for stored in ranges:
                for index in range(stored.first_index, stored.first_index + stored.count):
                    if self._settle(index, sent) is not None:
                        self._counts["acknowledged"] += 1
                        self._counts["pending"] -= 1
            self._lock.notify_all()

    def _acknowledge(self, ack: fb.StreamFeedbackResponse, sent: list[int]) -> None:
        with self._lock:
            item = self._settle(ack.index, sent)
            if item is None:
                return
            if ack.accepted:
                self._counts["acknowledged"] += 1
                self._counts["duplicate"] += ack.duplicate
            else:
                self._counts["rejected"] += 1
                self._rejections.append(Rejection(item.request_id, ack.field, ack.reason))
                log.warning("feedback item %s rejected: %s %s", item.request_id, ack.field, ack.reason)
            self._counts["pending"] -= 1
            self._lock.notify_all()
