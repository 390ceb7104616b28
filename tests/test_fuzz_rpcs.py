"""Property-based fuzzing of every RPC of the four services over real gRPC servers (issue 9).

Requests are generated from the contracts' message descriptors (a field added later is fuzzed without touching
this file), mixed with values that broke things before (ids with a trailing newline, tiny and huge floats, open
enum numbers, tokens that are not ours), and sent as raw undecodable bytes too. Whatever arrives:
- no answer is UNKNOWN, INTERNAL, UNAVAILABLE or a missed deadline (a hung server);
- no server dies (each still answers its health check);
- a refused request leaves nothing behind (every table of every service's database, and the artifact folders,
  read the same before and after).

Fuzz input never trains: TrainPolicy is sent as a dry run, and requests that could start training name agents
that have no feedback (feedback writes and training requests use disjoint agent names), so the reward and policy
services can only refuse them. Bounded for the suite (RLHF_FUZZ_EXAMPLES examples per RPC, default 8);
`RLHF_FUZZ_EXAMPLES=300 pytest tests/test_fuzz_rpcs.py` is the longer run.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sqlite3
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.inference.v1 import inference_service_pb2 as inf
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.runtime import validation
from rlhf.runtime.errors import InvalidArgument
from tests.stack import start_stack

EXAMPLES = int(os.environ.get("RLHF_FUZZ_EXAMPLES", "8"))
TIMEOUT = 60.0
FORBIDDEN = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Contracts and the stack's server serving each.
CONTRACTS = {"feedback": fb, "reward": rw, "policy": pol, "inference": inf}
# RPCs whose requests could start training: their agents must never have feedback.
TRAINING = {"CreateTrainingJob", "TrainPolicy", "ResumeTrainingJob"}
FEEDBACK_WRITES = {"SubmitFeedback", "StreamFeedback"}

TRICKY_STRINGS = [
    "",
    "a",
    "agent",
    "agent\n",
    "..",
    "..\n",
    ".",
    "v1",
    "v1\n",
    "v0",
    "v99999999999",
    "latest",
    "base",
    "cpu",
    "cuda:99",
    "auto\n",
    "²",
    "9" * 19,
    "-1",
    " ",
    "\x00",
    "x" * 65,
    "€" * 300,
    "../../etc/passwd",
    "/",
    "reward_model",
    "length_penalty",
    "regex",
    "ZmVlZGJhY2s6MQ",  # an opaque page token of ours ("feedback:1")
]
TRICKY_FLOATS = [0.0, -0.0, 1.0, 0.5, -1.0, 1e-300, 5e-324, 1e308, -1e308, float("nan"), float("inf"), float("-inf")]
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


# -- requests from descriptors -------------------------------------------------------------------------------


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(TRICKY_STRINGS), st.text(max_size=24))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=24)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(
            st.sampled_from(TRICKY_FLOATS), st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
        )
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-3, 100))  # proto3 enums are open
    low, high = INT_RANGES[kind]
    edges = [v for v in (0, 1, -1, 2, 8, 64, 1000, 10**6, low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def values(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Some of the message's fields, each with a value for its type (nested messages to depth 3)."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            if value.message_type is not None and depth >= 3:
                continue
            inner = values(value.message_type, depth + 1) if value.message_type is not None else scalar(value)
            fields[field.name] = st.dictionaries(scalar(key), inner, max_size=3)
        elif entry is not None:
            if depth >= 3:
                continue
            inner = values(entry, depth + 1)
            fields[field.name] = st.lists(inner, max_size=3) if _repeated(field) else inner
        else:
            fields[field.name] = st.lists(scalar(field), max_size=4) if _repeated(field) else scalar(field)
    return st.fixed_dictionaries({}, optional=fields)


def _repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def fill(message: Message, chosen: dict[str, Any]) -> Message:
    for name, value in chosen.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            if entry.fields_by_name["value"].message_type is None:
                getattr(message, name).update(value)
            else:
                for key, item in value.items():
                    fill(getattr(message, name)[key], item)
        elif entry is not None and _repeated(field):
            for item in value:
                fill(getattr(message, name).add(), item)
        elif entry is not None:
            fill(getattr(message, name), value)
            getattr(message, name).SetInParent()
        elif _repeated(field):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def requests(method: MethodDescriptor) -> st.SearchStrategy[Message]:
    cls = message_class(method.input_type)
    built = values(method.input_type).map(lambda chosen: fill(cls(), chosen))
    return built.map(lambda request: keep_from_training(method.name, request))


def keep_from_training(rpc: str, request: Message) -> Message:
    """Valid agent ids go to disjoint namespaces: agents of training requests never have feedback."""
    for message in _with_agent_ids(request):
        try:
            validation.agent_id(message.agent_id)
        except InvalidArgument:
            continue  # stays invalid: the refusal is what is fuzzed
        prefix = "t" if rpc in TRAINING else "f"
        message.agent_id = (prefix + message.agent_id)[:64]
    if rpc == "TrainPolicy":
        request.dry_run = True
    return request


def _with_agent_ids(message: Message) -> list[Message]:
    found = [message] if "agent_id" in message.DESCRIPTOR.fields_by_name else []
    for field, value in message.ListFields():
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for item in value if _repeated(field) else [value]:
                found += _with_agent_ids(item)
    return found


def undecodable(method: MethodDescriptor) -> st.SearchStrategy[bytes]:
    """A valid request's bytes with invalid UTF-8 in a string field, or bytes that are no message at all."""
    garbled = st.tuples(requests(method), st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88"]))
    strings = [f for f in method.input_type.fields if f.type == FieldDescriptor.TYPE_STRING and not _repeated(f)]

    def corrupt(pair: tuple[Message, bytes]) -> bytes:
        request, bad = pair
        if not strings:
            return request.SerializeToString() + b"\x0a"  # a truncated field
        field = strings[0]
        key = bytes([(field.number << 3) | 2]) if field.number < 16 else b""
        return request.SerializeToString() + key + bytes([len(bad)]) + bad if key else bad

    return st.one_of(garbled.map(corrupt), st.binary(min_size=1, max_size=64))


# -- the servers, and what they keep -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    stack = start_stack(tmp_path_factory.mktemp("fuzz"))
    yield stack
    stack.stop()


def address(stack, service: str) -> str:
    return getattr(stack, service).address


def snapshot(data_dir: pathlib.Path) -> str:
    """A digest of every row of every service's database and of the artifact folders' names."""
    digest = hashlib.sha256()
    for path in sorted(data_dir.glob("*.db")):
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
            for table in tables:
                rows = sorted(repr(row) for row in conn.execute(f'SELECT * FROM "{table}"'))
                digest.update(f"{path.name}/{table}:{rows}".encode())
    artifacts = data_dir / "artifacts"
    if artifacts.exists():
        for path in sorted(artifacts.rglob("*")):
            if ".jobs" not in path.parts:
                digest.update(str(path.relative_to(artifacts)).encode())
    return digest.hexdigest()


def call(channel: grpc.Channel, method: MethodDescriptor, request: Any) -> tuple[grpc.StatusCode, bool]:
    """Send `request` (a message, a list of them for a client stream, or raw bytes); (status, changed anything
    the caller may see as accepted)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    serialize = _serialize
    out = message_class(method.output_type).FromString
    try:
        if method.client_streaming:
            items = request if isinstance(request, list) else [request]
            stream = channel.stream_stream(path, request_serializer=serialize, response_deserializer=out)
            acks = list(stream(iter(items), timeout=TIMEOUT))
            return grpc.StatusCode.OK, any(getattr(a, "accepted", True) for a in acks)
        if method.server_streaming:
            answers = channel.unary_stream(path, request_serializer=serialize, response_deserializer=out)
            for count, _ in enumerate(answers(request, timeout=TIMEOUT)):
                if count > 20:
                    break
            return grpc.StatusCode.OK, True
        channel.unary_unary(path, request_serializer=serialize, response_deserializer=out)(request, timeout=TIMEOUT)
        return grpc.StatusCode.OK, True
    except grpc.RpcError as error:
        return error.code(), False


def _serialize(message: Message | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


METHODS = [
    (service, method)
    for service, contract in CONTRACTS.items()
    for described in contract.DESCRIPTOR.services_by_name.values()
    for method in described.methods
]


def check(stack, service: str, method: MethodDescriptor, request: Any) -> None:
    before = snapshot(stack.data_dir)
    with grpc.insecure_channel(address(stack, service)) as channel:
        code, accepted = call(channel, method, request)
    assert code not in FORBIDDEN, f"{method.full_name} answered {code.name} to {request!r:.600}"
    if code != grpc.StatusCode.OK or not accepted:
        assert snapshot(stack.data_dir) == before, f"refused {method.full_name} left something behind: {request!r:.600}"


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 20,  # the suite's run is the same every time; the long run explores
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize("service, method", METHODS, ids=[m.full_name for _, m in METHODS])
def test_fuzzed_requests(stack, service, method):
    strategy = st.lists(requests(method), min_size=0, max_size=4) if method.client_streaming else requests(method)

    @FUZZ
    @given(request=strategy)
    def fuzz(request):
        check(stack, service, method, request)

    fuzz()


@pytest.mark.parametrize("service, method", METHODS, ids=[m.full_name for _, m in METHODS])
def test_undecodable_requests(stack, service, method):
    strategy = st.lists(st.one_of(undecodable(method), requests(method).map(_serialize)), min_size=1, max_size=3)
    if not method.client_streaming:
        strategy = undecodable(method)

    @FUZZ
    @given(request=strategy)
    def fuzz(request):
        check(stack, service, method, request)

    fuzz()


def test_every_server_is_still_serving(stack):
    for service in CONTRACTS:
        with grpc.insecure_channel(address(stack, service)) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
