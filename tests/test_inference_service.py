"""Inference service over real gRPC: a real inference server, real channels, real (tiny) models.

The policy service is someone else's; here a small real PolicyService servicer (defined below, served by a
real grpc server on 127.0.0.1:0) answers GetPolicy from a dict of versions whose model_path folders are
real saved models: copies of the project's tiny model with slightly perturbed weights.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import pathlib
import sys

import grpc
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the service packages live at the repository root
    sys.path.insert(0, str(ROOT))

from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from inference_service import routing  # noqa: E402
from inference_service.app import start  # noqa: E402
from inference_service.config import InferenceServiceConfig  # noqa: E402
from inference_service.models import ModelCache  # noqa: E402
from inference_service.records import Target  # noqa: E402
from rlhf.inference.v1 import inference_service_pb2 as pb  # noqa: E402
from rlhf.inference.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: E402
from rlhf.policy.v1 import policy_service_pb2, policy_service_pb2_grpc  # noqa: E402
from rlhf.runtime.config import ServerConfig  # noqa: E402
from rlhf.training.modeling import resolve_model  # noqa: E402
from tests.servers import ServerThread  # noqa: E402

AGENT = "alice"
PROMPT = "Tell me a short story."


# --- real models and a real stand-in for the policy service's registry -------------------------------------


def _perturbed_copy(source: str, target: pathlib.Path, seed: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return str(target)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, str]:
    """The tiny base model (built once, ~40 s) and two "trained" versions of it."""
    data = tmp_path_factory.mktemp("inference-models")
    base = resolve_model("", data)
    return {
        "base": base,
        "v1": _perturbed_copy(base, data / "alice-v1", seed=1),
        "v2": _perturbed_copy(base, data / "alice-v2", seed=2),
    }


class RegistryPolicyService(policy_service_pb2_grpc.PolicyServiceServicer):
    """Answers GetPolicy from `versions[agent_id][version] = model_path`, like the real registry would."""

    def __init__(self) -> None:
        self.versions: dict[str, dict[str, str]] = {}

    def GetPolicy(self, request, context):
        versions = self.versions.get(request.agent_id, {})
        if not versions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"agent {request.agent_id} has no policies")
        name = request.version
        if name in ("", "latest"):
            name = max(versions, key=lambda v: int(v[1:]))
        if name not in versions:
            context.abort(grpc.StatusCode.NOT_FOUND, f"agent {request.agent_id} has no version {name}")
        return policy_service_pb2.GetPolicyResponse(
            policy=policy_service_pb2.Policy(
                id=f"{request.agent_id}-{name}", agent_id=request.agent_id, version=name, model_path=versions[name]
            )
        )


@pytest.fixture(scope="module")
def registry(models):
    servicer = RegistryPolicyService()
    servicer.versions[AGENT] = {"v1": models["v1"], "v2": models["v2"]}
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    policy_service_pb2_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(0)


def _config(tmp_path: pathlib.Path, models: dict[str, str], policy_addr: str, **overrides) -> InferenceServiceConfig:
    server = ServerConfig(
        service="inference", port=0, data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'inference.db'}"
    )
    return InferenceServiceConfig(
        server=server, policy_addr=policy_addr, base_model=models["base"], device="cpu", **overrides
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, models, registry):
    with ServerThread(start, _config(tmp_path_factory.mktemp("inference"), models, registry.address)) as thread:
        yield thread


@pytest.fixture(scope="module")
def stub(server):
    with server.channel() as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def _violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    fields = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def _generate(stub, **fields) -> pb.GenerateResponse:
    fields.setdefault("agent_id", AGENT)
    fields.setdefault("prompt", PROMPT)
    return stub.Generate(pb.GenerateRequest(**fields), timeout=60)


def _greedy_reference(model_path: str, prompt: str, max_new_tokens: int) -> tuple[str, int, int]:
    """(text, completion tokens, finish reason) of greedy decoding by transformers' own `generate`: an
    oracle independent of the service's token loop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        )
    new = out[0, ids.shape[1] :].tolist()
    finish = pb.FINISH_REASON_LENGTH
    if eos in new:
        new, finish = new[: new.index(eos)], pb.FINISH_REASON_STOP
    text = tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text, len(new), finish


@pytest.fixture(scope="module")
def greedy(models) -> dict[str, tuple[str, int, int]]:
    """Each version's greedy answer to PROMPT (24 new tokens at most), computed without the service."""
    return {name: _greedy_reference(path, PROMPT, 24) for name, path in models.items()}


# --- generation ----------------------------------------------------------------------------------------------


def test_generate_with_base_and_with_a_version(stub):
    base = _generate(stub, version="base", params=pb.SamplingParams(max_new_tokens=12, seed=1))
    assert base.policy_version == "base"
    assert base.text and 0 < base.completion_tokens <= 12 and base.prompt_tokens > 0
    assert base.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    pinned = _generate(stub, version="v2", params=pb.SamplingParams(max_new_tokens=12, seed=1))
    assert pinned.policy_version == "v2" and pinned.text
    assert pinned.generation_id != base.generation_id


def test_generation_is_logged_with_its_version(stub):
    made = _generate(stub, version="v1", routing_key="user-1", params=pb.SamplingParams(max_new_tokens=8))
    got = stub.GetGeneration(pb.GetGenerationRequest(generation_id=made.generation_id)).generation
    assert (got.generation_id, got.agent_id, got.policy_version) == (made.generation_id, AGENT, "v1")
    assert (got.prompt, got.text, got.routing_key) == (PROMPT, made.text, "user-1")
    assert (got.prompt_tokens, got.completion_tokens, got.finish_reason) == (
        made.prompt_tokens,
        made.completion_tokens,
        made.finish_reason,
    )
    assert got.created_at.ToDatetime() == made.created_at.ToDatetime()


def test_unknown_generation_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetGeneration(pb.GetGenerationRequest(generation_id="0f1e2d3c-0000-4000-8000-000000000000"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_without_deployment_the_latest_version_serves(stub, registry, models):
    registry.versions["carol"] = {"v1": models["v1"], "v2": models["v2"]}
    assert _generate(stub, agent_id="carol", params=pb.SamplingParams(max_new_tokens=4)).policy_version == "v2"
    deployment = stub.GetDeployment(pb.GetDeploymentRequest(agent_id="carol")).deployment
    assert deployment.is_default and [(t.version, t.weight) for t in deployment.targets] == [("v2", 1.0)]
    # A version registered just now (training finished) serves at once.
    registry.versions["carol"]["v3"] = models["v1"]
    assert _generate(stub, agent_id="carol", params=pb.SamplingParams(max_new_tokens=4)).policy_version == "v3"
    deployed = stub.SetDeployment(
        pb.SetDeploymentRequest(agent_id="carol", targets=[pb.DeploymentTarget(version="v3", weight=1)])
    ).deployment
    assert not deployed.is_default and deployed.revision == 1
    assert _generate(stub, agent_id="carol", params=pb.SamplingParams(max_new_tokens=4)).policy_version == "v3"


def test_agent_without_policies_is_not_found_unless_base_is_pinned(stub):
    for call in (
        lambda: _generate(stub, agent_id="nobody"),
        lambda: stub.GetDeployment(pb.GetDeploymentRequest(agent_id="nobody")),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "train" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        _generate(stub, version="v7")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "v7" in caught.value.details()
    base = _generate(stub, agent_id="nobody", version="base", params=pb.SamplingParams(max_new_tokens=4))
    assert base.policy_version == "base"


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(params=pb.SamplingParams(temperature=-1)), "params.temperature"),
        (dict(params=pb.SamplingParams(temperature=float("nan"))), "params.temperature"),
        (dict(params=pb.SamplingParams(top_p=0)), "params.top_p"),
        (dict(params=pb.SamplingParams(top_p=1.5)), "params.top_p"),
        (dict(params=pb.SamplingParams(top_k=-1)), "params.top_k"),
        (dict(params=pb.SamplingParams(max_new_tokens=0)), "params.max_new_tokens"),
        (dict(params=pb.SamplingParams(stop=["ok", ""])), "params.stop[1]"),
        (dict(prompt="  "), "prompt"),
        (dict(agent_id="a/b"), "agent_id"),
        (dict(version="seven"), "version"),
    ],
)
def test_bad_parameters_are_invalid_argument_naming_the_field(stub, fields, field):
    with pytest.raises(grpc.RpcError) as caught:
        _generate(stub, **{"version": "base", **fields})
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _violations(caught.value) == [field]


def test_greedy_is_deterministic(stub):
    params = pb.SamplingParams(max_new_tokens=24, temperature=0)
    first, second = (_generate(stub, version="v1", params=params) for _ in range(2))
    assert first.text == second.text and first.text


def test_greedy_text_is_the_served_versions_own_decoding(stub, greedy):
    """What Generate returns is the decoded tokens of the version asked for (transformers' greedy decoding
    of that version's weights), not of some other model, and streaming pieces join to the same text."""
    assert greedy["v2"][0] != greedy["base"][0], "the versions must answer differently for this to tell them apart"
    params = pb.SamplingParams(max_new_tokens=24, temperature=0)
    for version in ("base", "v1", "v2"):
        made = _generate(stub, version=version, params=params)
        text, tokens, finish = greedy[version]
        assert text and (made.text, made.completion_tokens, made.finish_reason) == (text, tokens, finish), version
        chunks = list(
            stub.GenerateStream(
                pb.GenerateStreamRequest(agent_id=AGENT, prompt=PROMPT, version=version, params=params), timeout=60
            )
        )
        assert "".join(c.text for c in chunks) == text and chunks[-1].completion_tokens == tokens


def test_stop_sequence_truncates_the_text(stub):
    prompt = "What did you see today?"
    full = _generate(stub, version="base", prompt=prompt, params=pb.SamplingParams(max_new_tokens=40, temperature=0))
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = " " + words[2]
    cut = _generate(
        stub,
        version="base",
        prompt=prompt,
        params=pb.SamplingParams(max_new_tokens=40, temperature=0, stop=["NEVER", stop]),
    )
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert cut.completion_tokens < full.completion_tokens


def test_stream_concatenation_equals_generate_with_the_same_seed(stub):
    sampled = pb.SamplingParams(max_new_tokens=48, seed=1234, temperature=1.0, top_p=0.95)
    # With the same seed the text is the same up to a stop sequence: take one that really occurs.
    stop = " " + _generate(stub, version="v1", params=pb.SamplingParams(max_new_tokens=48, seed=7)).text.split()[1]
    stopped = pb.SamplingParams(max_new_tokens=48, seed=7, stop=[stop])
    for params in (sampled, stopped):
        whole = _generate(stub, version="v1", params=params)
        assert whole.text and whole.completion_tokens > 0  # an empty answer would make the comparisons below vacuous
        chunks = list(
            stub.GenerateStream(
                pb.GenerateStreamRequest(agent_id=AGENT, prompt=PROMPT, version="v1", params=params), timeout=60
            )
        )
        assert "".join(c.text for c in chunks) == whole.text
        assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
        last = chunks[-1]
        assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
            whole.finish_reason,
            whole.prompt_tokens,
            whole.completion_tokens,
        )
        assert last.generation_id and {c.generation_id for c in chunks} == {last.generation_id}
        assert {c.policy_version for c in chunks} == {"v1"}
        logged = stub.GetGeneration(pb.GetGenerationRequest(generation_id=last.generation_id)).generation
        assert logged.text == whole.text
        if params is sampled:
            assert len(chunks) > 2  # text really arrived piece by piece
    assert whole.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE and stop not in whole.text


def test_very_long_prompt_is_truncated_not_an_error(stub):
    prompt = "I walked by the calm sea and the boat was blue. " * 300  # thousands of tokens; context is 256
    for max_new in (16, 100_000):  # the second is clamped by the server cap and the context
        made = _generate(stub, version="base", prompt=prompt, params=pb.SamplingParams(max_new_tokens=max_new))
        assert made.prompt_tokens + made.completion_tokens <= 256
        assert made.prompt_tokens >= 128


# --- deployments and routing ---------------------------------------------------------------------------------


def test_set_deployment_validation(stub):
    cases = [
        ([("v1", 1), ("v9", 1)], grpc.StatusCode.NOT_FOUND, None),
        ([("v1", 1), ("v2", -1)], grpc.StatusCode.INVALID_ARGUMENT, "targets[1].weight"),
        ([("v1", 0), ("base", 0)], grpc.StatusCode.INVALID_ARGUMENT, "targets"),
        ([("v1", float("inf"))], grpc.StatusCode.INVALID_ARGUMENT, "targets[0].weight"),
        ([("latest", 1)], grpc.StatusCode.INVALID_ARGUMENT, "targets[0].version"),
        ([("v1", 1), ("v1", 2)], grpc.StatusCode.INVALID_ARGUMENT, "targets[1].version"),
        ([], grpc.StatusCode.INVALID_ARGUMENT, "targets"),
    ]
    for targets, code, field in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.SetDeployment(
                pb.SetDeploymentRequest(
                    agent_id=AGENT, targets=[pb.DeploymentTarget(version=v, weight=w) for v, w in targets]
                )
            )
        assert caught.value.code() == code, targets
        if field:
            assert _violations(caught.value) == [field]
        else:
            assert "v9" in caught.value.details()


def test_ab_split_matches_weights_and_keys_are_sticky(stub, registry):
    registry.versions["ab"] = dict(registry.versions[AGENT])
    set_ = stub.SetDeployment(
        pb.SetDeploymentRequest(
            agent_id="ab",
            targets=[pb.DeploymentTarget(version="base", weight=1), pb.DeploymentTarget(version="v2", weight=3)],
        )
    )
    assert set_.deployment.revision == 1
    got = stub.GetDeployment(pb.GetDeploymentRequest(agent_id="ab")).deployment
    assert [(t.version, t.weight) for t in got.targets] == [("base", 1.0), ("v2", 3.0)] and not got.is_default

    params = pb.SamplingParams(max_new_tokens=1)
    served = {
        f"user-{i}": _generate(stub, agent_id="ab", routing_key=f"user-{i}", params=params).policy_version
        for i in range(400)
    }
    counts = collections.Counter(served.values())
    # Expected share of v2 is 0.75; sd over 400 keys is ~0.022, so +-0.08 is a ~3.7 sigma tolerance.
    assert abs(counts["v2"] / 400 - 0.75) <= 0.08, counts
    assert set(counts) == {"base", "v2"}
    for key in ("user-3", "user-42", "user-399"):  # the same key keeps its version
        assert {_generate(stub, agent_id="ab", routing_key=key, params=params).policy_version for _ in range(3)} == {
            served[key]
        }

    moved = stub.SetDeployment(
        pb.SetDeploymentRequest(agent_id="ab", targets=[pb.DeploymentTarget(version="v1", weight=1)])
    ).deployment
    assert moved.revision == 2
    assert _generate(stub, agent_id="ab", routing_key="user-3", params=params).policy_version == "v1"


def test_routing_split_over_many_keys_is_tight():
    targets = [Target("base", 1.0), Target("v1", 0.0), Target("v2", 3.0)]
    counts = collections.Counter(routing.route("ab", targets, 5, f"k{i}") for i in range(20_000))
    assert counts["v1"] == 0 and abs(counts["v2"] / 20_000 - 0.75) < 0.015
    unkeyed = collections.Counter(routing.route("ab", targets, 5) for _ in range(20_000))
    assert abs(unkeyed["v2"] / 20_000 - 0.75) < 0.015


# --- model loading -------------------------------------------------------------------------------------------


def test_concurrent_first_requests_load_the_model_once(tmp_path, models, registry):
    with ServerThread(start, _config(tmp_path, models, registry.address)) as thread:
        with thread.channel() as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            request = pb.GenerateRequest(
                agent_id=AGENT, prompt=PROMPT, version="v2", params=pb.SamplingParams(max_new_tokens=4)
            )
            futures = [stub.Generate.future(request, timeout=60) for _ in range(8)]
            assert {f.result().policy_version for f in futures} == {"v2"}
        cache = thread.running.bindings[0].servicer.domain.models
        assert cache.loads == 1 and cache.cached() == [models["v2"]]


def test_model_cache_evicts_least_recently_used(models):
    async def scenario() -> None:
        cache = ModelCache(capacity=2, device="cpu")
        loaded = await asyncio.gather(*(cache.get(models["v1"]) for _ in range(5)))
        assert cache.loads == 1 and len({id(m) for m in loaded}) == 1
        await cache.get(models["v2"])
        await cache.get(models["v1"])  # v1 is now the most recently used
        await cache.get(models["base"])  # evicts v2
        assert cache.cached() == [models["v1"], models["base"]] and cache.loads == 3
        await cache.get(models["v2"])
        assert cache.loads == 4 and cache.cached() == [models["base"], models["v2"]]

    asyncio.run(scenario())


def test_policy_service_down_is_unavailable_and_base_still_serves(tmp_path, models, greedy):
    # A unix socket nobody listens on: unlike a TCP port bound and released, nothing can take it meanwhile.
    dead = f"unix:{tmp_path / 'no-policy-service.sock'}"
    with ServerThread(start, _config(tmp_path, models, dead, policy_timeout_seconds=5)) as thread:
        with thread.channel() as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                _generate(stub)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "policy service" in caught.value.details()
            made = _generate(stub, version="base", params=pb.SamplingParams(max_new_tokens=24, temperature=0))
            assert made.policy_version == "base" and made.completion_tokens > 0
            assert made.text == greedy["base"][0] and made.text
