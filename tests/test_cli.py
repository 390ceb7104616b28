"""`rlhf serve all` as users run it: four processes, reachable by a generic reflection client (buf curl),
driven by the `rlhf` command line, and stopped cleanly by SIGINT."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from rlhf.sdk.clients import wait_until_serving

BIN = pathlib.Path(sys.executable).parent
SERVICES = {
    "feedback": "rlhf.feedback.v1.FeedbackService",
    "reward": "rlhf.reward.v1.RewardService",
    "policy": "rlhf.policy.v1.PolicyService",
    "inference": "rlhf.inference.v1.InferenceService",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    data_dir = tmp_path_factory.mktemp("serve")
    ports = {name: free_port() for name in SERVICES}
    args = [str(BIN / "rlhf"), "serve", "all", "--data-dir", str(data_dir)]
    for name, port in ports.items():
        args += [f"--{name}-port", str(port)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for port in ports.values():
            wait_until_serving(f"127.0.0.1:{port}", timeout=120)
    except TimeoutError:
        process.kill()
        raise AssertionError(process.communicate()[0]) from None
    env = {**os.environ, **{f"RLHF_{n.upper()}_ADDR": f"127.0.0.1:{p}" for n, p in ports.items()}}
    yield ports, env, process
    if process.poll() is None:
        process.kill()
        process.wait()


def buf_curl(*args: str) -> str:
    result = subprocess.run(
        [str(BIN / "buf"), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def rlhf(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rlhf"), *args], capture_output=True, text=True, env=env, timeout=120)


def test_reflection_lists_every_service(served):
    ports, _, _ = served
    for name, full_name in SERVICES.items():
        listed = buf_curl("--list-services", f"http://127.0.0.1:{ports[name]}").split()
        assert full_name in listed and "grpc.health.v1.Health" in listed


def test_seed_shaped_json_through_reflection(served):
    ports, _, _ = served
    base = f"http://127.0.0.1:{ports['feedback']}/rlhf.feedback.v1.FeedbackService"
    body = {
        "agentId": "reflect",
        "prompt": "What is the capital of France?",
        "response": "The capital of France is Paris.",
        "score": 0.9,
        "runId": "execution_123",
        "notes": "Accurate and concise answer",
    }
    answer = json.loads(buf_curl("-d", json.dumps(body), f"{base}/SubmitFeedback"))
    assert answer["agentId"] == "reflect" and answer["score"] == 0.9 and answer["id"] and answer["createdAt"]
    stats = json.loads(buf_curl("-d", '{"agentId": "reflect"}', f"{base}/GetFeedbackStats"))
    assert stats["stats"]["feedbackCount"] == "1" and stats["stats"]["scoreMean"] == 0.9


def test_command_line_workflow(served):
    _, env, _ = served
    for i in range(10):
        result = rlhf(
            env,
            "feedback",
            "submit",
            "cli-agent",
            "--prompt",
            f"Question {i}?",
            "--response",
            f"Answer {i}.",
            "--score",
            str(i / 10),
            "--json",
        )
        assert result.returncode == 0, result.stderr
    stats = json.loads(rlhf(env, "feedback", "stats", "cli-agent", "--json").stdout)
    assert stats["stats"]["feedback_count"] == "10"
    dry = rlhf(env, "train", "cli-agent", "--dry-run", "--max-steps", "50", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["estimated_steps"] == 50
    bad = rlhf(env, "feedback", "submit", "cli-agent", "--prompt", "p", "--response", "r", "--score", "2")
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "score" in bad.stderr
    generated = rlhf(
        env, "generate", "cli-agent", "What did you see today?", "--version", "base", "--seed", "1", "--json"
    )
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["policy_version"] == "base"
    empty = rlhf(env, "policies", "list", "cli-agent")
    assert empty.returncode == 0 and "version" in empty.stdout
    missing = rlhf(env, "policies", "show", "cli-agent")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr and "train one first" in missing.stderr
    for kind in ([], ["--reward"]):
        jobs = rlhf(env, "jobs", "list", "--agent-id", "cli-agent", "--json", *kind)
        assert jobs.returncode == 0 and json.loads(jobs.stdout) == []
        cancel = rlhf(env, "jobs", "cancel", "no-such-job", *kind)
        assert cancel.returncode == 2 and "NOT_FOUND" in cancel.stderr
    resume = rlhf(env, "jobs", "resume", "no-such-job")
    assert resume.returncode == 2 and "NOT_FOUND" in resume.stderr
    models = rlhf(env, "reward-models", "list", "cli-agent")
    assert models.returncode == 0 and "version" in models.stdout


def test_sigint_stops_every_service(served):
    ports, _, process = served
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    for port in ports.values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
