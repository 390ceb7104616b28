"""`rlhf train`, `rlhf reward-models train` and `rlhf jobs` on a real stack that really trains the tiny model:
each phase shown honestly (the reward model's own progress, then the policy's), a summary at the end instead
of the job's JSON, a failure's reason first, job tables with the right version in the right column and the
phase 'done' after success, and a job id found on whichever service has it."""

from __future__ import annotations

import json

import pytest

from tests.test_cli_commands import env, one_error_line, rlhf, stack  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow  # trains two reward models and a policy (about a minute on 2 cores)

POLICY_CONFIG = {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "max_new_tokens": 8, "use_lora": False}
REWARD_CONFIG = {"num_epochs": 1, "batch_size": 8, "use_lora": False}


@pytest.fixture
def configs(tmp_path) -> tuple[str, str]:
    policy, reward = tmp_path / "policy.json", tmp_path / "reward.json"
    policy.write_text(json.dumps(POLICY_CONFIG))
    reward.write_text(json.dumps(REWARD_CONFIG))
    return str(policy), str(reward)


def test_train_shows_each_phase_and_ends_with_a_summary(env, capsys, tmp_path, configs):  # noqa: F811
    policy_config, reward_config = configs
    rows = tmp_path / "ratings.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": f"Where did you go {i}?", "response": f"To the sea {i}.", "score": (i % 5) / 4})
            + "\n"
            for i in range(12)
        )
    )
    assert rlhf(capsys, "feedback", "import", "train-agent", str(rows))[0] == 0

    code, out, err = rlhf(
        capsys, "train", "train-agent", "--max-steps", "2", "--config", policy_config, "--reward-config", reward_config
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("trained train-agent v1 (job ") and ": 2 steps, " in lines[0]
    assert lines[1].split()[:4] == ["reward", "(0..1", "feedback", "scale)"] and "->" in lines[1]
    assert lines[3].split() == ["reward", "model", "v1"]
    assert lines[4].split()[:2] == ["policy", "model"] and lines[4].endswith("/v1/policy")
    assert "{" not in out  # a summary, not the job's JSON
    # the reward-model phase has its own progress (the reward job's phases), then the policy's own phases
    assert "reward model prepare" in err and "reward model v1 trained (reward job " in err
    assert err.index("reward model v1 trained") < err.index("load policy")
    assert "score 0.000 kl 0.000" not in err and "step 0/" not in err

    listed = rlhf(capsys, "jobs", "list", "--agent-id", "train-agent")[1].splitlines()
    assert listed[0].split() == [
        "job", "id", "agent", "state", "phase", "step", "algorithm", "policy", "reward", "model", "created",
    ]  # fmt: skip
    assert listed[1].split()[1:8] == ["train-agent", "SUCCEEDED", "done", "2/2", "ppo", "v1", "v1"]
    reward_jobs = json.loads(rlhf(capsys, "jobs", "list", "--reward", "--agent-id", "train-agent", "--json")[1])
    assert reward_jobs[0]["progress"]["phase"] == "done" and reward_jobs[0]["reward_model_version"] == "v1"

    # a cancelled job: the reason first, on one line, with what to do; no policy version in its row
    code, out, err = rlhf(
        capsys, "train", "train-agent", "--max-steps", "200", "--config", policy_config,
        "--reward-model-version", "latest", "--no-watch", "--json",
    )  # fmt: skip
    job_id = json.loads(out)["job_id"]
    assert code == 0 and "follow it with" not in err
    code, out, _ = rlhf(capsys, "jobs", "cancel", job_id)
    assert code == 0 and out.startswith(f"cancel requested: policy job {job_id} is ")
    code, out, err = rlhf(capsys, "jobs", "watch", job_id)
    assert code == 1 and out == ""
    line = err.strip().splitlines()[-1]
    assert line == (
        f"rlhf: error: policy job {job_id} CANCELLED: cancelled by request "
        f"(resume from its last checkpoint: rlhf jobs resume {job_id})"
    )
    jobs = json.loads(rlhf(capsys, "jobs", "list", "--agent-id", "train-agent", "--json")[1])
    assert (jobs[0]["state"], jobs[0]["policy_version"]) == ("JOB_STATE_CANCELLED", "")
    row = rlhf(capsys, "jobs", "list", "--agent-id", "train-agent")[1].splitlines()[1].split()
    assert row[2] == "CANCELLED" and "v1" not in row[3:7]  # the policy column stays empty

    # a reward-model job watched without --reward: found on the reward service, and said so
    code, out, err = rlhf(capsys, "reward-models", "train", "train-agent", "--config", reward_config, "--no-watch")
    reward_job = out.split()[1]
    assert code == 0 and out.startswith(f"job {reward_job} queued for train-agent")
    code, out, err = rlhf(capsys, "jobs", "watch", reward_job)
    assert code == 0, err
    assert f"note: {reward_job} is a reward-model job (the reward service; --reward next time)" in err
    assert out.splitlines()[0].startswith(f"trained reward model train-agent v2 (job {reward_job}, ")
    assert out.splitlines()[1].split()[:3] == ["feedback", "12", "items"]
    shown = json.loads(rlhf(capsys, "reward-models", "show", "train-agent", "--json")[1])
    assert shown["version"] == "v2" and shown["feedback_count"] == 12
    code, _, err = rlhf(capsys, "jobs", "watch", "no-such-job")
    assert code == 2 and one_error_line(err).endswith("NOT_FOUND: no policy or reward-model training job no-such-job")


def test_ctrl_c_stops_watching_not_the_job(env, capsys, configs):  # noqa: F811
    """Runs after the test above (its agent has feedback and a reward model)."""
    import signal
    import subprocess

    from tests.test_cli_commands import BIN

    process = subprocess.Popen(
        [f"{BIN}/rlhf", "train", "train-agent", "--max-steps", "200", "--config", configs[0]]
        + ["--reward-model-version", "latest"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    first = process.stderr.readline()  # "job ID started (PPO); Ctrl-C stops watching, not the job"
    job_id = first.split()[1]
    assert first.startswith(f"job {job_id} started (PPO)"), first
    process.send_signal(signal.SIGINT)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"rlhf train did not exit after SIGINT; its stderr:\n{process.communicate()[1]}")
    assert process.returncode == 130
    last = process.stderr.read().strip().splitlines()[-1]
    assert last == (
        f"rlhf: error: stopped watching; job {job_id} goes on (rlhf jobs watch {job_id}; rlhf jobs cancel {job_id})"
    )
    code, out, _ = rlhf(capsys, "jobs", "cancel", job_id)  # it was still there to cancel
    assert code == 0 and out.startswith(f"cancel requested: policy job {job_id} is ")
