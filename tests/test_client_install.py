"""The client install: `pip install rlhf-platform` (no extras) gives the clients, the SDK and the command line
without torch, transformers, sqlalchemy or numpy, with the generated gRPC code built in; commands that run
services say to install the server extra."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator

import pytest

from rlhf.sdk.clients import FeedbackClient
from tests.servers import ServerThread, feedback_thread

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVER_ONLY = ("torch", "transformers", "sqlalchemy", "numpy")

# Submits one item with each client kind, then prints which server-only modules got imported.
SDK_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    import rlhf
    from rlhf.sdk import AsyncFeedbackClient, FeedbackClient, FeedbackSender, SenderConfig

    address, agent = sys.argv[1], sys.argv[2]
    with FeedbackClient(address) as client:
        client.submit(agent, prompt="sync?", response="A.", score=0.9)

    async def main():
        async with AsyncFeedbackClient(address) as client:
            await client.submit(agent, prompt="async?", response="A.", score=0.8)

    asyncio.run(main())
    with FeedbackSender(SenderConfig(address=address)) as sender:
        sender.submit(agent, prompt="sender?", response="A.", score=0.7)
        assert sender.flush(30)
    print(json.dumps(sorted(m for m in {MODULES} if m in sys.modules)))
    """
).replace("{MODULES}", repr(set(SERVER_ONLY)))

# Makes the server-only packages unimportable in the development environment, which has them all.
BLOCKER = textwrap.dedent(
    f"""
    import sys
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {SERVER_ONLY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
    sys.meta_path.insert(0, Blocker())
    """
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with feedback_thread(tmp_path_factory.mktemp("client-install")) as thread:
        yield thread


def stored(address: str, agent: str) -> list[str]:
    with FeedbackClient(address) as client:
        rows, _ = client.export(agent)
    return sorted(row.prompt for row in rows)


def run(argv: list[str], cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("RLHF_", "PYTHON"))} | env
    return subprocess.run(argv, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


def test_client_modules_and_the_command_line_import_no_server_packages(
    server: ServerThread, tmp_path: pathlib.Path
) -> None:
    agent = f"light-{uuid.uuid4().hex[:8]}"
    sdk = run([sys.executable, "-c", BLOCKER + SDK_SCRIPT, server.address, agent], ROOT, PYTHONPATH=str(ROOT))
    assert sdk.returncode == 0, sdk.stderr
    assert json.loads(sdk.stdout.splitlines()[-1]) == []
    cli = BLOCKER + "from rlhf.sdk.cli import main; main(sys.argv[1:])"
    submit = ["feedback", "submit", agent, "--prompt", "cli?", "--response", "A.", "--score", "0.6"]
    answer = run([sys.executable, "-c", cli, *submit], ROOT, PYTHONPATH=str(ROOT), RLHF_FEEDBACK_ADDR=server.address)
    assert answer.returncode == 0, answer.stderr
    assert stored(server.address, agent) == ["async?", "cli?", "sender?", "sync?"]
    helped = run([sys.executable, "-c", cli, "--help"], ROOT, PYTHONPATH=str(ROOT))
    assert helped.returncode == 0 and "feedback" in helped.stdout
    # A command that runs services, without the server extra: one line saying what to install.
    for command in (["serve", "all"], ["serve", "feedback"], ["demo"]):
        refused = run([sys.executable, "-c", cli, *command, "--data-dir", str(tmp_path)], ROOT, PYTHONPATH=str(ROOT))
        assert refused.returncode == 2, refused.stderr
        assert "pip install 'rlhf-platform[server]'" in refused.stderr and "Traceback" not in refused.stderr


def tracked_tree(destination: pathlib.Path) -> pathlib.Path:
    """The working tree as a fresh clone would have it (no generated code, no .venv, nothing ignored)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    assert not (destination / "rlhf" / "feedback").exists()
    return destination


@pytest.mark.slow  # a fresh virtual environment and a pip install: 20-40 s
def test_pip_install_without_extras_gives_a_client_without_torch(server: ServerThread, tmp_path: pathlib.Path) -> None:
    source = tracked_tree(tmp_path / "clone")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python, rlhf = venv / "bin" / "python", venv / "bin" / "rlhf"
    # The development environment's pip installs into the new one; the lock pins the versions.
    install = run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
        + ["-c", str(ROOT / "requirements.lock"), str(source)],
        tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    missing = run([str(python), "-c", "import torch"], tmp_path)
    assert missing.returncode == 1 and "No module named 'torch'" in missing.stderr
    where = run([str(python), "-c", "import rlhf.feedback.v1.feedback_service_pb2 as m; print(m.__file__)"], tmp_path)
    assert where.returncode == 0 and str(venv) in where.stdout, where.stderr  # the generated code is installed

    agent = f"client-{uuid.uuid4().hex[:8]}"
    sdk = run([str(python), "-c", SDK_SCRIPT, server.address, agent], tmp_path)
    assert sdk.returncode == 0, sdk.stderr
    assert json.loads(sdk.stdout.splitlines()[-1]) == []
    submit = [str(rlhf), "feedback", "submit", agent, "--prompt", "cli?", "--response", "A.", "--score", "0.6"]
    answer = run(submit, tmp_path, RLHF_FEEDBACK_ADDR=server.address)
    assert answer.returncode == 0, answer.stderr
    assert stored(server.address, agent) == ["async?", "cli?", "sender?", "sync?"]
    assert run([str(rlhf), "--help"], tmp_path).returncode == 0
    refused = run([str(rlhf), "serve", "all", "--data-dir", str(tmp_path / "data")], tmp_path)
    assert refused.returncode == 2 and "pip install 'rlhf-platform[server]'" in refused.stderr, refused.stderr
