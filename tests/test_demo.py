"""`make demo`'s code path at reduced size: the stack as processes, every stage, the table and artifacts."""

from __future__ import annotations

import pathlib

from rlhf.sdk.demo import DemoConfig, run_demo


def test_demo_runs_every_stage_and_reports(tmp_path, tiny_model, capsys):
    config = DemoConfig(data_dir=tmp_path, answers_per_prompt=4, eval_samples=2, ppo_steps=3, max_new_tokens=16)
    assert run_demo(config) == 0
    out = capsys.readouterr().out
    for stage in range(1, 7):
        assert f"== {stage}/6" in out
    assert "mean rater score" in out and "(served by v1)" in out and "DEMO FAILED" not in out
    curves = next(line for line in out.splitlines() if line.startswith("training curves:")).split(": ", 1)[1]
    assert pathlib.Path(curves.strip()).stat().st_size > 10_000
