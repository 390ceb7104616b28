"""The REST gateway over real services: a real uvicorn process (`python -m gateway --port 0`) in front of real
feedback, reward and policy servers, spoken to over HTTP. Every route, every error answer, JSON types, OpenAPI,
docs, health, the asynchronous form with its event stream, and the seed's version naming."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import subprocess
import threading
from collections.abc import Iterator

import httpx
import pytest

from feedback_service.app import start as start_feedback
from feedback_service.config import FeedbackServiceConfig
from policy_service.app import start as start_policy
from policy_service.config import PolicyServiceConfig
from rlhf.policy.v1 import policy_service_pb2 as pol
from rlhf.runtime.db import make_engine
from rlhf.runtime.registry import FEEDBACK_COUNT, SEQUENTIAL
from rlhf.runtime.training_store import TrainingStore
from rlhf.runtime.validation import version as check_version
from rlhf.sdk.clients import PolicyClient
from tests.helpers import rated_answers, server_config, submit_ratings, wait_for
from tests.servers import ServerThread, ServiceProcess
from tests.stack import reward_server

AGENT = "gw-agent"  # 60 ratings; the only agent that trains
FEW = "gw-few"  # 3 ratings
# Small runs (the tiny model is the default base model): what a request's `config` may set.
QUICK = {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 8, "learning_rate": 1e-3}
REWARD_MODEL = {"use_lora": False, "num_epochs": 1, "batch_size": 16, "learning_rate": 5e-4}


class GatewayProcess(ServiceProcess):
    """`python -m gateway --port 0` as its own process, in front of the given services."""

    def __init__(self, feedback_address: str, policy_address: str, env: dict[str, str] | None = None) -> None:
        addresses = ["--feedback-addr", feedback_address, "--policy-addr", policy_address]
        super().__init__("gateway", None, *addresses, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if that did not stop it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def log(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    """Feedback, reward and a policy service that names versions after the feedback count (the seed's naming)."""
    data_dir = tmp_path_factory.mktemp("gateway")
    feedback = ServerThread(
        start_feedback, FeedbackServiceConfig.from_env(server=server_config("feedback", data_dir))
    ).__enter__()
    reward = reward_server(data_dir, feedback.address)
    policy = ServerThread(
        start_policy,
        PolicyServiceConfig(
            server=server_config("policy", data_dir),
            feedback_address=feedback.address,
            reward_address=reward.address,
            version_naming=FEEDBACK_COUNT,
        ),
    ).__enter__()
    with feedback.channel() as channel:
        submit_ratings(channel, AGENT, rated_answers(60, seed=3))
        submit_ratings(channel, FEW, rated_answers(3, seed=3))
    yield feedback, reward, policy
    for server in (policy, reward, feedback):
        server.stop()


@pytest.fixture(scope="module")
def gateway(stack) -> Iterator[GatewayProcess]:
    feedback, _, policy = stack
    running = GatewayProcess(
        feedback.address, policy.address, {"RLHF_GATEWAY_REWARD_MODEL_CONFIG": json.dumps(REWARD_MODEL)}
    )
    yield running
    running.stop()
    assert "Traceback" not in running.log(), running.log()


@pytest.fixture
def http(gateway) -> Iterator[httpx.Client]:
    with gateway.client() as client:
        yield client


def assert_error(answer: httpx.Response, status: int, error: str, field: str | None = None) -> dict:
    """A JSON error answer: the status, the error name, a message, and `field` among the violated fields."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["error"] == error and body["message"] and isinstance(body["fields"], list), body
    assert "Traceback" not in answer.text
    if field is not None:
        assert field in [f["field"] for f in body["fields"]], body
        assert all(f["description"] for f in body["fields"])
    return body


# -- feedback ----------------------------------------------------------------------------------------------


def test_feedback_answers_the_seed_shape_with_json_types(http):
    item = {"prompt": "What is 2+2?", "response": "4.", "score": 1, "runId": "run-1"}  # notes optional
    answer = http.post("/api/policies/feedback/gw-types", json=item)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert {"id", "agentId", "score", "createdAt"} <= set(body)
    assert body["agentId"] == "gw-types" and body["score"] == 1.0 and isinstance(body["score"], float)
    assert isinstance(body["id"], str) and body["id"]
    created = dt.datetime.fromisoformat(body["createdAt"].replace("Z", "+00:00"))
    assert body["createdAt"].endswith("Z") and abs(dt.datetime.now(dt.timezone.utc) - created).total_seconds() < 60
    assert body["duplicate"] is False
    # The same requestId again is stored once: the first row comes back.
    keyed = {**item, "notes": "kept once", "requestId": "gw-key-1"}
    first = http.post("/api/policies/feedback/gw-types", json=keyed).json()
    again = http.post("/api/policies/feedback/gw-types", json=keyed).json()
    assert again["id"] == first["id"] and again["duplicate"] is True and first["duplicate"] is False
    # A comparison has no score.
    pair = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
    compared = http.post("/api/policies/feedback/gw-types", json=pair)
    assert compared.status_code == 200 and compared.json()["score"] is None, compared.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "p", "response": "r", "score": 1.5}, "score"),
        ({"prompt": "p", "response": "r"}, "score"),
        ({"prompt": "p", "response": "r", "score": "0.9"}, "score"),  # a string is not a number
        ({"prompt": "", "response": "r", "score": 0.5}, "prompt"),
        ({"prompt": "p", "response": "r", "score": 0.5, "runId": 7}, "runId"),
        ({"prompt": "p", "response": "r", "score": 0.5, "colour": "red"}, "colour"),
    ],
)
def test_invalid_feedback_is_400_naming_the_field(http, body, field):
    assert_error(http.post("/api/policies/feedback/gw-bad", json=body), 400, "invalid_argument", field)


def test_invalid_agent_id_and_body_are_400(http):
    item = {"prompt": "p", "response": "r", "score": 0.5}
    assert_error(http.post("/api/policies/feedback/bad agent!", json=item), 400, "invalid_argument", "agentId")
    not_json = http.post(
        "/api/policies/feedback/gw-bad", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(not_json, 400, "invalid_argument", "body")
    assert_error(http.post("/api/policies/feedback/gw-bad", json=[1, 2]), 400, "invalid_argument")


# -- dry run and training errors ---------------------------------------------------------------------------


def test_dry_run_has_the_seed_fields_numbers_and_snake_case_model_config(http):
    answer = http.post(
        f"/api/policies/train_policy/{AGENT}", json={"dryRun": True, "maxSteps": 1000, "learningRate": 1e-5}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "dry_run"
    assert body["feedbackCount"] == 60 and type(body["feedbackCount"]) is int
    assert body["estimatedSteps"] == 1000 and type(body["estimatedSteps"]) is int
    assert isinstance(body["estimatedTimeMinutes"], float) and body["estimatedTimeMinutes"] > 0
    assert 0 < body["scoreMean"] < 1 and 0 < body["scoreStd"] < 1
    config = body["modelConfig"]
    assert config["base_model"] == "rlhf-tiny" and config["use_lora"] is True and config["learning_rate"] == 1e-5
    assert config["max_steps"] == 1000 and type(config["max_steps"]) is int and type(config["batch_size"]) is int
    assert type(config["max_new_tokens"]) is int and type(config["gamma"]) is float
    assert all(key == key.lower() for key in config), "modelConfig keys are snake_case as in the seed"
    # More config fields pass through; the request's maxSteps wins over config.max_steps.
    custom = http.post(
        f"/api/policies/train_policy/{AGENT}",
        json={"dryRun": True, "maxSteps": 30, "config": {**QUICK, "max_steps": 5}},
    ).json()
    assert custom["estimatedSteps"] == 30 and custom["modelConfig"]["batch_size"] == 4
    # Data-parallel and gradient-checkpointing fields pass through like the others.
    parallel = http.post(
        f"/api/policies/train_policy/{AGENT}",
        json={"dryRun": True, "config": {**QUICK, "num_processes": 2, "gradient_checkpointing": True}},
    ).json()
    assert parallel["modelConfig"]["num_processes"] == 2 and type(parallel["modelConfig"]["num_processes"]) is int
    assert parallel["modelConfig"]["gradient_checkpointing"] is True


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"dryRun": True, "maxSteps": 0}, "maxSteps"),
        ({"dryRun": True, "maxSteps": "many"}, "maxSteps"),
        ({"dryRun": True, "maxSteps": 2**40}, "maxSteps"),
        ({"dryRun": True, "learningRate": -1}, "config.learning_rate"),
        ({"dryRun": "yes"}, "dryRun"),
        ({"dryRun": True, "config": {"colour": "red"}}, "config.colour"),
        ({"dryRun": True, "config": {"batch_size": 2.5}}, "config.batch_size"),
        ({"dryRun": True, "config": {"use_lora": 1}}, "config.use_lora"),
        ({"dryRun": True, "config": {"num_processes": 0}}, "config.num_processes"),
        ({"dryRun": True, "config": {"num_processes": 3}}, "config.batch_size"),
        ({"dryRun": True, "rewardModelVersion": "seven"}, "rewardModelVersion"),
        ({"dryRun": True, "algorithm": "dpo"}, "algorithm"),
        ({"dryRun": True, "algorithmConfig": {"beta": 0.1}}, "algorithmConfig"),
        ({"dryRun": True, "algorithm": "grpo", "algorithmConfig": {"colour": 1}}, "algorithmConfig.colour"),
        (
            {"dryRun": True, "algorithm": "rloo", "algorithmConfig": {"num_generations": 1}},
            "algorithmConfig.num_generations",
        ),
    ],
)
def test_invalid_training_requests_are_400_naming_the_field(http, body, field):
    assert_error(http.post(f"/api/policies/train_policy/{AGENT}", json=body), 400, "invalid_argument", field)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_the_algorithm_is_chosen_by_name_and_the_dry_run_shows_its_knobs(http, algorithm):
    body = {"dryRun": True, "maxSteps": 20, "algorithm": algorithm, "algorithmConfig": {"num_generations": 4}}
    answer = http.post(f"/api/policies/train_policy/{AGENT}", json=body)
    assert answer.status_code == 200, answer.text
    estimate = answer.json()
    assert estimate["algorithm"] == algorithm and estimate["estimatedSteps"] == 20
    knobs = estimate["algorithmConfig"]
    assert knobs["num_generations"] == 4 and type(knobs["num_generations"]) is int  # the request's
    assert type(knobs["beta"]) is float and knobs["beta"] == (0.0 if algorithm == "grpo" else 0.05)  # TRL's default
    ppo = http.post(f"/api/policies/train_policy/{AGENT}", json={"dryRun": True, "maxSteps": 20}).json()
    assert ppo["algorithm"] == "ppo" and "algorithmConfig" not in ppo


def test_fewer_than_ten_items_is_422(http):
    for dry_run in (True, False):
        answer = http.post(f"/api/policies/train_policy/{FEW}", json={"dryRun": dry_run, "maxSteps": 2})
        body = assert_error(answer, 422, "not_enough_feedback")
        assert "3 feedback items" in body["message"] and "at least 10" in body["message"]
        assert body["violations"][0]["type"] == "FEEDBACK_COUNT"


# -- policies, jobs and unknown things ----------------------------------------------------------------------


def test_policy_list_of_an_agent_without_policies_is_an_empty_array(http):
    answer = http.get("/api/policies/gw-nobody")
    assert answer.status_code == 200 and answer.json() == []
    assert_error(http.get("/api/policies/bad agent!"), 400, "invalid_argument", "agentId")


def test_unknown_jobs_routes_and_methods_are_json_errors(http):
    assert_error(http.get("/api/jobs/no-such-job"), 404, "not_found")
    assert_error(http.get("/api/jobs/no-such-job/events"), 404, "not_found")
    assert_error(http.post("/api/jobs/no-such-job/cancel"), 404, "not_found")
    assert_error(http.get("/api/nothing-here"), 404, "not_found")
    assert_error(http.delete("/api/policies/gw-agent"), 405, "method_not_allowed")


def test_openapi_docs_and_health(http, stack):
    spec = http.get("/openapi.json").json()
    assert {
        "/api/policies/feedback/{agent_id}",
        "/api/policies/train_policy/{agent_id}",
        "/api/policies/{agent_id}",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/events",
        "/healthz",
    } <= set(spec["paths"])
    feedback_schema = spec["components"]["schemas"]["FeedbackIn"]["properties"]
    assert {"prompt", "response", "score", "runId", "notes"} <= set(feedback_schema)
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    health = http.get("/healthz")
    assert health.status_code == 200, health.text
    feedback, _, policy = stack
    assert health.json() == {
        "status": "ok",
        "backends": {
            "feedback": {"address": feedback.address, "reachable": True},
            "policy": {"address": policy.address, "reachable": True},
        },
    }


def test_a_service_that_is_down_is_503_with_retry_after(stack, tmp_path):
    """A gateway whose feedback service stops: feedback is 503 with Retry-After, health says which one is down."""
    _, _, policy = stack
    feedback = ServerThread(
        start_feedback, FeedbackServiceConfig.from_env(server=server_config("feedback", tmp_path))
    ).__enter__()
    running = GatewayProcess(feedback.address, policy.address)
    try:
        with running.client() as http:
            item = {"prompt": "p", "response": "r", "score": 0.5}
            assert http.post("/api/policies/feedback/gw-down", json=item).status_code == 200
            feedback.stop()
            answer = http.post("/api/policies/feedback/gw-down", json=item)
            assert_error(answer, 503, "unavailable")
            assert int(answer.headers["retry-after"]) > 0
            health = http.get("/healthz")
            assert health.status_code == 503
            backends = health.json()["backends"]
            assert backends["feedback"]["reachable"] is False and backends["policy"]["reachable"] is True
    finally:
        feedback.stop()
        running.stop()
    assert "Traceback" not in running.log(), running.log()


# -- training: blocking, asynchronous, the event stream, version names --------------------------------------


def read_events(answer: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) of a server-sent event stream, as they arrive."""
    event, data = "", ""
    for line in answer.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line and event:
            yield event, json.loads(data)
            event, data = "", ""


@pytest.mark.slow  # ~40 s: a reward model and three short policy runs
def test_training_blocking_async_event_stream_conflict_and_seed_version_names(http, gateway, stack):
    # Blocking, as in the seed: the answer comes when the policy is trained. The reward model it trains first
    # uses the gateway's RLHF_GATEWAY_REWARD_MODEL_CONFIG.
    trained = http.post(
        f"/api/policies/train_policy/{AGENT}",
        json={"dryRun": False, "maxSteps": 2, "learningRate": 1e-3, "config": QUICK},
        timeout=300,
    )
    assert trained.status_code == 200, trained.text
    result = trained.json()
    assert result["status"] == "trained" and result["version"] == "v60"  # named after the 60 items
    assert result["feedbackCount"] == 60 and type(result["feedbackCount"]) is int
    assert result["trainingSteps"] == 2 and type(result["trainingSteps"]) is int
    assert isinstance(result["rewardMean"], float) and isinstance(result["rewardStd"], float)
    assert result["modelPath"].endswith("/v60/policy") and pathlib.Path(result["modelPath"]).is_dir()
    assert result["rewardModelPath"] and result["policyId"]

    # Asynchronous: 202 with the job's URL; a second run for the agent meanwhile is 409.
    started = http.post(
        f"/api/policies/train_policy/{AGENT}?async=true",
        json={"maxSteps": 10_000, "config": QUICK, "rewardModelVersion": "latest"},
    )
    assert started.status_code == 202, started.text
    job_url = started.headers["location"]
    assert started.json()["job"] == job_url and job_url.startswith(gateway.url + "/api/jobs/")
    busy = http.post(f"/api/policies/train_policy/{AGENT}", json={"maxSteps": 2, "rewardModelVersion": "latest"})
    assert started.json()["jobId"] in assert_error(busy, 409, "conflict")["message"]
    # A client that leaves a stream early ends only its own stream (the gateway's log stays clean: checked last).
    with http.stream("GET", f"{job_url}/events", timeout=300) as early:
        assert next(read_events(early))[0] == "progress"
    # The live stream: progress events as PPO steps go by; a cancel ends it with a done event.
    seen = []
    with http.stream("GET", f"{job_url}/events", timeout=300) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        for event, job in read_events(stream):
            seen.append((event, job["state"], job["progress"]["step"]))
            if event == "progress" and job["progress"]["phase"] == "training" and job["progress"]["step"] >= 1:
                cancelled = http.post(f"{job_url}/cancel")
                assert cancelled.status_code == 200 and cancelled.json()["jobId"] == started.json()["jobId"]
            if event == "done":
                assert job["state"] == "cancelled" and "result" not in job
    assert seen[-1][0] == "done" and all(event == "progress" for event, _, _ in seen[:-1]), seen
    assert any(step >= 1 for _, _, step in seen)
    assert_error(http.post(f"{job_url}/cancel"), 409, "conflict")  # it already ended
    status = http.get(job_url).json()
    assert status["state"] == "cancelled" and status["error"] == "cancelled by request"

    # Prefer: respond-async does the same; the stream's done event and the job carry the seed's result. A
    # second version on the same 60 items is v60.2: no version is ever overwritten.
    short = http.post(
        f"/api/policies/train_policy/{AGENT}",
        json={"maxSteps": 2, "config": QUICK, "rewardModelVersion": "latest"},
        headers={"Prefer": "respond-async"},
    )
    assert short.status_code == 202 and short.headers["preference-applied"] == "respond-async", short.text
    with http.stream("GET", f"{short.headers['location']}/events", timeout=300) as stream:
        events = list(read_events(stream))
    done = events[-1]
    assert done[0] == "done" and done[1]["state"] == "succeeded", events[-1]
    assert done[1]["result"]["status"] == "trained" and done[1]["result"]["version"] == "v60.2"
    job = http.get(short.headers["location"]).json()
    assert job["version"] == "v60.2" and job["result"]["trainingSteps"] == 2 and job["progress"]["step"] == 2

    # A blocking call whose job is cancelled meanwhile answers 409 with the job's URL (no policy, no 500).
    outcome: dict[str, httpx.Response] = {}

    def train_blocking() -> None:
        with gateway.client(timeout=300) as own:
            body = {"maxSteps": 10_000, "config": QUICK, "rewardModelVersion": "latest"}
            outcome["answer"] = own.post(f"/api/policies/train_policy/{AGENT}", json=body)

    blocking = threading.Thread(target=train_blocking)
    blocking.start()

    def running_job() -> str:  # the blocking call's job, once it trains (found through the policy service)
        with PolicyClient(stack[2].address) as policy:
            jobs, _ = policy.list_jobs(agent_id=AGENT, state=pol.JOB_STATE_RUNNING)
        return next((job.job_id for job in jobs if job.progress.step >= 1), "")

    job_id = wait_for(running_job, timeout=120, interval=0.5)
    assert http.post(f"/api/jobs/{job_id}/cancel").status_code == 200
    blocking.join(120)
    body = assert_error(outcome["answer"], 409, "cancelled")
    assert body["jobId"] == job_id and body["job"].endswith(f"/api/jobs/{job_id}")

    # The list: a bare array, newest first, numbers as numbers.
    policies = http.get(f"/api/policies/{AGENT}").json()
    assert isinstance(policies, list) and [p["version"] for p in policies] == ["v60.2", "v60"]
    first = policies[1]
    assert first["id"] == result["policyId"] and first["agentId"] == AGENT and first["createdAt"].endswith("Z")
    assert first["metrics"]["feedbackCount"] == 60 and type(first["metrics"]["feedbackCount"]) is int
    assert first["metrics"]["rewardMean"] == result["rewardMean"]


# -- version naming in the registry -------------------------------------------------------------------------


def test_registry_names_versions_sequentially_or_after_the_feedback_count(tmp_path):
    def register(store: TrainingStore, count: int) -> str:
        folder = tmp_path / "artifacts"
        return store.registry.register_named(
            "agent", lambda _n, name: str(folder / name), "job", {"feedback_count": count}
        ).version

    seed = TrainingStore(make_engine(f"sqlite:///{tmp_path / 'seed.db'}"), "policies", "policy", FEEDBACK_COUNT)
    # The seed's incremental training: 15 items, ten more, twenty more; a second run on 45 items gets a suffix.
    assert [register(seed, n) for n in (15, 25, 45, 45, 45)] == ["v15", "v25", "v45", "v45.2", "v45.3"]
    assert seed.registry.get("agent", "v45.2").info["feedback_count"] == 45
    assert seed.registry.get("agent", "").version == "v45.3"  # the newest is the last registered
    assert [v.version for v in seed.registry.list("agent")] == ["v45.3", "v45.2", "v45", "v25", "v15"]
    # Switching the same registry to sequential naming never reuses a name: number 6 is v6, ... until a name
    # is taken by a count-named version.
    sequential = TrainingStore(seed.registry.engine, "policies", "policy", SEQUENTIAL)
    assert [register(sequential, 0) for _ in range(3)] == ["v6", "v7", "v8"]
    counted = TrainingStore(seed.registry.engine, "policies", "policy", FEEDBACK_COUNT)
    assert register(counted, 8) == "v8.2"
    # Every name is a valid version id for the services (GetPolicy, deployments).
    for version in seed.registry.list("agent"):
        assert check_version(version.version) == version.version
    with pytest.raises(ValueError, match="version naming"):
        TrainingStore(seed.registry.engine, "policies", "policy", "alphabetical")


def test_the_policy_list_has_every_version_past_a_page(http, stack):
    """More versions than one ListPolicies page (500): registered the way the policy service does, in its database."""
    _, _, policy = stack
    data_dir = policy.running.domain.config.server.data_dir
    store = TrainingStore(make_engine(f"sqlite:///{data_dir / 'policy.db'}"), "policies", "policy")
    info = {
        "feedback_count": 12,
        "final_reward_mean": 0.5,
        "final_reward_std": 0.25,
        "training_steps": 3,
        "final_kl": 0.1,
        "entropy": 2.0,
        "value_error": 0.01,
        "lineage": {
            "reward_model_path": "rm",
            "reward_model_version": "v1",
            "base_model": "b",
            "feedback_watermark": 1,
        },
        "algorithm": "ppo",
        "config": {},
    }
    for _ in range(520):
        store.registry.register("gw-many", lambda n: str(data_dir / "many" / f"v{n}"), "job", info)
    store.jobs.engine.dispose()
    policies = http.get("/api/policies/gw-many").json()
    assert [p["version"] for p in policies] == [f"v{n}" for n in range(520, 0, -1)]
    assert policies[0]["metrics"] == {
        "feedbackCount": 12,
        "rewardMean": 0.5,
        "rewardStd": 0.25,
        "trainingSteps": 3,
        "initialRewardMean": 0.0,
        "kl": 0.1,
    }
