"""The `rlhf` command line as a newcomer meets it, against a real stack (four services in threads): every
error is one line on stderr with a non-zero exit code, tables by default and whole JSON with --json, the
feedback commands (submit, list, delete, import), deployments, streaming generation, help and version.

Commands run in-process through main(argv) (stdout and stderr captured), or as a subprocess where the
process itself matters (broken pipes, what gets imported)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from rlhf.sdk.cli import build_parser, main
from tests.stack import start_stack

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    running = start_stack(tmp_path_factory.mktemp("cli"))
    yield running
    running.stop()


@pytest.fixture
def env(stack, monkeypatch) -> dict[str, str]:
    """RLHF_<SERVICE>_ADDR of the stack, as a user would export them (flag defaults read them)."""
    addresses = {
        "RLHF_FEEDBACK_ADDR": stack.feedback.address,
        "RLHF_REWARD_ADDR": stack.reward.address,
        "RLHF_POLICY_ADDR": stack.policy.address,
        "RLHF_INFERENCE_ADDR": stack.inference.address,
    }
    for name, value in addresses.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, **addresses}


def rlhf(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `rlhf ARGV`."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ratings(capsys, agent: str, count: int) -> None:
    for i in range(count):
        code, _, err = rlhf(
            capsys, "feedback", "submit", agent, "--prompt", f"Q{i}?", "--response", f"A{i}.", "--score", str(i / count)
        )
        assert code == 0, err


# --- tracebacks become errors ----------------------------------------------------------------------------


def test_a_missing_config_file_and_an_unknown_key_are_one_line_errors(env, capsys, tmp_path):
    code, out, err = rlhf(capsys, "train", "agent", "--config", str(tmp_path / "nope.json"))
    assert code == 2 and out == ""
    assert one_error_line(err) == f"rlhf: error: config file {tmp_path / 'nope.json'} not found"

    config = tmp_path / "config.json"
    config.write_text('{"max_steps": 3, "learning_rat": 0.1}')
    code, _, err = rlhf(capsys, "train", "agent", "--config", str(config))
    line = one_error_line(err)
    assert code == 2 and "unknown key learning_rat" in line and "learning_rate" in line  # names the right key

    config.write_text('{"max_steps": "many"}')
    code, _, err = rlhf(capsys, "train", "agent", "--config", str(config))
    assert code == 2 and "max_steps" in one_error_line(err)
    config.write_text("{not json")
    code, _, err = rlhf(capsys, "reward-models", "train", "agent", "--config", str(config))
    assert code == 2 and "is not valid JSON" in one_error_line(err)


def test_deploy_with_a_weight_that_is_not_a_number_is_a_usage_error(env, capsys):
    code, out, err = rlhf(capsys, "deploy", "my_agent", "v1=abc")
    assert code == 2 and out == "" and "Traceback" not in err
    assert "'v1=abc': the weight must be a number, e.g. v1=50" in err.splitlines()[-1]


def test_piping_into_head_stops_quietly(env, capsys, stack):
    ratings(capsys, "pipe-agent", 3)
    # The reader is gone before the command writes (as `| head -0` would): no traceback, SIGPIPE's code.
    process = subprocess.Popen(
        [f"{BIN}/rlhf", "feedback", "list", "pipe-agent", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(60) == 141 and stderr == ""
    shell = subprocess.run(
        f"{BIN}/rlhf feedback list pipe-agent | head -n 1", shell=True, capture_output=True, text=True, env=env
    )
    header = "id kind score prompt response / chosen > rejected version created"
    assert shell.stdout.split() == header.split()
    assert "Traceback" not in shell.stderr


def test_an_unreachable_service_names_itself_its_address_and_what_to_do(env, capsys, monkeypatch):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RLHF_FEEDBACK_ADDR", address)
    code, out, err = rlhf(capsys, "feedback", "stats", "agent")
    line = one_error_line(err)
    assert code == 3 and out == ""
    assert f"cannot reach the feedback service at {address}" in line
    assert "rlhf serve all" in line and "RLHF_FEEDBACK_ADDR" in line
    code, _, err = rlhf(capsys, "jobs", "list", "--policy-addr", address)
    assert code == 3 and f"cannot reach the policy service at {address}" in one_error_line(err)


def test_a_service_error_is_one_line_with_its_status(env, capsys):
    code, _, err = rlhf(capsys, "feedback", "submit", "agent", "--prompt", "p", "--response", "r", "--score", "2")
    line = one_error_line(err)
    assert code == 2 and line.startswith("rlhf: error: INVALID_ARGUMENT:") and "score" in line
    code, _, err = rlhf(capsys, "train", "nobody-yet")  # no feedback: training cannot start
    assert code == 2 and "FAILED_PRECONDITION" in one_error_line(err) and "10" in err


def test_other_algorithms_reach_the_policy_service(env, capsys):
    """--algorithm is sent as TrainPolicyRequest.algorithm: the service estimates it, or (until GRPO and RLOO
    land) answers UNIMPLEMENTED, which the CLI says plainly."""
    ratings(capsys, "algo-agent", 10)
    for algorithm in ("grpo", "rloo"):
        code, out, err = rlhf(capsys, "train", "algo-agent", "--algorithm", algorithm, "--dry-run", "--max-steps", "4")
        if code == 0:
            assert "4 steps on 10 feedback items" in out
        else:
            line = one_error_line(err)
            assert code == 2 and "does not support this yet (UNIMPLEMENTED)" in line and algorithm.upper() in line
    code, _, err = rlhf(capsys, "train", "algo-agent", "--algorithm", "dpo")
    assert code == 2 and "invalid choice: 'dpo'" in err


# --- feedback --------------------------------------------------------------------------------------------


def test_submit_needs_exactly_a_rating_or_a_comparison(env, capsys):
    for argv, message in (
        (["--response", "r"], "give --response with --score"),
        (["--score", "0.5"], "a rating needs --response"),
        (["--response", "r", "--score", "0.5", "--chosen", "a"], "not both"),
        (["--chosen", "a"], "give --response with --score"),
        (["--response", "r", "--chosen", "a", "--rejected", "b"], "--response goes with --score"),
    ):
        code, out, err = rlhf(capsys, "feedback", "submit", "sub-agent", "--prompt", "p", *argv)
        assert code == 2 and out == "" and err.startswith("usage: rlhf feedback submit"), err
        assert message in err.splitlines()[-1]
    code, out, _ = rlhf(capsys, "feedback", "submit", "sub-agent", "--prompt", "p", "--chosen", "a", "--rejected", "b")
    assert code == 0 and out.startswith("stored comparison as feedback")
    code, out, _ = rlhf(
        capsys, "feedback", "submit", "sub-agent", "--prompt", "p", "--response", "r", "--score", "0.25"
    )
    assert code == 0 and out.startswith("stored rating 0.250 as feedback")


def test_json_is_whole_and_typed_and_tables_are_for_people(env, capsys):
    code, out, _ = rlhf(capsys, "feedback", "stats", "nobody-at-all", "--json")
    stats = json.loads(out)["stats"]
    # zero values are there, and counts are numbers
    assert code == 0 and stats["feedback_count"] == 0 and stats["rating_count"] == 0 and stats["score_mean"] == 0.0
    ratings(capsys, "json-agent", 2)
    stats = json.loads(rlhf(capsys, "feedback", "stats", "json-agent", "--json")[1])["stats"]
    assert stats["feedback_count"] == 2 and isinstance(stats["watermark"], int)
    code, out, err = rlhf(capsys, "feedback", "stats", "json-agent")
    header, row = out.splitlines()
    assert header.split() == ["feedback", "ratings", "comparisons", "score", "mean", "score", "std", "min", "max"]
    assert row.split()[:3] == ["2", "2", "0"] and not out.lstrip().startswith("{")
    code, out, err = rlhf(capsys, "feedback", "stats", "nobody-at-all")
    assert "nobody-at-all has no feedback yet (training needs at least 10 items)" in err


def test_list_and_delete(env, capsys):
    ratings(capsys, "list-agent", 3)
    rlhf(capsys, "feedback", "submit", "list-agent", "--prompt", "which?", "--chosen", "sea", "--rejected", "sand")
    code, out, _ = rlhf(capsys, "feedback", "list", "list-agent", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 4 and rows[0]["chosen"] == "sea" and "score" not in rows[0]
    assert [r["prompt"] for r in rows[1:]] == ["Q2?", "Q1?", "Q0?"] and isinstance(rows[0]["sequence"], int)
    code, out, _ = rlhf(capsys, "feedback", "list", "list-agent", "--kind", "rating", "--limit", "2")
    lines = out.splitlines()
    assert len(lines) == 3 and lines[1].split()[1:5] == ["rating", "0.667", "Q2?", "A2."]
    code, out, _ = rlhf(capsys, "feedback", "delete", "list-agent", rows[0]["id"], rows[1]["id"])
    assert code == 0 and out.strip() == "deleted 2 feedback rows of list-agent"
    code, _, err = rlhf(capsys, "feedback", "delete", "list-agent")
    assert code == 2 and "give feedback ids to delete, or --all" in err
    code, out, _ = rlhf(capsys, "feedback", "delete", "list-agent", "--all")
    assert out.strip() == "deleted 2 feedback rows of list-agent"
    code, out, err = rlhf(capsys, "feedback", "list", "list-agent")
    assert out.splitlines()[0].split()[0] == "id" and len(out.splitlines()) == 1 and "no feedback for list-agent" in err


def test_import_streams_jsonl_and_csv_and_counts_every_row(env, capsys, tmp_path):
    jsonl = tmp_path / "feedback.jsonl"
    jsonl.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "Hi?", "response": "Hello!", "score": 0.8, "runId": "r1"}),
                json.dumps({"prompt": "Which?", "chosen": "the sea", "rejected": "sand", "margin": 1}),
                "{not json",
                json.dumps({"prompt": "Hi?", "response": "Hello!", "score": 2}),  # out of range: the server says
                json.dumps({"prompt": "Hi?", "response": "Hey.", "score": "high"}),
                "",
                json.dumps({"prompt": "Bye?", "response": "Bye!", "score": 0.1, "metadata": {"user": "u1"}}),
                json.dumps({"agent_id": "someone-else", "prompt": "Hi?", "response": "Hello!", "score": 0.5}),
            ]
        )
        + "\n"
    )
    code, out, err = rlhf(capsys, "feedback", "import", "import-agent", str(jsonl))
    assert code == 1  # some rows were rejected
    assert out.strip() == "imported 7 rows into import-agent: 3 accepted, 0 duplicate, 4 rejected"
    assert "rejected line 8: agent_id: the row is for 'someone-else', the import for 'import-agent'" in err
    assert "rejected line 3: not valid JSON" in err and "rejected line 5: score: not a number ('high')" in err
    assert "rejected line 4: score: must be a finite number in [0.0, 1.0], got 2.0" in err
    code, out, _ = rlhf(capsys, "feedback", "import", "import-agent", str(jsonl), "--json")
    again = json.loads(out)
    assert (again["accepted"], again["duplicate"], again["rejected"]) == (0, 3, 4)  # the same rows: nothing twice

    table = tmp_path / "more.csv"
    table.write_text("prompt,response,score,notes\nA?,a,0.5,fine\nB?,b,0.25,\nC?,,0.5,no response\n")
    code, out, err = rlhf(capsys, "feedback", "import", "import-agent", str(table))
    assert out.strip() == "imported 3 rows into import-agent: 2 accepted, 0 duplicate, 1 rejected"
    assert "rejected line 4: response" in err
    stats = json.loads(rlhf(capsys, "feedback", "stats", "import-agent", "--json")[1])["stats"]
    assert (stats["rating_count"], stats["comparison_count"]) == (4, 1)  # before the piped one below
    rows = json.loads(rlhf(capsys, "feedback", "list", "import-agent", "--json")[1])
    assert {r["prompt"]: r["metadata"] for r in rows}["Bye?"] == {"user": "u1"}
    piped = subprocess.run(  # standard input, as in `producer | rlhf feedback import AGENT - --format csv`
        [f"{BIN}/rlhf", "feedback", "import", "import-agent", "-", "--format", "csv"],
        input="prompt,chosen,rejected\nWhich?,sea,sand\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip() == "imported 1 row into import-agent: 1 accepted, 0 duplicate, 0 rejected"
    code, _, err = rlhf(capsys, "feedback", "import", "import-agent", str(tmp_path / "none.jsonl"))
    assert code == 2 and one_error_line(err) == f"rlhf: error: file {tmp_path / 'none.jsonl'} not found"


# --- deployments and generation ---------------------------------------------------------------------------


def test_deployment_state_and_streaming_generation(env, capsys):
    code, out, err = rlhf(capsys, "deployments", "show", "gen-agent")  # no version, no deployment
    assert code == 2 and out == "" and one_error_line(err).startswith("rlhf: error: NOT_FOUND:")
    code, out, err = rlhf(capsys, "deploy", "gen-agent", "base=1")
    assert code == 0 and out.splitlines()[1].split() == ["base", "1.000", "100%"] and "revision 1" in err
    code, out, err = rlhf(capsys, "deployments", "show", "gen-agent")
    assert code == 0 and out.splitlines()[1].split() == ["base", "1.000", "100%"] and "revision 1, updated" in err
    shown = json.loads(rlhf(capsys, "deployments", "show", "gen-agent", "--json")[1])
    assert shown["revision"] == 1 and shown["is_default"] is False and shown["targets"][0]["weight"] == 1.0

    argv = ["generate", "gen-agent", "What did you see today?", "--version", "base", "--seed", "3"]
    code, whole, err = rlhf(capsys, *argv, "--max-new-tokens", "12")
    assert code == 0 and whole.strip() and "by base" in err
    code, streamed, err = rlhf(capsys, *argv, "--max-new-tokens", "12", "--stream")
    assert code == 0 and streamed == whole and "by base" in err  # the same seeded answer, piece by piece
    code, out, _ = rlhf(capsys, *argv, "--max-new-tokens", "12", "--stream", "--json")
    chunks = [json.loads(line) for line in out.splitlines()]
    assert chunks[-1]["done"] is True and "".join(c["text"] for c in chunks) + "\n" == whole
    assert isinstance(chunks[-1]["completion_tokens"], int)


# --- help, version, imports ------------------------------------------------------------------------------


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_flag_has_help_and_every_default_is_shown():
    parsers = list(_parsers(build_parser()))
    assert len(parsers) > 25
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._VersionAction | argparse._SubParsersAction):
                continue
            where = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "default" in parser.format_help() and (
                    "default" in action.help or f"(default: {action.default})" in " ".join(parser.format_help().split())
                ), where


def test_version_and_demo_options(capsys):
    from rlhf import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"rlhf {__version__}"
    demo = build_parser().parse_args(["demo", "--ppo-steps", "5", "--train-prompts", "4", "--policy-port", "7001"])
    assert (demo.ppo_steps, demo.train_prompts, demo.policy_port, demo.feedback_port) == (5, 4, 7001, 0)
    assert (demo.answers_per_prompt, demo.max_new_tokens) == (16, 32)  # DemoConfig's defaults


def test_client_commands_import_no_training_stack(stack):
    script = textwrap.dedent(
        f"""
        import sys
        from rlhf.sdk.cli import main
        for argv in (["feedback", "stats", "a"], ["jobs", "list"], ["policies", "list", "a"], ["--help"]):
            try:
                main(argv + (["--feedback-addr", "{stack.feedback.address}"] if argv[0] == "feedback" else []))
            except SystemExit:
                pass
        print(sorted(m for m in ("torch", "transformers", "numpy", "sqlalchemy", "matplotlib") if m in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr


def test_the_readme_command_lines_parse_and_its_config_file_is_a_training_config(tmp_path):
    """Every `rlhf ...` line of the README's command-line example is a valid command line, and the config
    file it writes is read as a TrainingConfig (the commands themselves run in the tests above)."""
    import pathlib
    import shlex

    from rlhf.policy.v1 import policy_service_pb2 as pol
    from rlhf.sdk.cli.common import read_config

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("The command line covers the everyday workflow")
    block = readme[start:].split("```bash\n", 1)[1].split("\n```", 1)[0]
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("rlhf ")]
    assert len(commands) >= 15
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command.replace("JOB_ID", "0123abcd"))[1:])
        assert callable(args.func), command
    config = block.split("cat > my_training_config.json <<'EOF'\n", 1)[1].split("\nEOF", 1)[0]
    (tmp_path / "config.json").write_text(config)
    parsed = read_config(str(tmp_path / "config.json"), pol.TrainingConfig())
    assert parsed.HasField("use_lora") and parsed.batch_size == 8
    rows = block.split("cat > feedback.jsonl <<'EOF'\n", 1)[1].split("\nEOF", 1)[0].splitlines()
    assert len(rows) >= 10 and all(json.loads(row)["prompt"] for row in rows)  # enough to train on


def test_serve_metrics_sets_each_services_metrics_port_and_keeps_one_given():
    from rlhf.runtime.config import METRICS_PORTS
    from rlhf.sdk.cli.stack import metrics_ports_in

    env = {"RLHF_POLICY_METRICS_PORT": "19153"}
    ports = metrics_ports_in(env)
    assert ports == {**METRICS_PORTS, "policy": 19153}
    assert env["RLHF_FEEDBACK_METRICS_PORT"] == str(METRICS_PORTS["feedback"])
    args = build_parser().parse_args(["serve", "all", "--metrics"])
    assert args.metrics is True
