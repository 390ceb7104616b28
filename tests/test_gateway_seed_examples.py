"""The seed document's Python examples that call the REST API, verbatim, against `rlhf serve all` (four services
and the gateway as real processes). Only the port differs from the seed's `http://localhost:8000`.

The stack runs as an operator would set it up for small runs: the policy service names versions after the
feedback count (the seed's v15, v25), and the gateway trains every run for 2 short PPO steps whatever
`maxSteps` asks (RLHF_GATEWAY_TRAINING_OVERRIDES) with a quick reward model (RLHF_GATEWAY_REWARD_MODEL_CONFIG).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest
import requests

from rlhf.training.config import TrainingConfig
from tests.test_cli import SERVICES, Served, _free_ports

BIN = pathlib.Path(sys.executable).parent
SEED_URL = "http://localhost:8000"

# -- the seed's code, verbatim ("Usage" 1-4, "Troubleshooting > 3. Low Reward", "Best Practices > 4. Monitoring")

COLLECT_FEEDBACK = """
import requests

response = requests.post(
    "http://localhost:8000/api/policies/feedback/my_agent",
    json={
        "prompt": "What is the capital of France?",
        "response": "The capital of France is Paris.",
        "score": 0.9,  # Score between 0 (bad) and 1 (excellent)
        "runId": "execution_123",
        "notes": "Accurate and concise answer"
    }
)
"""

DRY_RUN = """
response = requests.post(
    "http://localhost:8000/api/policies/train_policy/my_agent",
    json={
        "dryRun": True,
        "maxSteps": 1000,
        "learningRate": 1e-5
    }
)

estimate = response.json()
print(f"Feedback count: {estimate['feedbackCount']}")
print(f"Estimated time: {estimate['estimatedTimeMinutes']} minutes")
print(f"Score mean: {estimate['scoreMean']}")
"""

TRAIN = """
response = requests.post(
    "http://localhost:8000/api/policies/train_policy/my_agent",
    json={
        "dryRun": False,
        "maxSteps": 1000,
        "learningRate": 1e-5
    }
)

result = response.json()
print(f"Policy ID: {result['policyId']}")
print(f"Version: {result['version']}")
print(f"Model path: {result['modelPath']}")
print(f"Training steps: {result['trainingSteps']}")
print(f"Final reward: {result['rewardMean']} ± {result['rewardStd']}")
"""

LIST_POLICIES = """
response = requests.get("http://localhost:8000/api/policies/my_agent")
policies = response.json()

for policy in policies:
    print(f"{policy['version']}: {policy['metrics']['rewardMean']:.3f}")
"""

LOW_REWARD = """
# Review feedback scores
response = requests.get("http://localhost:8000/api/policies/my_agent")
policies = response.json()

# Ensure feedback is high-quality
# - Scores should vary (not all 0.5)
# - Good examples should have scores > 0.7
# - Bad examples should have scores < 0.3

config = TrainingConfig(
    max_steps=2000,  # More training steps
)
"""

MONITORING = """
versions = ["v15", "v25", "v35"]
rewards = [0.75, 0.82, 0.88]  # Increasing = good!
stds = [0.20, 0.15, 0.12]     # Decreasing = more consistent
"""

OPERATOR_ENV = {
    "RLHF_POLICY_VERSION_NAMING": "feedback_count",
    "RLHF_GATEWAY_TRAINING_OVERRIDES": json.dumps(
        {"max_steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 8}
    ),
    "RLHF_GATEWAY_REWARD_MODEL_CONFIG": json.dumps(
        {"use_lora": False, "num_epochs": 1, "batch_size": 16, "learning_rate": 5e-4}
    ),
}


def serve_all_with_gateway(data_dir: pathlib.Path, timeout: float = 120.0) -> tuple[Served, int]:
    """`rlhf serve all` on free ports, the gateway's among them; returns once all five say where they listen."""
    for _ in range(3):
        ports = dict(zip([*SERVICES, "gateway"], _free_ports(len(SERVICES) + 1), strict=True))
        args = [str(BIN / "rlhf"), "serve", "all", "--data-dir", str(data_dir)]
        for name, port in ports.items():
            args += [f"--{name}-port", str(port)]
        process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, **OPERATOR_ENV, "PYTHONUNBUFFERED": "1"},
        )
        lines: list[str] = []
        assert process.stdout is not None
        reader = threading.Thread(target=lines.extend, args=(process.stdout,), daemon=True)
        reader.start()
        served = Served(ports, dict(os.environ), process, lines, reader)
        expected = [f"{name} service listening on 127.0.0.1:{port}" for name, port in ports.items()]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None and "already in use" not in served.output():
            if all(line in served.output() for line in expected):
                return served, ports["gateway"]
            time.sleep(0.1)
        served.stop()
        if "already in use" not in served.output():
            raise AssertionError(f"rlhf serve all did not start:\n{served.output()}")
    raise AssertionError("ports were taken by others 3 times in a row")


@pytest.fixture(scope="module")
def gateway_port(tmp_path_factory, tiny_model):
    served, port = serve_all_with_gateway(tmp_path_factory.mktemp("seed"))
    yield port
    served.stop()
    assert "Traceback" not in served.output(), served.output()
    assert "gateway gateway.app: stopped" in served.output()  # the gateway shut down gracefully too


def run_seed(code: str, port: int, namespace: dict) -> str:
    """Run one of the seed's snippets with only the port changed; what it printed."""
    assert SEED_URL in code or "requests" not in code
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code.replace(SEED_URL, f"http://localhost:{port}"), namespace)
    return printed.getvalue()


@pytest.mark.slow  # ~90 s: five processes, two reward models and two short policy runs
def test_the_seeds_rest_examples_run_unchanged(gateway_port):
    seed: dict = {"TrainingConfig": TrainingConfig}  # the low-reward snippet uses the library's config
    run_seed(COLLECT_FEEDBACK, gateway_port, seed)
    assert seed["response"].status_code == 200, seed["response"].text
    assert seed["response"].json()["agentId"] == "my_agent" and seed["response"].json()["score"] == 0.9

    # "Minimum 10 feedback samples required for training."
    too_few = requests.post(f"http://localhost:{gateway_port}/api/policies/train_policy/my_agent", json={})
    assert too_few.status_code == 422 and "at least 10" in too_few.json()["message"]

    def rate(count: int, offset: int) -> None:
        for i in range(offset, offset + count):
            good = i % 2 == 0
            answer = requests.post(
                f"http://localhost:{gateway_port}/api/policies/feedback/my_agent",
                json={
                    "prompt": f"Question number {i}: what is the capital of France?",
                    "response": "The capital of France is Paris." if good else "I like turtles.",
                    "score": 0.9 if good else 0.1,
                    "runId": f"execution_{i}",
                },
            )
            assert answer.status_code == 200, answer.text

    rate(14, 1)  # 15 items in all, as in the seed

    printed = run_seed(DRY_RUN, gateway_port, seed)
    assert seed["response"].status_code == 200, seed["response"].text
    lines = printed.splitlines()
    assert lines[0] == "Feedback count: 15" and lines[1].startswith("Estimated time: ")
    assert lines[2].startswith("Score mean: 0.")
    assert seed["estimate"]["modelConfig"]["max_steps"] == 2  # the operator's override, reported as what runs

    printed = run_seed(TRAIN, gateway_port, seed)
    assert seed["response"].status_code == 200, seed["response"].text
    assert seed["result"]["status"] == "trained"
    lines = printed.splitlines()
    assert lines[0] == f"Policy ID: {seed['result']['policyId']}" and lines[1] == "Version: v15"
    assert lines[2].startswith("Model path: ") and lines[2].endswith("/my_agent/v15/policy")
    assert lines[3] == "Training steps: 2" and lines[4].startswith("Final reward: 0.")

    printed = run_seed(LIST_POLICIES, gateway_port, seed)
    assert printed == f"v15: {seed['result']['rewardMean']:.3f}\n"

    # "Add 10 more samples -> retrain: Version v25"
    rate(10, 15)
    printed = run_seed(TRAIN, gateway_port, seed)
    assert seed["response"].status_code == 200, seed["response"].text
    assert printed.splitlines()[1] == "Version: v25"
    assert [line.split(":")[0] for line in run_seed(LIST_POLICIES, gateway_port, seed).splitlines()] == ["v25", "v15"]

    run_seed(LOW_REWARD, gateway_port, seed)
    assert [p["version"] for p in seed["policies"]] == ["v25", "v15"]
    assert all(0.0 <= p["metrics"]["rewardMean"] <= 1.0 for p in seed["policies"])
    assert seed["config"].max_steps == 2000
    run_seed(MONITORING, gateway_port, seed)
    assert seed["versions"][:2] == [p["version"] for p in reversed(seed["policies"])]
