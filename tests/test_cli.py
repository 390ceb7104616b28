"""`rlhf serve all` as users run it: four processes, reachable by a generic reflection client (buf curl),
driven by the `rlhf` command line, and stopped cleanly by SIGINT."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from rlhf.runtime.db import make_engine
from rlhf.runtime.registry import Version
from rlhf.runtime.training_store import TrainingStore

BIN = pathlib.Path(sys.executable).parent
SERVICES = {
    "feedback": "rlhf.feedback.v1.FeedbackService",
    "reward": "rlhf.reward.v1.RewardService",
    "policy": "rlhf.policy.v1.PolicyService",
    "inference": "rlhf.inference.v1.InferenceService",
}
SEEDED = "seeded-agent"  # has registered policies and reward models (see seed_registries)


# --- a stack of four processes on ports nobody else holds ------------------------------------------------


@dataclasses.dataclass
class Served:
    ports: dict[str, int]
    env: dict[str, str]
    process: subprocess.Popen
    lines: list[str]  # the supervisor's and the services' output, appended by a reader thread
    reader: threading.Thread

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> None:
        """SIGINT (what Ctrl-C sends); the whole process group is killed if that did not stop it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # services left behind, if any
        self.process.wait()
        self.reader.join(10)


def _free_ports(count: int) -> list[int]:
    """Ports the kernel calls free now. `rlhf serve all` needs them up front (each service is told where the
    others are), so they cannot be port 0; another process may take one before our service binds it, and
    serve_all then sees the service fail with "already in use" and starts again on other ports."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:  # all bound at once, so they are distinct
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def serve_all(data_dir: pathlib.Path, attempts: int = 3, timeout: float = 120.0) -> Served:
    """`rlhf serve all` with every service listening on its port: known from each service's own
    'listening on' log line, not from a health check that any server on that port would answer."""
    for _ in range(attempts):
        ports = dict(zip(SERVICES, _free_ports(len(SERVICES)), strict=True))
        args = [str(BIN / "rlhf"), "serve", "all", "--data-dir", str(data_dir)]
        for name, port in ports.items():
            args += [f"--{name}-port", str(port)]
        args += ["--gateway-port", "0"]  # the REST gateway too, on a free port (8000 may be anyone's)
        process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a failed start can be cleaned up entirely
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        lines: list[str] = []
        assert process.stdout is not None
        reader = threading.Thread(target=lines.extend, args=(process.stdout,), daemon=True)
        reader.start()
        env = {**os.environ, **{f"RLHF_{n.upper()}_ADDR": f"127.0.0.1:{p}" for n, p in ports.items()}}
        served = Served(ports, env, process, lines, reader)
        expected = [f"{name} service listening on 127.0.0.1:{port}" for name, port in ports.items()]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            output = served.output()
            if all(line in output for line in expected) and "already in use" not in output:
                return served
            time.sleep(0.1)
        served.stop()
        if "already in use" not in served.output():
            raise AssertionError(f"rlhf serve all did not start:\n{served.output()}")
    raise AssertionError(f"ports were taken by others {attempts} times in a row:\n{served.output()}")


def seed_registries(data_dir: pathlib.Path) -> dict[str, list[Version]]:
    """Register two policy versions and one reward model of SEEDED the way the services do (their registry
    code, their databases in the data dir), so the CLI's tables have real rows without training for minutes."""
    policies = TrainingStore(make_engine(f"sqlite:///{data_dir / 'policy.db'}"), "policies", "policy")
    rewards = TrainingStore(make_engine(f"sqlite:///{data_dir / 'reward.db'}"), "reward_models", "reward model")

    def folder(kind: str, number: int) -> str:
        path = data_dir / "artifacts" / kind / SEEDED / f"v{number}"
        path.mkdir(parents=True)
        return str(path)

    lineage = {
        "reward_model_path": "rm",
        "reward_model_version": "v1",
        "base_model": "rlhf-tiny",
        "feedback_watermark": 9,
    }
    made: dict[str, list[Version]] = {"policies": [], "reward_models": []}
    for steps, reward, kl in ((120, 0.75, 1.25), (340, 0.875, 2.5)):
        info = {
            "feedback_count": 50,
            "final_reward_mean": reward,
            "final_reward_std": 0.1,
            "training_steps": steps,
            "final_kl": kl,
            "entropy": 3.0,
            "value_error": 0.01,
            "lineage": lineage,
            "algorithm": "ppo",
            "config": {},
        }
        made["policies"].append(policies.registry.register(SEEDED, lambda n: folder("policies", n), "job-p", info))
    reward_info = {
        "feedback_watermark": 9,
        "feedback_count": 42,
        "rating_count": 40,
        "comparison_count": 2,
        "metrics": {"pearson": 0.91, "spearman": 0.875, "validation_count": 8},
        "normalization": {"mean": 0.5, "std": 0.2},
        "config": {"base_model": "rlhf-tiny"},
    }
    made["reward_models"].append(
        rewards.registry.register(SEEDED, lambda n: folder("reward_models", n), "job-r", reward_info)
    )
    policies.jobs.engine.dispose()
    rewards.jobs.engine.dispose()
    return made


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> tuple[pathlib.Path, dict[str, list[Version]]]:
    data_dir = tmp_path_factory.mktemp("serve")
    return data_dir, seed_registries(data_dir)


@pytest.fixture(scope="module")
def served(seeded, tiny_model):
    running = serve_all(seeded[0])
    yield running
    running.stop()


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


def stamp(created: dt.datetime) -> list[str]:
    """How the tables print a creation time (UTC): date and time, two columns."""
    return f"{created.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M:%S}".split()


# --- tests -----------------------------------------------------------------------------------------------


def test_reflection_lists_every_service(served):
    for name, full_name in SERVICES.items():
        listed = buf_curl("--list-services", f"http://127.0.0.1:{served.ports[name]}").split()
        assert full_name in listed and "grpc.health.v1.Health" in listed


def test_seed_shaped_json_through_reflection(served):
    base = f"http://127.0.0.1:{served.ports['feedback']}/rlhf.feedback.v1.FeedbackService"
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


@pytest.mark.slow  # ~6 s: a dozen `rlhf` processes, one loads the model to generate
def test_command_line_workflow(served):
    env = served.env
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
    assert stats["stats"]["feedback_count"] == 10  # a number, not protobuf's JSON string
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
    missing = rlhf(env, "policies", "show", "cli-agent")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr and "train one first" in missing.stderr
    for kind in ([], ["--reward"]):
        jobs = rlhf(env, "jobs", "list", "--agent-id", "cli-agent", "--json", *kind)
        assert jobs.returncode == 0 and json.loads(jobs.stdout) == []
        cancel = rlhf(env, "jobs", "cancel", "no-such-job", *kind)
        assert cancel.returncode == 2 and "NOT_FOUND" in cancel.stderr
    resume = rlhf(env, "jobs", "resume", "no-such-job")
    assert resume.returncode == 2 and "NOT_FOUND" in resume.stderr


def test_policies_list_prints_one_row_per_version_newest_first(served, seeded):
    v1, v2 = seeded[1]["policies"]
    listed = rlhf(served.env, "policies", "list", SEEDED)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["version", "created", "steps", "reward", "kl", "reward", "model", "path"]
    assert [row.split() for row in rows] == [
        ["v2", *stamp(v2.created_at), "340", "0.875", "2.500", "v1", f"{v2.path}/policy"],
        ["v1", *stamp(v1.created_at), "120", "0.750", "1.250", "v1", f"{v1.path}/policy"],
    ]
    as_json = json.loads(rlhf(served.env, "policies", "list", SEEDED, "--json").stdout)
    assert [(p["version"], p["metrics"]["training_steps"]) for p in as_json] == [("v2", 340), ("v1", 120)]
    assert as_json[0]["metrics"]["feedback_count"] == 50  # int64 as a number
    shown = json.loads(rlhf(served.env, "policies", "show", SEEDED, "v1", "--json").stdout)
    assert (shown["version"], shown["model_path"], shown["reward_model_version"]) == ("v1", f"{v1.path}/policy", "v1")
    # one object for people: a field/value table with nested fields dotted, not protobuf JSON
    human = rlhf(served.env, "policies", "show", SEEDED, "v1").stdout
    fields = dict(line.split(maxsplit=1) for line in human.splitlines()[1:] if len(line.split()) > 1)
    assert fields["version"] == "v1" and fields["metrics.training_steps"] == "120" and "{" not in human
    assert fields["metrics.entropy"] == "3.000" and fields["metrics.initial_reward_mean"] == "0.000"

    empty = rlhf(served.env, "policies", "list", "cli-nobody")  # an agent without versions: the header alone
    assert empty.returncode == 0 and [line.split() for line in empty.stdout.splitlines()] == [header.split()]
    assert "cli-nobody has no trained policy versions yet (rlhf train cli-nobody)" in empty.stderr


def test_reward_models_list_and_show(served, seeded):
    (v1,) = seeded[1]["reward_models"]
    listed = rlhf(served.env, "reward-models", "list", SEEDED)
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["version", "created", "feedback", "ratings", "comparisons", "validation"]
    # validation_count is left out of the metrics column
    assert [row.split(maxsplit=6) for row in rows] == [
        ["v1", *stamp(v1.created_at), "42", "40", "2", "pearson 0.910, spearman 0.875"]
    ]
    empty = rlhf(served.env, "reward-models", "list", "cli-nobody")
    assert empty.returncode == 0 and [line.split() for line in empty.stdout.splitlines()] == [header.split()]
    shown = json.loads(rlhf(served.env, "reward-models", "show", SEEDED, "--json").stdout)
    assert shown["version"] == "v1" and shown["feedback_count"] == 42 and shown["metrics"]["pearson"] == 0.91
    human = rlhf(served.env, "reward-models", "show", SEEDED, "v1").stdout
    fields = dict(line.split(maxsplit=1) for line in human.splitlines() if len(line.split()) > 1)
    assert fields["rating_count"] == "40" and fields["metrics.spearman"] == "0.875"
    missing = rlhf(served.env, "reward-models", "show", SEEDED, "v9")
    assert missing.returncode == 2 and missing.stderr.startswith("rlhf: error: NOT_FOUND:")


@pytest.mark.slow  # ~5 s: a whole stack of its own
def test_sigint_stops_every_service(tmp_path):
    """Its own stack: stopping the shared one would break whichever test ran after this one."""
    running = serve_all(tmp_path)
    try:
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=60) == 0, running.output()
    finally:
        running.stop()
    for port in running.ports.values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    output = running.output()
    assert "Traceback" not in output, output
    for name in SERVICES:  # every service went through its graceful shutdown
        assert f" {name} rlhf.runtime.server: stopped" in output, output
