"""Bearer tokens over real servers (issue 9, "Who may do what"): no token or a bad one is UNAUTHENTICATED, an
agent token outside its agents is PERMISSION_DENIED, admin may do everything, health stays open, and the
services' calls to each other carry the service's own token."""

from __future__ import annotations

import json
import pathlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feedback_service.app import start as start_feedback
from feedback_service.config import FeedbackServiceConfig
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.runtime import auth
from rlhf.runtime.config import SecurityConfig, ServerConfig
from rlhf.runtime.errors import FailedPrecondition
from rlhf.runtime.model_checks import ModelAccess
from rlhf.sdk.clients import FeedbackClient, InferenceClient, PolicyClient, RewardClient, channel, feedback_request
from tests.helpers import server_config
from tests.servers import ServerThread
from tests.stack import start_stack

ADMIN, AGENT, OTHER = "admin-secret-token", "agent-a1-token", "agent-a2-token"


def write_tokens(path: pathlib.Path) -> pathlib.Path:
    path.write_text(
        json.dumps(
            [
                {"sha256": auth.digest(ADMIN), "role": "admin"},
                {"sha256": auth.digest(AGENT), "role": "agent", "agents": ["a1"]},
                {"sha256": auth.digest(OTHER), "role": "agent", "agents": ["a2"]},
            ]
        )
    )
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("auth")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RLHF_AUTH_TOKENS_FILE", str(write_tokens(data_dir / "tokens.json")))
        env.setenv("RLHF_TOKEN", ADMIN)  # the services' own token, for their calls to each other
        env.setenv("RLHF_REFLECTION", "0")
        running = start_stack(data_dir)
        yield running
        running.stop()


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


def test_token_store_compares_digests_and_rejects_malformed_files(tmp_path: pathlib.Path) -> None:
    store = auth.TokenStore.load(str(write_tokens(tmp_path / "tokens.json")))
    assert store.authenticate(ADMIN) == auth.Caller("admin")
    assert store.authenticate(AGENT) == auth.Caller("agent", frozenset({"a1"}))
    assert store.authenticate("nope") is None and store.authenticate("") is None
    for bad, says in [
        ("{}", "JSON list"),
        ('[{"sha256": "abc", "role": "admin"}]', "64 hex"),
        (json.dumps([{"sha256": auth.digest("x"), "role": "root"}]), "role"),
        (json.dumps([{"sha256": auth.digest("x"), "role": "agent"}]), "at least one agent"),
    ]:
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(auth.TokensFileError, match=says):
            auth.TokenStore.load(str(tmp_path / "bad.json"))


def test_no_token_or_a_bad_one_is_unauthenticated_and_health_stays_open(stack) -> None:
    for token in ("", "wrong-token"):
        with FeedbackClient(stack.feedback.address, token=token) as client:
            assert code_of(lambda: client.stats("a1")) == grpc.StatusCode.UNAUTHENTICATED
            error = pytest.raises(grpc.RpcError, client.submit, "a1", prompt="p", response="r", score=0.5, retries=0)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "RLHF_TOKEN" in error.value.details()
    with channel(stack.policy.address, security=SecurityConfig(token="")) as ch:
        answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_can_be_switched_off(stack) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(stack.feedback.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        assert code_of(lambda: list(answers)) == grpc.StatusCode.UNIMPLEMENTED


def test_an_agent_token_acts_for_its_own_agent_only(stack) -> None:
    with FeedbackClient(stack.feedback.address, token=AGENT) as client:
        assert client.submit("a1", prompt="p", response="r", score=0.5).id
        assert client.stats("a1").stats.feedback_count == 1
        assert client.list_feedback("a1")
        denied = pytest.raises(grpc.RpcError, client.submit, "a2", prompt="p", response="r", score=0.5, retries=0)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'a2'" in denied.value.details()
        assert code_of(lambda: client.list_feedback("a2")) == grpc.StatusCode.PERMISSION_DENIED
        # A stream stops at the first item of another agent.
        items = [
            feedback_request("a1", prompt="q", response="r", score=0.1),
            feedback_request("a2", prompt="q", response="r", score=0.1),
        ]
        assert code_of(lambda: list(client.stream(iter(items)))) == grpc.StatusCode.PERMISSION_DENIED
        # Export and deleting a whole agent are an admin's; its own rows by id are its own.
        assert code_of(lambda: client.export("a1")) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: client.delete_feedback("a1", all=True)) == grpc.StatusCode.PERMISSION_DENIED
    with (
        PolicyClient(stack.policy.address, token=AGENT) as policy,
        RewardClient(stack.reward.address, token=AGENT) as reward,
    ):
        for client in (policy, reward):
            assert client.list_jobs("a1") == ([], "")
            assert code_of(lambda c=client: c.list_jobs()) == grpc.StatusCode.PERMISSION_DENIED
            assert code_of(lambda c=client: c.list_jobs("a2")) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: policy.train_policy("a1", dry_run=True)) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: reward.create_job("a1")) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: policy.list_policies("a2")) == grpc.StatusCode.PERMISSION_DENIED
    with InferenceClient(stack.inference.address, token=AGENT) as inference:
        assert code_of(lambda: inference.set_deployment("a1", {"base": 1.0})) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: inference.generate("a2", "hello")) == grpc.StatusCode.PERMISSION_DENIED


def test_admin_may_do_everything_and_services_call_each_other_with_their_token(stack) -> None:
    with FeedbackClient(stack.feedback.address, token=ADMIN) as client:
        client.submit("a2", prompt="p", response="r", score=0.5)
        rows, _ = client.export("a2")
        assert len(rows) == 1
        assert client.delete_feedback("a2", all=True) == 1
    with PolicyClient(stack.policy.address, token=ADMIN) as policy:
        policy.list_jobs()
        # The dry run asks the feedback service for the agent's count with the policy service's own token:
        # it gets an answer (too few items), not UNAUTHENTICATED.
        error = pytest.raises(grpc.RpcError, policy.train_policy, "a2", dry_run=True)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()
        assert "feedback items" in error.value.details()


def test_get_generation_is_scoped_to_the_generations_agent(stack, tiny_model) -> None:
    with InferenceClient(stack.inference.address, token=OTHER) as other:
        made = other.generate("a2", "hello", version="base", max_new_tokens=2)
        assert other.get_generation(made.generation_id).agent_id == "a2"
    with InferenceClient(stack.inference.address, token=AGENT) as agent:
        assert code_of(lambda: agent.get_generation(made.generation_id)) == grpc.StatusCode.PERMISSION_DENIED
    with InferenceClient(stack.inference.address, token=ADMIN) as admin:
        assert admin.get_generation(made.generation_id).agent_id == "a2"
    # Attribution: the feedback service looks the generation up with its own token (a failed look-up would
    # store the item without its version).
    config = FeedbackServiceConfig(
        server=server_config("feedback", stack.data_dir / "attributing"), inference_address=stack.inference.address
    )
    with ServerThread(start_feedback, config) as feedback, FeedbackClient(feedback.address, token=OTHER) as client:
        client.submit("a2", prompt="hello", response=made.text, score=0.9, generation_id=made.generation_id)
        rows, _ = client.list_feedback("a2")
        assert [row.policy_version for row in rows] == ["base"]


def test_base_model_is_restricted_to_model_roots_own_artifacts_and_no_hub(stack) -> None:
    """With tokens configured: "not allowed" outside the roots (another agent's versions, any other folder, a
    hub id), "not found" for an allowed place without a model, and nothing else about the server's disk."""
    artifacts = stack.data_dir / "artifacts"
    (stack.data_dir / "models" / "empty").mkdir(parents=True)
    cases = {
        "/etc": "not allowed",
        "/nonexistent/folder": "not allowed",
        str(stack.data_dir / "models" / ".." / "reward.db"): "not allowed",
        str(artifacts / "policies" / "a2" / "v1"): "not allowed",
        "gpt2": "not allowed",
        "someorg/some-model": "not allowed",
        "~root": "not allowed",
        str(stack.data_dir / "models" / "empty"): "not found",
        str(stack.data_dir / "models" / "missing"): "not found",
        str(artifacts / "policies" / "a1" / "v9"): "not found",
    }
    with PolicyClient(stack.policy.address, token=ADMIN) as policy:
        for name, says in cases.items():
            error = pytest.raises(grpc.RpcError, policy.train_policy, "a1", dry_run=True, config={"base_model": name})
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, error.value.details())
            assert error.value.details() in (
                f"config.base_model: model '{name}' not found",
                f"config.base_model: model '{name}' is not allowed on this server (use 'rlhf-tiny', a folder "
                "under the server's model roots, or one of the agent's own versions)",
            ), name
            assert says in error.value.details(), (name, error.value.details())
    with RewardClient(stack.reward.address, token=ADMIN) as reward:
        error = pytest.raises(grpc.RpcError, reward.create_job, "a1", rw.RewardModelConfig(base_model="/etc"))
        assert "not allowed" in error.value.details()


def test_model_access_unrestricted_without_tokens_or_roots(tmp_path: pathlib.Path, monkeypatch) -> None:
    for variable in ("RLHF_AUTH_TOKENS_FILE", "RLHF_MODEL_ROOTS", "RLHF_MODEL_HUB"):
        monkeypatch.delenv(variable, raising=False)
    open_access = ModelAccess.of(ServerConfig(service="policy", data_dir=tmp_path))
    assert not open_access.restricted and open_access.hub
    open_access.check("/anywhere", "a1", "f")  # a single user's machine: as before
    monkeypatch.setenv("RLHF_MODEL_ROOTS", str(tmp_path / "mine"))
    monkeypatch.setenv("RLHF_MODEL_HUB", "1")
    access = ModelAccess.of(ServerConfig(service="policy", data_dir=tmp_path))
    assert access.restricted and access.hub
    access.check(str(tmp_path / "mine" / "model"), "a1", "f")
    access.check("gpt2", "a1", "f")
    (tmp_path / "mine" / "link").parent.mkdir()
    (tmp_path / "mine" / "link").symlink_to("/etc")  # a link out of a root is judged by where it leads
    with pytest.raises(FailedPrecondition, match="not allowed"):
        access.check(str(tmp_path / "mine" / "link"), "a1", "f")


def test_agent_tokens_see_paths_relative_to_the_artifact_root() -> None:
    from rlhf.policy.v1 import policy_service_pb2 as pol

    paths = auth.Paths("/srv/rlhf/artifacts")
    policy = pol.Policy(
        model_path="/srv/rlhf/artifacts/policies/a1/v3/policy",
        reward_model_path="/srv/rlhf/artifacts/reward_models/a1/v2",
        artifact_path="/srv/rlhf/artifacts/policies/a1/v3",
    )
    answer = pol.GetPolicyResponse(policy=policy)
    shown = auth._shown(answer, auth.rule_for("/rlhf.policy.v1.PolicyService/GetPolicy"), paths)
    assert (shown.policy.model_path, shown.policy.reward_model_path, shown.policy.artifact_path) == (
        "policies/a1/v3/policy",
        "reward_models/a1/v2",
        "policies/a1/v3",
    )
    assert answer.policy.model_path.startswith("/srv")  # the servicer's message is left as it was
    job = pol.GetTrainingJobResponse(
        job=pol.TrainingJob(error="could not save /srv/rlhf/artifacts/policies/.jobs/j1/checkpoint-3: disk full")
    )
    shown_job = auth._shown(job, auth.rule_for("/rlhf.policy.v1.PolicyService/GetTrainingJob"), paths)
    assert shown_job.job.error == "could not save policies/.jobs/j1/checkpoint-3: disk full"
    models = rw.ListRewardModelsResponse(reward_models=[rw.RewardModel(model_path="/elsewhere/model")])
    shown_models = auth._shown(models, auth.rule_for("/rlhf.reward.v1.RewardService/ListRewardModels"), paths)
    assert shown_models.reward_models[0].model_path == "model"


def test_every_rpc_has_its_own_rule() -> None:
    """A new RPC is an admin's until someone writes its rule: this lists the ones that need a decision."""
    from rlhf.feedback.v1 import feedback_service_pb2 as fb
    from rlhf.inference.v1 import inference_service_pb2 as inf
    from rlhf.policy.v1 import policy_service_pb2 as pol

    services = [
        module.DESCRIPTOR.services_by_name[name]
        for module, name in [
            (fb, "FeedbackService"),
            (rw, "RewardService"),
            (pol, "PolicyService"),
            (inf, "InferenceService"),
        ]
    ]
    methods = {f"/{service.full_name}/{method.name}" for service in services for method in service.methods}
    assert methods - auth.RULES.keys() == set()
    assert auth.RULES.keys() - methods == set()  # no rule for an RPC that does not exist (a typo)


def test_no_rpc_answers_unknown_or_internal_to_an_agent_token(stack) -> None:
    """Every RPC, called with an agent token on its own agent, another agent and no agent: a clear status each
    time (the rules' checks never fail on a request or an answer they did not expect)."""
    from google.protobuf import message_factory, symbol_database

    from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
    from rlhf.inference.v1 import inference_service_pb2_grpc as inf_grpc
    from rlhf.policy.v1 import policy_service_pb2_grpc as pol_grpc
    from rlhf.reward.v1 import reward_service_pb2_grpc as rw_grpc

    stubs = {
        "FeedbackService": (fb_grpc.FeedbackServiceStub, stack.feedback.address),
        "RewardService": (rw_grpc.RewardServiceStub, stack.reward.address),
        "PolicyService": (pol_grpc.PolicyServiceStub, stack.policy.address),
        "InferenceService": (inf_grpc.InferenceServiceStub, stack.inference.address),
    }
    metadata = [("authorization", f"Bearer {AGENT}")]
    seen = {}
    for method, _rule in auth.RULES.items():
        _, full_service, name = method.split("/")
        stub_class, address = stubs[full_service.rsplit(".", 1)[1]]
        with grpc.insecure_channel(address) as ch:
            call = getattr(stub_class(ch), name)
            descriptor = symbol_database.Default().pool.FindMethodByName(method.strip("/").replace("/", "."))
            request_class = message_factory.GetMessageClass(descriptor.input_type)
            for agent_id in ("a1", "a2", ""):
                request = request_class()
                if "agent_id" in request_class.DESCRIPTOR.fields_by_name:
                    request.agent_id = agent_id
                streaming_request = name == "StreamFeedback"
                try:
                    answer = call(iter([request]) if streaming_request else request, timeout=20, metadata=metadata)
                    if hasattr(answer, "__iter__") and not hasattr(answer, "ListFields"):
                        list(answer)
                    seen[(name, agent_id)] = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    seen[(name, agent_id)] = error.code()
    bad = {key: code for key, code in seen.items() if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)}
    assert bad == {}
    assert seen[("SubmitFeedback", "a2")] == grpc.StatusCode.PERMISSION_DENIED
    assert seen[("TrainPolicy", "a1")] == grpc.StatusCode.PERMISSION_DENIED
