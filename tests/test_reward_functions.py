"""Reward functions over real gRPC: ScoreBatch combines registered functions (built-ins and an operator's),
names the field of a bad request, and a policy run sends its choice with every ScoreBatch call."""

from __future__ import annotations

import json
import pathlib

import grpc
import pytest
from google.protobuf import json_format

from feedback_service.app import start as start_feedback
from feedback_service.config import FeedbackServiceConfig
from reward_service.app import start as start_reward
from reward_service.config import RewardServiceConfig
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.reward.v1 import reward_service_pb2_grpc as rw_grpc
from rlhf.runtime.errors import field_violation
from rlhf.sdk.clients import PolicyClient, RewardClient
from rlhf.training.reward_functions import (
    InvalidRewardFunction,
    RewardFunctionFailed,
    RewardFunctionRegistry,
    parse_registrations,
)
from tests import operator_reward_functions
from tests.helpers import rated_answers, server_config, submit_ratings
from tests.servers import ServerThread
from tests.stack import policy_server

OPERATOR = {
    "sea_bonus": "tests.operator_reward_functions:sea_bonus",
    "wrong_length": "tests.operator_reward_functions:wrong_length",
}
AGENT = "functions"
PAIRS = [
    ("Where did you go?", " We walked to the sea and swam."),
    ("Where did you go?", " I stayed home and read a long book about old trains and the city."),
    ("Tell me a story.", " Once upon a time."),
    ("Tell me a story.", "   "),  # unscorable: stays so, with or without functions
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("functions")
    feedback = ServerThread(
        start_feedback, FeedbackServiceConfig.from_env(server=server_config("feedback", data_dir))
    ).__enter__()
    reward = ServerThread(
        start_reward,
        RewardServiceConfig(
            server=server_config("reward", data_dir), feedback_address=feedback.address, reward_functions=OPERATOR
        ),
    ).__enter__()
    yield data_dir, feedback, reward
    reward.stop()
    feedback.stop()


@pytest.fixture(scope="module")
def stub(servers):
    with servers[2].channel() as channel:
        yield rw_grpc.RewardServiceStub(channel)


@pytest.fixture(scope="module")
def reward_model(servers, tiny_model):
    """Reward model v1 of AGENT, trained by the reward service on 20 ratings (one quick epoch)."""
    _, feedback, reward = servers
    with feedback.channel() as channel:
        submit_ratings(channel, AGENT, rated_answers(20, seed=3))
    client = RewardClient(reward.address)
    job = client.create_job(AGENT, rw.RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16))
    final = list(client.watch(job.job_id, timeout=300))[-1]
    assert final.state == rw.JOB_STATE_SUCCEEDED, final.error
    return final.reward_model_version


def spec(name: str, weight: float | None = None, **params) -> rw.RewardFunctionSpec:
    message = rw.RewardFunctionSpec(name=name, weight=weight)
    json_format.ParseDict(params, message.params)
    return message


def score(stub, *functions: rw.RewardFunctionSpec, agent_id: str = AGENT) -> list[rw.ItemScore]:
    request = rw.ScoreBatchRequest(
        agent_id=agent_id, items=[rw.ScoreItem(prompt=p, response=r) for p, r in PAIRS], functions=functions
    )
    return list(stub.ScoreBatch(request, timeout=60).scores)


def violation(error: grpc.RpcError) -> str:
    """The field the BadRequest detail names."""
    found = field_violation(error)
    assert found, f"no BadRequest detail in {error.details()}"
    return found[0]


def test_list_names_the_builtins_and_the_operators_functions(stub):
    functions = {f.name: f for f in stub.ListRewardFunctions(rw.ListRewardFunctionsRequest()).functions}
    assert set(functions) == {"reward_model", "scale_shift", "length_penalty", "regex", "keywords", *OPERATOR}
    assert functions["sea_bonus"].source == OPERATOR["sea_bonus"] and not functions["sea_bonus"].builtin
    assert "sea" in functions["sea_bonus"].description
    bonus = {p.name: p for p in functions["sea_bonus"].params}["bonus"]
    assert bonus.type == "number" and not bonus.required and bonus.default_value.number_value == 1.0
    max_length = {p.name: p for p in functions["length_penalty"].params}["max_length"]
    assert max_length.required and max_length.type == "integer"


def test_the_sdk_lists_and_sends_reward_functions(servers):
    with RewardClient(servers[2].address) as reward:
        assert [f.name for f in reward.list_functions()][-2:] == ["sea_bonus", "wrong_length"]
        with pytest.raises(grpc.RpcError) as raised:
            reward.score("nobody", [("p", "r")], functions=[{"name": "keywords", "params": {"words": "sea"}}])
    assert violation(raised.value) == "functions[0].params.words"


@pytest.mark.parametrize(
    "functions, field, text",
    [
        ([spec("import_os")], "functions[0].name", "no reward function 'import_os'"),
        ([spec("reward_model"), spec("os:system")], "functions[1].name", "no reward function"),
        ([spec("scale_shift", scale="two")], "functions[0].params.scale", "finite number"),
        ([spec("scale_shift", factor=2)], "functions[0].params.factor", "unknown parameter"),
        ([spec("length_penalty")], "functions[0].params.max_length", "required"),
        ([spec("length_penalty", max_length=2.5)], "functions[0].params.max_length", "integer"),
        ([spec("length_penalty", max_length=-1)], "functions[0].params.max_length", "at least 0"),
        ([spec("length_penalty", max_length=5, unit="tokens")], "functions[0].params.unit", "one of"),
        ([spec("regex", pattern="(unclosed")], "functions[0].params.pattern", "not a valid regular expression"),
        ([spec("keywords", words=[])], "functions[0].params.words", "non-empty list"),
        ([spec("sea_bonus", bonus="big")], "functions[0].params.bonus", "finite number"),
        ([spec("sea_bonus", volume=3)], "functions[0].params.volume", "unknown parameter"),
        ([spec("reward_model", weight=float("nan"))], "functions[0].weight", "finite"),
    ],
)
def test_bad_function_requests_are_invalid_argument_naming_the_field(stub, functions, field, text):
    # Checked before anything else: the agent has no model, and no code is loaded for a name.
    with pytest.raises(grpc.RpcError) as raised:
        score(stub, *functions, agent_id="nobody")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(raised.value) == field
    assert text in raised.value.details()


def test_a_registration_that_does_not_import_stops_the_service_with_the_reason(tmp_path):
    config = RewardServiceConfig(server=server_config("reward", tmp_path), reward_functions={"x": "no_such_mod:f"})
    with pytest.raises(ValueError, match="cannot import no_such_mod"):
        ServerThread(start_reward, config).__enter__()
    with pytest.raises(ValueError, match="built-in"):
        RewardFunctionRegistry.of({"regex": "tests.operator_reward_functions:sea_bonus"})
    assert parse_registrations(" a=m:f , b=pkg.m:g\n") == {"a": "m:f", "b": "pkg.m:g"}


def test_library_combination_is_the_weighted_sum():
    registry = RewardFunctionRegistry.of({"sea_bonus": operator_reward_functions.sea_bonus})
    combination = registry.combination(
        [
            {"name": "scale_shift", "weight": 0.5, "params": {"scale": 2.0, "shift": -1.0}},
            {"name": "keywords", "params": {"words": ["Sea", "swam"], "value": 0.25}},
            {"name": "length_penalty", "weight": 2, "params": {"max_length": 3, "per_unit": 0.1}},
        ],
        "reward_functions",
    )
    values = combination(["q", "q"], ["the sea, we swam", "one two three four five"], [1.0, -1.0])
    assert values == pytest.approx([0.5 * 1.0 + 0.5 + 2 * -0.1, 0.5 * -3.0 + 0.0 + 2 * -0.2])
    with pytest.raises(InvalidRewardFunction) as raised:
        registry.combination([{"name": "sea_bonus", "params": {"bonus": True}}], "reward_functions")
    assert raised.value.field == "reward_functions[0].params.bonus"


@pytest.mark.slow  # the reward_model fixture trains a reward model
def test_builtins_and_an_operator_function_change_scorebatch_as_expected(stub, reward_model):
    plain = score(stub)
    assert [s.ok for s in plain] == [True, True, True, False]
    model = [s.score for s in plain[:3]]
    assert [s.model_score for s in plain[:3]] == model  # no functions: the model's score

    def check(scored: list[rw.ItemScore], expected: list[float]) -> None:
        assert [s.score for s in scored[:3]] == pytest.approx(expected, abs=1e-6)
        assert [s.model_score for s in scored[:3]] == pytest.approx(model, abs=1e-6)  # the model, beside
        assert [s.rating for s in scored[:3]] == pytest.approx([s.rating for s in plain[:3]], abs=1e-6)
        assert not scored[3].ok and "empty" in scored[3].error

    check(score(stub, spec("scale_shift", scale=2.0, shift=-1.0)), [2 * m - 1 for m in model])
    words = [len(r.split()) for _, r in PAIRS[:3]]
    check(
        score(stub, spec("reward_model"), spec("length_penalty", 0.5, max_length=6, per_unit=0.1)),
        [m - 0.5 * 0.1 * max(0, n - 6) for m, n in zip(model, words, strict=True)],
    )
    check(score(stub, spec("regex", pattern=r"\bsea\b", value=2.0, otherwise=-1.0)), [2.0, -1.0, -1.0])
    check(score(stub, spec("keywords", 3.0, words=["ONCE", "book"])), [0.0, 3.0, 3.0])
    operator_reward_functions.CALLS.clear()
    check(score(stub, spec("sea_bonus", bonus=0.75)), [model[0] + 0.75, model[1], model[2]])
    (call,) = operator_reward_functions.CALLS
    assert call["responses"] == [r for _, r in PAIRS[:3]] and call["bonus"] == 0.75  # the unscorable left out
    assert call["scores"] == pytest.approx(model, abs=1e-6)


@pytest.mark.slow  # the reward_model fixture trains a reward model
def test_a_faulty_operator_function_is_failed_precondition_naming_it(stub, reward_model):
    with pytest.raises(grpc.RpcError) as raised:
        score(stub, spec("wrong_length"))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "wrong_length returned 1 values for 3 items" in raised.value.details()


@pytest.mark.slow  # trains a policy for one step
def test_a_policy_run_sends_its_reward_functions_with_every_scorebatch(servers, reward_model, tmp_path):
    data_dir, feedback, reward = servers
    policy = policy_server(tmp_path, feedback.address, reward.address)
    try:
        config = pol.TrainingConfig(
            use_lora=True, learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=6
        )
        config.reward_functions.append(spec("sea_bonus", 2.0, bonus=0.5))
        config.reward_functions.append(spec("length_penalty", max_length=1, per_unit=0.25))
        operator_reward_functions.CALLS.clear()
        with PolicyClient(policy.address) as client:
            response = client.train(
                pol.TrainPolicyRequest(
                    agent_id=AGENT, max_steps=2, config=config, reward_model_version=reward_model, wait=True
                ),
                timeout=300,
            )
        assert response.status == "trained", response.job.error
        calls = operator_reward_functions.CALLS
        # Each step's batch of 4, less any empty (unscorable) response, which the functions never see.
        assert len(calls) == 2 and all(c["bonus"] == 0.5 and 1 <= len(c["responses"]) <= 4 for c in calls)
        # The rewards PPO optimised are the combination: 2 x (model score + bonus) - 0.25 per extra word.
        results = json.loads((pathlib.Path(response.model_path).parent / "training_results.json").read_text())
        for call, mean in zip(calls, results["score_history"], strict=True):
            expected = [
                2 * (s + (0.5 if "sea" in r else 0.0)) - 0.25 * max(0, len(r.split()) - 1)
                for s, r in zip(call["scores"], call["responses"], strict=True)
            ]
            expected += [min(expected)] * (4 - len(expected))  # an unscorable response gets the batch's lowest
            assert mean == pytest.approx(sum(expected) / len(expected), abs=1e-4)
        assert results["config"]["reward_functions"][0] == {
            "name": "sea_bonus",
            "weight": 2.0,
            "params": {"bonus": 0.5},
        }
    finally:
        policy.stop()


@pytest.mark.parametrize(
    "functions, field",
    [
        ([spec("reward_model"), spec("nope")], "config.reward_functions[1].name"),
        ([spec("length_penalty", max_length="long")], "config.reward_functions[0].params.max_length"),
    ],
)
def test_train_policy_checks_reward_functions_before_any_job(servers, tmp_path, tiny_model, functions, field):
    _, feedback, reward = servers
    policy = policy_server(tmp_path, feedback.address, reward.address)
    try:
        config = pol.TrainingConfig(reward_functions=functions)
        with PolicyClient(policy.address) as client:
            for dry_run in (True, False):
                with pytest.raises(grpc.RpcError) as raised:
                    client.train(pol.TrainPolicyRequest(agent_id=AGENT, dry_run=dry_run, config=config), timeout=60)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert violation(raised.value) == field
            assert client.list_jobs()[0] == []  # no job started
    finally:
        policy.stop()


def test_validate_only_checks_without_a_model_and_scores_nothing(stub):
    request = rw.ScoreBatchRequest(agent_id="nobody", validate_only=True, functions=[spec("scale_shift", scale=3)])
    assert list(stub.ScoreBatch(request, timeout=30).scores) == []


@pytest.mark.slow  # trains a policy for one step
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_and_rloo_runs_send_their_reward_functions_too(servers, reward_model, tmp_path, algorithm):
    data_dir, feedback, reward = servers
    policy = policy_server(tmp_path, feedback.address, reward.address)
    try:
        config = pol.TrainingConfig(use_lora=True, learning_rate=1e-3, batch_size=2, max_new_tokens=6)
        config.reward_functions.append(spec("sea_bonus", bonus=0.25))
        knobs = {f"{algorithm}_config": getattr(pol, f"{algorithm.upper()}Config")(num_generations=2)}
        operator_reward_functions.CALLS.clear()
        with PolicyClient(policy.address) as client:
            response = client.train(
                pol.TrainPolicyRequest(
                    agent_id=AGENT,
                    algorithm=getattr(pol, f"ALGORITHM_{algorithm.upper()}"),
                    max_steps=1,
                    config=config,
                    reward_model_version=reward_model,
                    wait=True,
                    **knobs,
                ),
                timeout=300,
            )
        assert response.status == "trained", response.job.error
        calls = operator_reward_functions.CALLS
        # One step: 2 prompts x 2 answers scored in one ScoreBatch call (less any empty answer).
        assert len(calls) == 1 and calls[0]["bonus"] == 0.25 and 1 <= len(calls[0]["responses"]) <= 4
    finally:
        policy.stop()


def test_a_catastrophic_regex_stops_at_its_time_limit():
    combination = RewardFunctionRegistry().combination([{"name": "regex", "params": {"pattern": "(a|aa)+$"}}], "f")
    with pytest.raises(RewardFunctionFailed, match="took over 0.05s on one response"):
        combination(["q"], ["a" * 5000 + "!"], [0.0])
