"""`make demo`'s code path at reduced size: the stack as processes, every stage, the table and artifacts,
and a trained policy that clearly beats the base on held-out prompts (full fine-tuning, the demo's setup)."""

from __future__ import annotations

import pathlib
import re
import statistics

import pytest

from rlhf.sdk.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow

# What the demo prints: one row per held-out prompt and the means, base then trained.
ROW = re.compile(r"^(?P<prompt>.+?)\s+(?P<base>\d+\.\d{3})\s+(?P<trained>\d+\.\d{3})(?:\s+\(served by (?P<v>\w+)\))?$")


def rater_table(out: str) -> tuple[dict[str, tuple[float, float]], tuple[float, float], str]:
    """The demo's 'held-out prompt / base / trained' table: per-prompt means, overall means, serving version."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("held-out prompt"))
    rows: dict[str, tuple[float, float]] = {}
    for line in lines[start + 1 :]:
        match = ROW.match(line)
        assert match, f"unexpected line in the demo's table: {line!r}"
        values = (float(match["base"]), float(match["trained"]))
        if match["prompt"] == "mean rater score":
            return rows, values, match["v"] or ""
        rows[match["prompt"]] = values
    raise AssertionError("the demo printed no 'mean rater score' row")


def test_demo_runs_every_stage_and_the_trained_policy_beats_the_base(tmp_path, tiny_model, capsys):
    config = DemoConfig(data_dir=tmp_path, answers_per_prompt=8, eval_samples=8, ppo_steps=15, max_new_tokens=24)
    assert run_demo(config) == 0
    out = capsys.readouterr().out
    for stage in range(1, 7):
        assert f"== {stage}/6" in out
    assert "DEMO FAILED" not in out
    curves = next(line for line in out.splitlines() if line.startswith("training curves:")).split(": ", 1)[1]
    assert pathlib.Path(curves.strip()).stat().st_size > 10_000

    rows, (base_mean, trained_mean), served = rater_table(out)
    assert served == "v1"
    assert len(rows) == 4  # rlhf.training.corpus has 16 questions; the demo trains on 12
    # The overall means are the means of the rows (each row averages the same number of answers).
    assert base_mean == pytest.approx(statistics.mean(b for b, _ in rows.values()), abs=2e-3)
    assert trained_mean == pytest.approx(statistics.mean(t for _, t in rows.values()), abs=2e-3)
    assert trained_mean > base_mean + 0.25, out
    assert "WARNING" not in out  # the demo's own check (trained <= base) agrees
