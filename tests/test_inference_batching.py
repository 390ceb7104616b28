"""Continuous batching over real gRPC: two real inference servers on the tiny model, one batching (the
default) and one with batching off (each request alone, as before), answering the same requests.

Every request pins version "base", so no policy service is needed (its address is a socket nobody serves).
The batching server's engine is inspected for its largest batch, to show requests really shared steps.
"""

from __future__ import annotations

import pathlib
import re
import sys
import time

import grpc
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inference_service.app import start  # noqa: E402
from inference_service.config import InferenceServiceConfig  # noqa: E402
from inference_service.engine import BatchingEngine, SequentialEngine  # noqa: E402
from rlhf.inference.v1 import inference_service_pb2 as pb  # noqa: E402
from rlhf.inference.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: E402
from rlhf.runtime.config import ServerConfig  # noqa: E402
from tests.servers import ServerThread  # noqa: E402

PROMPTS = ["Tell me a short story.", "What did you see today?", "Hi", "The boat was blue and the sea was calm. " * 4]
# Near-uniform sampling over the vocabulary: practically never EOS, so these run to their length.
LONG = dict(temperature=5.0, top_k=0)


def _server(tmp_path: pathlib.Path, model: pathlib.Path, batching: bool) -> ServerThread:
    data = tmp_path / ("batching" if batching else "alone")
    data.mkdir()
    server = ServerConfig(service="inference", port=0, data_dir=data, database_url=f"sqlite:///{data / 'i.db'}")
    config = InferenceServiceConfig(
        server=server,
        policy_addr=f"unix:{data / 'no-policy-service.sock'}",
        base_model=str(model),
        device="cpu",
        batching=batching,
        max_batch_size=8,
    )
    return ServerThread(start, config)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("batching")
    with _server(tmp, tiny_model, True) as batched, _server(tmp, tiny_model, False) as alone:
        with batched.channel() as b, alone.channel() as a:
            yield (batched, alone), pb_grpc.InferenceServiceStub(b), pb_grpc.InferenceServiceStub(a)


def _engine(thread: ServerThread):
    domain = thread.running.bindings[0].servicer.domain
    loaded = domain.models._models[domain._base_path]  # the base model, loaded by an earlier request
    return loaded.engine


def _request(prompt: str, **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(agent_id="alice", prompt=prompt, version="base", params=pb.SamplingParams(**params))


def _stream(request: pb.GenerateRequest) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(
        agent_id=request.agent_id, prompt=request.prompt, version=request.version, params=request.params
    )


def _answer(response) -> tuple[str, int, int]:
    return response.text, response.completion_tokens, response.finish_reason


def _mixed_requests() -> list[pb.GenerateRequest]:
    """Different settings side by side: greedy, sampled with top-k/top-p, near-uniform, stop sequences."""
    settings = [
        dict(max_new_tokens=24, temperature=0),
        dict(max_new_tokens=40, seed=1, temperature=0.7, top_k=5),
        dict(max_new_tokens=32, seed=2, temperature=1.0, top_p=0.8),
        dict(max_new_tokens=7, seed=3, **LONG),
        dict(max_new_tokens=50, seed=4, **LONG),
        dict(max_new_tokens=30, seed=5, stop=[" the", "."]),
        dict(max_new_tokens=1, seed=6),
        dict(max_new_tokens=20, seed=7, temperature=1.3, top_k=40, top_p=0.9),
    ]
    return [_request(PROMPTS[i % len(PROMPTS)], **s) for i, s in enumerate(settings)]


def test_concurrent_requests_share_steps_and_match_one_at_a_time(servers):
    """Same settings and seed, same text, tokens and finish reason whether a request ran alone (batching off)
    or among others with other settings; streams join to the same text; lengths and stop rules hold."""
    (batched, _), stub, alone = servers
    requests = _mixed_requests()
    expected = [_answer(alone.Generate(r, timeout=60)) for r in requests]
    assert {e[2] for e in expected} >= {pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP_SEQUENCE}
    stub.Generate(requests[0], timeout=60)  # load the model, so the next ones arrive together

    futures = [stub.Generate.future(r, timeout=60) for r in requests]
    streams = [stub.GenerateStream(_stream(r), timeout=60) for r in requests[:4]]
    got = [_answer(f.result()) for f in futures]
    assert got == expected
    for stream, (text, tokens, finish) in zip(streams, expected, strict=False):
        chunks = list(stream)
        assert "".join(c.text for c in chunks) == text
        assert (chunks[-1].completion_tokens, chunks[-1].finish_reason) == (tokens, finish)
    for request, (text, tokens, finish) in zip(requests, got, strict=True):
        assert tokens <= request.params.max_new_tokens
        if finish == pb.FINISH_REASON_LENGTH:
            assert tokens == request.params.max_new_tokens
        if finish == pb.FINISH_REASON_STOP_SEQUENCE:
            assert not any(stop in text for stop in request.params.stop)

    engine = _engine(batched)
    assert isinstance(engine, BatchingEngine) and engine.peak_batch >= 4  # they really shared forward passes
    # A lone request on the batching server is the same as on the other one too.
    assert _answer(stub.Generate(requests[2], timeout=60)) == expected[2]


def test_cancelled_stream_leaves_the_batch_and_the_others_continue(servers):
    (batched, _), stub, alone = servers
    long = [_request(PROMPTS[i % 2], max_new_tokens=120, seed=100 + i, **LONG) for i in range(3)]
    expected = [_answer(alone.Generate(r, timeout=60)) for r in long]
    assert all(e[1] == 120 for e in expected)
    stub.Generate(long[0], timeout=60)  # loaded, and the engine idle again
    engine = _engine(batched)
    left_before = engine.cancelled_rows

    stream = stub.GenerateStream(_stream(_request(PROMPTS[0], max_new_tokens=200, seed=9, **LONG)), timeout=60)
    futures = [stub.Generate.future(r, timeout=60) for r in long]
    next(stream), next(stream)  # it is decoding
    stream.cancel()
    deadline = time.monotonic() + 20
    while engine.cancelled_rows == left_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.cancelled_rows == left_before + 1, "the cancelled stream did not leave the batch"
    assert [_answer(f.result()) for f in futures] == expected


def test_requests_joining_a_running_batch_one_by_one_match_one_at_a_time(servers):
    """Long prompts join long-running rows one after another: every join leaves masked holes in the cache,
    which gets compacted; the texts still match the one-at-a-time server's."""
    (batched, _), stub, alone = servers
    long = [_request(PROMPTS[i], max_new_tokens=120, seed=200 + i, **LONG) for i in range(2)]
    joiners = [_request(PROMPTS[3] * 2 + str(i), max_new_tokens=3, seed=300 + i) for i in range(10)]
    expected = [_answer(alone.Generate(r, timeout=60)) for r in long + joiners]
    stub.Generate(joiners[0], timeout=60)
    engine = _engine(batched)
    compactions = engine.compactions
    futures = [stub.Generate.future(r, timeout=60) for r in long]
    got_joiners = [_answer(stub.Generate(r, timeout=60)) for r in joiners]
    assert [_answer(f.result()) for f in futures] + got_joiners == expected
    assert engine.compactions > compactions


def test_a_request_failing_validation_does_not_disturb_the_batch(servers):
    _, stub, alone = servers
    requests = _mixed_requests()[:4]
    expected = [_answer(alone.Generate(r, timeout=60)) for r in requests]
    bad = [_request(PROMPTS[0], temperature=-1), _request(PROMPTS[1], top_p=0), _request("  ")]
    interleaved = [r for pair in zip(requests, [*bad, requests[-1]], strict=True) for r in pair]
    futures = [stub.Generate.future(r, timeout=60) for r in interleaved]
    outcomes = []
    for future in futures:
        try:
            outcomes.append(_answer(future.result()))
        except grpc.RpcError as error:
            outcomes.append(error.code())
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert outcomes == [expected[0], invalid, expected[1], invalid, expected[2], invalid, expected[3], expected[3]]


def test_batching_off_serves_each_request_alone(servers):
    (_, thread), _, alone = servers
    alone.Generate(_request(PROMPTS[0], max_new_tokens=2), timeout=60)
    assert isinstance(_engine(thread), SequentialEngine)


def _thread_counts() -> tuple[int, int | None]:
    """The calling thread's OpenMP and (where torch has it) MKL thread counts, as torch reports them."""
    info = torch.__config__.parallel_info()
    omp = int(re.search(r"omp_get_max_threads\(\) : (\d+)", info).group(1))
    mkl = re.search(r"mkl_get_max_threads\(\) : (\d+)", info)
    return omp, int(mkl.group(1)) if mkl else None


@pytest.mark.parametrize("streamed", [False, True], ids=["generate", "stream"])
def test_the_tiny_model_is_served_on_one_intra_op_thread_in_whichever_thread_runs_it(servers, streamed):
    """OpenMP and MKL keep their thread counts per calling thread: without setting them in the engine's (or
    the pool's) own thread, a small model's every operation fans out over all cores and waits for sleeping
    workers (2.6x slower decoding of the tiny model on 2 cores; rlhf.training.threads)."""
    (batched, alone), batching_stub, alone_stub = servers
    for thread, stub in ((batched, batching_stub), (alone, alone_stub)):
        stub.Generate(_request(PROMPTS[0], max_new_tokens=1), timeout=60)  # loaded
        domain = thread.running.bindings[0].servicer.domain
        loaded = domain.models._models[domain._base_path]
        assert loaded.cpu_threads == 1  # a model under 5M parameters on a CPU
        seen: list[tuple[int, int | None]] = []
        hook = loaded.model.register_forward_pre_hook(lambda *_, seen=seen: seen.append(_thread_counts()))
        try:
            request = _request(PROMPTS[1], max_new_tokens=6, seed=3, **LONG)
            if streamed:
                list(stub.GenerateStream(_stream(request), timeout=60))
            else:
                stub.Generate(request, timeout=60)
        finally:
            hook.remove()
        assert len(seen) >= 6
        assert all(omp == 1 and mkl in (None, 1) for omp, mkl in seen), seen
