"""TLS on every hop, with a throwaway CA made here by openssl (issue 9): plaintext and untrusted clients fail;
the SDK, the services' calls to each other, the CLI and the REST gateway (HTTPS, 401/403) work over TLS with
tokens."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import ssl
import subprocess
import sys

import grpc
import httpx
import pytest

from rlhf.runtime import auth
from rlhf.runtime.config import SecurityConfig
from rlhf.runtime.tls import TlsConfigError, channel_credentials
from rlhf.sdk.clients import FeedbackClient, PolicyClient, feedback_request
from tests.servers import ROOT, ServiceProcess
from tests.stack import start_stack

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a throwaway CA")
ADMIN, AGENT = "tls-admin-token", "tls-agent-token"
SECURITY_VARIABLES = ("RLHF_TOKEN", "RLHF_TLS_CA_FILE", "RLHF_TLS_CERT_FILE", "RLHF_TLS_KEY_FILE")


def openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(folder: pathlib.Path, name: str) -> pathlib.Path:
    """A CA (name.pem, name.key) and a certificate it signed for 127.0.0.1 and localhost (name-leaf.*)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "1",
        "-subj",
        f"/CN={name}",
        cwd=folder,
    )
    openssl("req", *ec, "-keyout", f"{name}-leaf.key", "-out", f"{name}-leaf.csr", "-subj", "/CN=localhost", cwd=folder)
    (folder / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    openssl(
        "x509", "-req", "-in", f"{name}-leaf.csr", "-CA", f"{name}.pem", "-CAkey", f"{name}.key",
        "-CAcreateserial", "-out", f"{name}-leaf.pem", "-days", "1", "-extfile", "ext.cnf", cwd=folder,
    )  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("certs")
    make_ca(folder, "ca")
    make_ca(folder, "stranger")  # a CA nobody trusts
    return folder


@pytest.fixture(scope="module")
def stack(certs: pathlib.Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("tls")
    tokens = data_dir / "tokens.json"
    tokens.write_text(
        json.dumps(
            [
                {"sha256": auth.digest(ADMIN), "role": "admin"},
                {"sha256": auth.digest(AGENT), "role": "agent", "agents": ["a1"]},
            ]
        )
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RLHF_AUTH_TOKENS_FILE", str(tokens))
        env.setenv("RLHF_TLS_CERT_FILE", str(certs / "ca-leaf.pem"))
        env.setenv("RLHF_TLS_KEY_FILE", str(certs / "ca-leaf.key"))
        env.setenv("RLHF_TLS_CA_FILE", str(certs / "ca.pem"))
        env.setenv("RLHF_TOKEN", ADMIN)  # the services' own token for their calls to each other
        running = start_stack(data_dir, with_inference=False)
        yield running
        running.stop()


def tls(certs: pathlib.Path, ca: str = "ca", token: str = ADMIN) -> SecurityConfig:
    return SecurityConfig(token=token, ca_file=str(certs / f"{ca}.pem"), cert_file="", key_file="")


def test_plaintext_and_untrusted_clients_fail(stack, certs: pathlib.Path) -> None:
    with FeedbackClient(stack.feedback.address, security=SecurityConfig(token=ADMIN, ca_file="")) as plain:
        with pytest.raises(grpc.RpcError) as caught:
            plain.stats("a1")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with FeedbackClient(stack.feedback.address, security=tls(certs, "stranger")) as untrusted:
        with pytest.raises(grpc.RpcError) as caught:
            untrusted.stats("a1")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sdk_and_service_to_service_calls_work_over_tls(stack, certs: pathlib.Path) -> None:
    with FeedbackClient(stack.feedback.address, security=tls(certs)) as client:
        assert client.submit("a1", prompt="p", response="r", score=0.5).id
        assert client.stats("a1").stats.feedback_count == 1
    with FeedbackClient(stack.feedback.address, security=tls(certs, token="")) as anonymous:
        with pytest.raises(grpc.RpcError) as caught:
            anonymous.stats("a1")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A dry run makes the policy service ask the feedback service, over TLS with its own token: an answer.
    with PolicyClient(stack.policy.address, security=tls(certs)) as policy:
        with pytest.raises(grpc.RpcError) as caught:
            policy.train_policy("a1", dry_run=True)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION, caught.value.details()
        assert "has 1 feedback items" in caught.value.details()


def test_a_missing_tls_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(TlsConfigError, match="RLHF_TLS_CA_FILE=.*cannot read"):
        channel_credentials(SecurityConfig(ca_file=str(tmp_path / "missing.pem")))


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SECURITY_VARIABLES and k != "RLHF_AUTH_TOKENS_FILE"}


def test_cli_takes_token_and_tls_from_flags(stack, certs: pathlib.Path) -> None:
    base = [sys.executable, "-m", "rlhf.sdk.cli", "feedback", "list", "a1", "--json"]
    base += ["--feedback-addr", stack.feedback.address]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], capture_output=True, text=True, env=clean_env(), cwd=ROOT, timeout=60)

    with FeedbackClient(stack.feedback.address, security=tls(certs)) as client:
        client.submit("a1", prompt="from the cli test", response="r", score=0.5)
    ok = run("--tls-ca", str(certs / "ca.pem"), "--token", AGENT)
    assert ok.returncode == 0, ok.stderr
    assert "from the cli test" in [row["prompt"] for row in json.loads(ok.stdout)]
    anonymous = run("--tls-ca", str(certs / "ca.pem"))
    assert anonymous.returncode == 2 and "UNAUTHENTICATED" in anonymous.stderr and "RLHF_TOKEN" in anonymous.stderr
    plaintext = run("--token", AGENT)
    assert plaintext.returncode == 3 and "if it serves TLS, pass its CA with --tls-ca" in plaintext.stderr
    untrusted = run("--tls-ca", str(certs / "stranger.pem"), "--token", AGENT)
    assert untrusted.returncode == 3 and "TLS handshake" in untrusted.stderr, untrusted.stderr
    assert untrusted.stderr.count("\n") == 1 and untrusted.stderr.startswith("rlhf: error: ")  # one line
    missing = run("--tls-ca", str(certs / "missing.pem"), "--token", AGENT)
    assert missing.returncode == 2 and "RLHF_TLS_CA_FILE" in missing.stderr and "Traceback" not in missing.stderr


def test_gateway_serves_https_and_answers_401_and_403(stack, certs: pathlib.Path) -> None:
    env = {
        "RLHF_TLS_CERT_FILE": str(certs / "ca-leaf.pem"),
        "RLHF_TLS_KEY_FILE": str(certs / "ca-leaf.key"),
        "RLHF_TLS_CA_FILE": str(certs / "ca.pem"),
        "RLHF_TOKEN": ADMIN,  # never used for callers: a call without a token stays without one
    }
    gateway = ServiceProcess(
        "gateway", None, "--feedback-addr", stack.feedback.address, "--policy-addr", stack.policy.address, env=env
    )
    try:
        url = f"https://127.0.0.1:{gateway.port}/api/policies/feedback"
        rating = {"prompt": "p", "response": "r", "score": 0.5}
        with httpx.Client(verify=ssl.create_default_context(cafile=certs / "ca.pem"), timeout=30) as http:
            anonymous = http.post(f"{url}/a1", json=rating)
            assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
            assert "Authorization: Bearer" in anonymous.json()["message"]
            bad = http.post(f"{url}/a1", json=rating, headers={"Authorization": "Bearer wrong"})
            assert bad.status_code == 401
            agent = {"Authorization": f"Bearer {AGENT}"}
            assert http.post(f"{url}/a1", json=rating, headers=agent).status_code == 200
            assert http.post(f"{url}/a2", json=rating, headers=agent).status_code == 403
            assert http.get(f"https://127.0.0.1:{gateway.port}/api/policies/a2", headers=agent).status_code == 403
            events = f"https://127.0.0.1:{gateway.port}/api/jobs/no-such-job/events"
            assert http.get(events).status_code == 401
            assert http.get(events, headers=agent).status_code == 404  # the token went along: an answer
            admin = {"Authorization": f"Bearer {ADMIN}"}
            assert http.get(f"https://127.0.0.1:{gateway.port}/api/policies/a2", headers=admin).status_code == 200
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=10) as plain:
            plain.post(f"http://127.0.0.1:{gateway.port}/api/policies/feedback/a1", json=rating)
    finally:
        gateway.kill()


def test_servers_can_require_client_certificates(certs: pathlib.Path, tmp_path: pathlib.Path) -> None:
    from feedback_service.app import start as start_feedback
    from feedback_service.config import FeedbackServiceConfig
    from rlhf.runtime.config import ServerConfig
    from tests.servers import ServerThread

    leaf = {"cert_file": str(certs / "ca-leaf.pem"), "key_file": str(certs / "ca-leaf.key")}
    server_security = SecurityConfig(tokens_file="", ca_file=str(certs / "ca.pem"), require_client_cert=True, **leaf)
    config = FeedbackServiceConfig(server=ServerConfig(service="feedback", data_dir=tmp_path, security=server_security))
    with ServerThread(start_feedback, config) as server:
        with FeedbackClient(server.address, security=tls(certs)) as without_certificate:
            with pytest.raises(grpc.RpcError) as caught:
                without_certificate.stats("a1")
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with FeedbackClient(server.address, security=dataclasses.replace(tls(certs), **leaf)) as with_certificate:
            assert with_certificate.stats("a1").stats.feedback_count == 0


@pytest.mark.slow
def test_a_training_run_works_end_to_end_over_tls_with_tokens(stack, certs: pathlib.Path) -> None:
    """The workers the services start get their TLS settings and token too: the reward-model job reads the
    feedback, the policy job exports prompts and scores every rollout through ScoreBatch, all over TLS."""
    from rlhf.policy.v1 import policy_service_pb2 as pol
    from rlhf.reward.v1 import reward_service_pb2 as rw
    from tests.helpers import rated_answers

    with FeedbackClient(stack.feedback.address, security=tls(certs)) as feedback:
        items = [feedback_request("tls-train", prompt=p, response=r, score=s) for p, r, s in rated_answers(20)]
        assert all(ack.accepted for ack in feedback.stream(iter(items)))
    request = pol.TrainPolicyRequest(
        agent_id="tls-train",
        max_steps=2,
        config=pol.TrainingConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=8, learning_rate=1e-3),
        reward_model_config=rw.RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16),
    )
    with PolicyClient(stack.policy.address, security=tls(certs)) as policy:
        final = list(policy.watch(policy.train(request).job.job_id, timeout=300))[-1]
        assert final.state == pol.JOB_STATE_SUCCEEDED, final.error
        assert policy.get_policy("tls-train", final.policy_version).metrics.training_steps == 2
