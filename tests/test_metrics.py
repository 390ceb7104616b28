"""Metrics and request logs (README "Metrics and logs"): each service on 127.0.0.1:0 with its Prometheus endpoint
on a free port, real RPCs over real channels, /metrics fetched over HTTP and parsed with prometheus_client's
own parser; the request log read from the `rlhf.requests` logger.
"""

from __future__ import annotations

import logging
import pathlib
import re
import urllib.error
import urllib.request

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from feedback_service.app import start as start_feedback
from feedback_service.config import FeedbackServiceConfig
from inference_service.app import start as start_inference
from inference_service.config import InferenceServiceConfig
from policy_service.app import start as start_policy
from policy_service.config import PolicyServiceConfig
from reward_service.app import start as start_reward
from reward_service.config import RewardServiceConfig
from rlhf.feedback.v1 import feedback_service_pb2 as fb
from rlhf.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from rlhf.inference.v1 import inference_service_pb2 as inf
from rlhf.inference.v1 import inference_service_pb2_grpc as inf_grpc
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.policy.v1 import policy_service_pb2_grpc as pol_grpc
from rlhf.reward.v1 import reward_service_pb2 as rw
from rlhf.reward.v1 import reward_service_pb2_grpc as rw_grpc
from rlhf.runtime import requestids
from rlhf.runtime.config import ServerConfig
from rlhf.runtime.server import PortInUse
from rlhf.sdk.clients import FeedbackClient
from tests.helpers import rated_answers, submit_ratings, wait_for
from tests.servers import ServerThread, ServiceProcess

FEEDBACK = "rlhf.feedback.v1.FeedbackService"
REWARD = "rlhf.reward.v1.RewardService"
POLICY = "rlhf.policy.v1.PolicyService"
INFERENCE = "rlhf.inference.v1.InferenceService"
LINE = re.compile(
    r"rpc /(?P<service>[\w.]+)/(?P<method>\w+) code=(?P<code>\w+) ms=\d+\.\d agent=(?P<agent>\S+) "
    r"request_id=(?P<request_id>\S+)$"
)


def config(service: str, data_dir: pathlib.Path) -> ServerConfig:
    return ServerConfig(service=service, port=0, data_dir=data_dir, metrics_port=0)


def scrape(server: ServerThread, rpcs: int | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample of the server's /metrics, fetched over HTTP: {(name, labels): value}. With `rpcs`: once that
    many RPCs were counted (a call is counted just after its status went out, so its client may be faster)."""
    if rpcs is not None:

        def settled() -> dict | None:
            samples = scrape(server)
            return samples if counted(samples) == rpcs else None

        return wait_for(settled, timeout=10)
    assert server.running is not None and server.running.metrics_port
    url = f"http://127.0.0.1:{server.running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def counted(samples: dict) -> float:
    return sum(v for (name, _), v in samples.items() if name == "grpc_server_handled_total")


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: dict, service: str, method: str, code: str) -> float:
    return value(samples, "grpc_server_handled_total", grpc_service=service, grpc_method=method, grpc_code=code)


def timed(samples: dict, service: str, method: str) -> float:
    return value(samples, "grpc_server_handling_seconds_count", grpc_service=service, grpc_method=method)


def lines(caplog: pytest.LogCaptureFixture, count: int = 0) -> list[dict[str, str]]:
    """The request log's lines so far (at least `count`: a line follows its call's status), parsed."""
    wait_for(lambda: sum(r.name == "rlhf.requests" for r in caplog.records) >= count, timeout=10)
    found = []
    for record in caplog.records:
        if record.name == "rlhf.requests":
            match = LINE.fullmatch(record.getMessage())
            assert match, record.getMessage()
            found.append(match.groupdict())
    return found


def rating(agent_id: str, response: str, score: float = 0.5, request_id: str = "") -> fb.SubmitFeedbackRequest:
    return fb.SubmitFeedbackRequest(
        agent_id=agent_id, prompt="How do I reset it?", response=response, score=score, request_id=request_id
    )


@pytest.fixture
def feedback(tmp_path):
    with ServerThread(start_feedback, FeedbackServiceConfig.from_env(server=config("feedback", tmp_path))) as server:
        yield server


def test_feedback_counts_rpcs_by_method_and_code_and_every_item_ingested(feedback):
    stub = fb_grpc.FeedbackServiceStub(feedback.channel())
    before = scrape(feedback)
    assert handled(before, FEEDBACK, "SubmitFeedback", "OK") == 0
    stub.SubmitFeedback(rating("m-agent", "first", request_id="once"), timeout=10)
    stub.SubmitFeedback(rating("m-agent", "first", request_id="once"), timeout=10)  # a replay: duplicate
    with pytest.raises(grpc.RpcError) as error:
        stub.SubmitFeedback(rating("m-agent", "out of range", score=1.5), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # One stream: 3 single messages and a batch of 5 (one of them out of range), 8 items.
    messages = [fb.StreamFeedbackRequest(feedback=rating("m-agent", f"single {i}")) for i in range(3)]
    batch = [rating("m-agent", f"batched {i}", score=2.0 if i == 2 else 0.25) for i in range(5)]
    messages.append(fb.StreamFeedbackRequest(items=batch))
    acks = list(stub.StreamFeedback(iter(messages), timeout=30))
    assert sum(len(ack.results) or 1 for ack in acks) == 8
    with pytest.raises(grpc.RpcError) as error:
        stub.ListFeedback(fb.ListFeedbackRequest(agent_id=""), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    after = scrape(feedback, rpcs=5)
    assert handled(after, FEEDBACK, "SubmitFeedback", "OK") == 2
    assert handled(after, FEEDBACK, "SubmitFeedback", "INVALID_ARGUMENT") == 1
    assert handled(after, FEEDBACK, "StreamFeedback", "OK") == 1
    assert handled(after, FEEDBACK, "ListFeedback", "INVALID_ARGUMENT") == 1
    assert timed(after, FEEDBACK, "SubmitFeedback") == 3 and timed(after, FEEDBACK, "StreamFeedback") == 1
    assert value(after, "grpc_server_handling_seconds_sum", grpc_service=FEEDBACK, grpc_method="SubmitFeedback") > 0
    # Items: 1 + 7 stored, the replay a duplicate, the two out of range rejected (the unary one included).
    assert value(after, "rlhf_feedback_items_total", outcome="stored") == 8
    assert value(after, "rlhf_feedback_items_total", outcome="duplicate") == 1
    assert value(after, "rlhf_feedback_items_total", outcome="rejected") == 2
    assert ("rlhf_feedback_write_queue_depth", frozenset()) in after
    assert value(after, "rlhf_feedback_write_queue_depth") == 0  # nothing left to write
    # A scrape is no RPC: the figures stay as they were.
    assert scrape(feedback) == after


def test_each_request_logs_one_line_with_method_code_duration_agent_and_request_id(feedback, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.requests")
    stub = fb_grpc.FeedbackServiceStub(feedback.channel())
    stub.SubmitFeedback(rating("log-agent", "fine"), metadata=[("x-request-id", "client-chosen-1")], timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.SubmitFeedback(rating("log-agent", "bad", score=-1), metadata=[("x-request-id", "bad-1")], timeout=10)
    stub.SubmitFeedback(rating("log-agent", "no id"), timeout=10)
    stub.SubmitFeedback(rating("log-agent", "unfit id"), metadata=[("x-request-id", "two words")], timeout=10)
    with requestids.bound("sdk-bound-1"), FeedbackClient(feedback.address) as client:
        client.submit("sdk-agent", prompt="p", response="through the SDK", score=0.5)
    list(stub.StreamFeedback(iter([fb.StreamFeedbackRequest(feedback=rating("log-agent", "s"))]), timeout=10))

    logged = lines(caplog, 6)
    assert [(line["method"], line["code"], line["agent"]) for line in logged] == [
        ("SubmitFeedback", "OK", "log-agent"),
        ("SubmitFeedback", "INVALID_ARGUMENT", "log-agent"),
        ("SubmitFeedback", "OK", "log-agent"),
        ("SubmitFeedback", "OK", "log-agent"),
        ("SubmitFeedback", "OK", "sdk-agent"),
        ("StreamFeedback", "OK", "-"),  # a stream's items name their own agents
    ]
    ids = [line["request_id"] for line in logged]
    assert ids[:2] == ["client-chosen-1", "bad-1"] and ids[4] == "sdk-bound-1"
    # No id, or one unfit to log: the server makes one, different each time.
    assert all(re.fullmatch(r"[0-9a-f]{32}", made) for made in (ids[2], ids[3], ids[5]))
    assert len({ids[2], ids[3], ids[5]}) == 3
    assert all(line["service"] == FEEDBACK for line in logged)


def test_calls_refused_for_want_of_a_token_are_logged_and_counted_too(tmp_path, caplog):
    import json

    from rlhf.runtime import auth
    from rlhf.runtime.config import SecurityConfig

    caplog.set_level(logging.INFO, logger="rlhf.requests")
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps([{"sha256": auth.digest("agent-token"), "role": "agent", "agents": ["a1"]}]))
    server = config("feedback", tmp_path)
    server.security = SecurityConfig(tokens_file=str(tokens), token="")
    with ServerThread(start_feedback, FeedbackServiceConfig.from_env(server=server)) as feedback:
        stub = fb_grpc.FeedbackServiceStub(feedback.channel())
        with pytest.raises(grpc.RpcError) as error:
            stub.SubmitFeedback(rating("a1", "no token"), metadata=[("x-request-id", "refused-1")], timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as error:
            stub.SubmitFeedback(
                rating("a2", "not mine"), metadata=[("authorization", "Bearer agent-token")], timeout=10
            )
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        samples = scrape(feedback, rpcs=2)
    assert handled(samples, FEEDBACK, "SubmitFeedback", "UNAUTHENTICATED") == 1
    assert handled(samples, FEEDBACK, "SubmitFeedback", "PERMISSION_DENIED") == 1
    assert [(line["code"], line["agent"]) for line in lines(caplog, 2)] == [
        ("UNAUTHENTICATED", "a1"),
        ("PERMISSION_DENIED", "a2"),
    ]
    assert lines(caplog)[0]["request_id"] == "refused-1"


def test_the_metrics_port_comes_from_the_environment_and_a_taken_one_is_refused(monkeypatch, feedback, tmp_path):
    monkeypatch.delenv("RLHF_REWARD_METRICS_PORT", raising=False)
    assert ServerConfig.from_env("reward").metrics_port is None  # no endpoint unless asked for
    monkeypatch.setenv("RLHF_REWARD_METRICS_PORT", "9152")
    assert ServerConfig.from_env("reward").metrics_port == 9152
    taken = feedback.running.metrics_port
    server = config("feedback", tmp_path / "other")
    server.metrics_port = taken
    with pytest.raises(PortInUse, match="RLHF_FEEDBACK_METRICS_PORT"):
        with ServerThread(start_feedback, FeedbackServiceConfig.from_env(server=server)):
            pass
    feedback.stop()  # a stopped server's endpoint is gone with it
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{taken}/metrics", timeout=5)


def test_the_gateway_logs_and_counts_requests_and_passes_its_request_id_on(feedback, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.requests")
    addresses = ["--feedback-addr", feedback.address, "--policy-addr", "127.0.0.1:9"]
    with ServiceProcess("gateway", None, *addresses) as gateway:
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway.port}", timeout=30) as http:
            body = {"prompt": "Hi", "response": "Hello", "score": 0.5}
            ok = http.post("/api/policies/feedback/gw-agent", json=body, headers={"X-Request-ID": "gw-1"})
            assert ok.status_code == 200 and ok.headers["x-request-id"] == "gw-1"
            bad = http.post("/api/policies/feedback/gw-agent", json={**body, "score": 3})
            assert bad.status_code == 400 and re.fullmatch(r"[0-9a-f]{32}", bad.headers["x-request-id"])
            answer = http.get("/metrics")
            assert answer.status_code == 200
        wait_for(lambda: sum("code=" in line for line in gateway.lines) >= 3, timeout=10)
        logged = [line.split("rlhf.requests: ", 1)[1].strip() for line in gateway.lines if "rlhf.requests: " in line]
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }
    route = "/api/policies/feedback/{agent_id}"
    assert value(samples, "http_server_requests_total", method="POST", route=route, code="200") == 1
    assert value(samples, "http_server_requests_total", method="POST", route=route, code="400") == 1
    assert value(samples, "http_server_request_duration_seconds_count", method="POST", route=route) == 2
    assert re.fullmatch(rf"http POST {re.escape(route)} code=200 ms=\d+\.\d agent=gw-agent request_id=gw-1", logged[0])
    assert logged[1].startswith(f"http POST {route} code=400 ")
    # The feedback service got the gateway's ids (the client's, and the one it made) with the calls made for them.
    made = bad.headers["x-request-id"]
    assert [(line["code"], line["request_id"]) for line in lines(caplog, 2)] == [
        ("OK", "gw-1"),
        ("INVALID_ARGUMENT", made),
    ]


@pytest.fixture
def feedback_and_reward(tmp_path, tiny_model):
    feedback = ServerThread(start_feedback, FeedbackServiceConfig.from_env(server=config("feedback", tmp_path)))
    with feedback:
        reward = ServerThread(
            start_reward, RewardServiceConfig(server=config("reward", tmp_path), feedback_address=feedback.address)
        )
        with reward:
            yield feedback, reward


def test_a_request_id_follows_the_reward_service_into_the_feedback_service(feedback_and_reward, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.requests")
    feedback, reward = feedback_and_reward
    stub = rw_grpc.RewardServiceStub(reward.channel())
    with pytest.raises(grpc.RpcError) as error:  # no feedback yet: the reward service asked the feedback service
        stub.CreateTrainingJob(
            rw.CreateTrainingJobRequest(agent_id="cross-agent"), metadata=[("x-request-id", "cross-1")], timeout=60
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as error:
        stub.ScoreBatch(rw.ScoreBatchRequest(agent_id=""), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    followed = [
        (line["service"], line["method"], line["code"]) for line in lines(caplog, 3) if line["request_id"] == "cross-1"
    ]
    assert sorted(followed) == [
        (FEEDBACK, "GetFeedbackStats", "OK"),
        (REWARD, "CreateTrainingJob", "FAILED_PRECONDITION"),
    ]
    samples = scrape(reward, rpcs=2)
    assert handled(samples, REWARD, "CreateTrainingJob", "FAILED_PRECONDITION") == 1
    assert handled(samples, REWARD, "ScoreBatch", "INVALID_ARGUMENT") == 1
    assert handled(scrape(feedback, rpcs=1), FEEDBACK, "GetFeedbackStats", "OK") == 1
    assert value(samples, "rlhf_models_loaded", cache="reward") == 0


def test_reward_jobs_are_counted_by_state_from_the_job_store(feedback_and_reward, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.requests")
    feedback, reward = feedback_and_reward
    submit_ratings(feedback.channel(), "jobs-agent", rated_answers(12))
    stub = rw_grpc.RewardServiceStub(reward.channel())
    before = scrape(reward)
    assert all(value(before, "rlhf_training_jobs", kind="reward_model", state=s) == 0 for s in ("RUNNING", "CANCELLED"))
    config_ = rw.RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16)
    job = stub.CreateTrainingJob(
        rw.CreateTrainingJobRequest(agent_id="jobs-agent", config=config_),
        metadata=[("x-request-id", "job-1")],
        timeout=60,
    ).job
    stub.CancelTrainingJob(rw.CancelTrainingJobRequest(job_id=job.job_id), timeout=30)
    wait_for(
        lambda: (
            stub.GetTrainingJob(rw.GetTrainingJobRequest(job_id=job.job_id), timeout=10).job.state
            == rw.JOB_STATE_CANCELLED
        ),
        timeout=60,
    )
    samples = scrape(reward)
    counts = {
        s: value(samples, "rlhf_training_jobs", kind="reward_model", state=s)
        for s in ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED")
    }
    assert counts == {"QUEUED": 0, "RUNNING": 0, "SUCCEEDED": 0, "FAILED": 0, "CANCELLED": 1, "INTERRUPTED": 0}
    # The job's worker got the id of the request that created it.
    spec = (reward.running.domain.jobs.job_dir(job.job_id) / "spec.json").read_text()
    assert '"request_id": "job-1"' in spec


@pytest.fixture
def inference_and_policy(tmp_path, tiny_model):
    unused = "127.0.0.1:9"  # the policy service calls neither here
    policy = ServerThread(
        start_policy,
        PolicyServiceConfig(server=config("policy", tmp_path), feedback_address=unused, reward_address=unused),
    )
    with policy:
        inference = ServerThread(
            start_inference, InferenceServiceConfig(server=config("inference", tmp_path), policy_addr=policy.address)
        )
        with inference:
            yield inference, policy


def test_inference_counts_generations_loaded_models_and_passes_the_id_to_the_policy_service(
    inference_and_policy, caplog, tiny_model
):
    from transformers import AutoModelForCausalLM

    caplog.set_level(logging.INFO, logger="rlhf.requests")
    inference, policy = inference_and_policy
    stub = inf_grpc.InferenceServiceStub(inference.channel())
    assert value(scrape(inference), "rlhf_models_loaded", cache="inference") == 0
    with pytest.raises(grpc.RpcError) as error:  # no version trained: the policy registry says so
        stub.Generate(
            inf.GenerateRequest(agent_id="inf-agent", prompt="Hi"), metadata=[("x-request-id", "inf-1")], timeout=60
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as error:
        stub.Generate(inf.GenerateRequest(agent_id="inf-agent", prompt=""), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    params = inf.SamplingParams(max_new_tokens=4)
    for _ in range(2):
        stub.Generate(
            inf.GenerateRequest(agent_id="inf-agent", prompt="Hi", version="base", params=params), timeout=120
        )

    followed = [
        (line["service"], line["method"], line["code"]) for line in lines(caplog, 5) if line["request_id"] == "inf-1"
    ]
    assert sorted(followed) == [(INFERENCE, "Generate", "NOT_FOUND"), (POLICY, "GetPolicy", "NOT_FOUND")]
    samples = scrape(inference, rpcs=4)
    assert handled(samples, INFERENCE, "Generate", "OK") == 2
    assert handled(samples, INFERENCE, "Generate", "NOT_FOUND") == 1
    assert handled(samples, INFERENCE, "Generate", "INVALID_ARGUMENT") == 1
    assert handled(scrape(policy, rpcs=1), POLICY, "GetPolicy", "NOT_FOUND") == 1
    assert value(samples, "rlhf_models_loaded", cache="inference") == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    sizes = [v for (name, labels), v in samples.items() if name == "rlhf_model_bytes"]
    assert sizes == [expected]


QUICK = pol.TrainingConfig(
    use_lora=True, learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=8, seed=0
)
STEPS = 8


@pytest.mark.slow  # trains a reward model and a policy
def test_one_training_run_is_followed_across_the_four_logs_and_its_steps_are_measured(tmp_path, tiny_model, caplog):
    caplog.set_level(logging.INFO, logger="rlhf.requests")
    with ServerThread(start_feedback, FeedbackServiceConfig.from_env(server=config("feedback", tmp_path))) as feedback:
        reward_config = RewardServiceConfig(server=config("reward", tmp_path), feedback_address=feedback.address)
        with ServerThread(start_reward, reward_config) as reward:
            policy_config = PolicyServiceConfig(
                server=config("policy", tmp_path), feedback_address=feedback.address, reward_address=reward.address
            )
            with ServerThread(start_policy, policy_config) as policy:
                inference_config = InferenceServiceConfig(
                    server=config("inference", tmp_path), policy_addr=policy.address
                )
                with ServerThread(start_inference, inference_config) as inference:
                    run_and_follow(feedback, reward, policy, inference, caplog)


def run_and_follow(feedback, reward, policy, inference, caplog) -> None:
    agent = "run-agent"
    submit_ratings(feedback.channel(), agent, rated_answers(24))
    stub = pol_grpc.PolicyServiceStub(policy.channel())
    request = pol.TrainPolicyRequest(
        agent_id=agent,
        max_steps=STEPS,
        config=QUICK,
        reward_model_config=rw.RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16),
    )
    job = stub.TrainPolicy(request, metadata=[("x-request-id", "run-1")], timeout=120).job

    # While it trains: its latest step's seconds and the share spent waiting for rewards.
    def step_figures():
        samples = scrape(policy)
        labels = dict(kind="policy", job_id=job.job_id, agent_id=agent, algorithm="ppo")
        seconds = value(samples, "rlhf_training_step_seconds", **labels)
        return (seconds, value(samples, "rlhf_training_reward_wait_ratio", **labels), samples) if seconds else None

    seconds, wait, samples = wait_for(step_figures, timeout=600, interval=0.05)
    assert seconds > 0 and 0 < wait < 1
    assert value(samples, "rlhf_training_jobs", kind="policy", state="RUNNING") == 1
    done = wait_for(
        lambda: (
            (j := stub.GetTrainingJob(pol.GetTrainingJobRequest(job_id=job.job_id), timeout=10).job).state
            not in (pol.JOB_STATE_QUEUED, pol.JOB_STATE_RUNNING)
            and j
        ),
        timeout=600,
        interval=0.5,
    )
    assert done.state == pol.JOB_STATE_SUCCEEDED, done.error
    samples = scrape(policy)
    assert value(samples, "rlhf_training_jobs", kind="policy", state="SUCCEEDED") == 1
    assert value(samples, "rlhf_training_jobs", kind="policy", state="RUNNING") == 0
    assert (
        value(samples, "rlhf_training_step_seconds", kind="policy", job_id=job.job_id, agent_id=agent, algorithm="ppo")
        == 0
    )  # only running jobs have step figures
    reward_samples = scrape(reward)
    assert value(reward_samples, "rlhf_training_jobs", kind="reward_model", state="SUCCEEDED") == 1
    assert value(reward_samples, "rlhf_models_loaded", cache="reward") == 1
    assert [v for (name, _), v in reward_samples.items() if name == "rlhf_model_bytes"][0] > 0
    assert handled(reward_samples, REWARD, "ScoreBatch", "OK") == STEPS

    generated = inf_grpc.InferenceServiceStub(inference.channel()).Generate(
        inf.GenerateRequest(agent_id=agent, prompt="Hi", params=inf.SamplingParams(max_new_tokens=4)),
        metadata=[("x-request-id", "run-1")],
        timeout=120,
    )
    assert generated.policy_version == done.policy_version

    wait_for(lambda: any(line["method"] == "Generate" for line in lines(caplog)), timeout=10)
    followed = {(line["service"], line["method"]) for line in lines(caplog) if line["request_id"] == "run-1"}
    # The policy worker created the reward-model job and scored every batch; both workers exported feedback.
    assert {
        (POLICY, "TrainPolicy"),
        (FEEDBACK, "GetFeedbackStats"),
        (REWARD, "CreateTrainingJob"),
        (FEEDBACK, "ExportFeedback"),
        (REWARD, "ScoreBatch"),
        (INFERENCE, "Generate"),
        (POLICY, "GetPolicy"),
    } <= followed, followed
    exports = [line for line in lines(caplog) if line["method"] == "ExportFeedback" and line["request_id"] == "run-1"]
    assert len(exports) == 2  # the reward-model worker's and the policy worker's


def test_compose_gives_each_service_its_own_metrics_port_and_exposes_it():
    import yaml

    from rlhf.runtime.config import DEFAULT_PORTS, METRICS_PORTS

    services = yaml.safe_load((pathlib.Path(__file__).resolve().parents[1] / "compose.yaml").read_text())["services"]
    assert set(METRICS_PORTS) == {"feedback", "reward", "policy", "inference"}
    for name, port in METRICS_PORTS.items():
        service = services[name]
        assert service["environment"][f"RLHF_{name.upper()}_METRICS_PORT"] == str(port)
        assert str(port) in [str(p) for p in service.get("expose", [])], f"{name}: metrics port not exposed"
    ports = [*METRICS_PORTS.values(), *DEFAULT_PORTS.values()]
    assert len(set(ports)) == len(ports)  # no two servers of a machine (or a container) on one port
