"""GRPO and RLOO in-process (rlhf.training.trl_trainers): prompts as serving formats them, the reward function's
one call per generated batch, stopping with a checkpoint, and how far TRL's resume goes."""

from __future__ import annotations

import dataclasses

import pytest

from rlhf.sdk import rater
from rlhf.training import corpus, sequences
from rlhf.training.config import GROUP_CONFIGS
from rlhf.training.scoring import Scores
from rlhf.training.trl_trainers import GroupPolicyTrainer, fit_prompt, last_checkpoint

PROMPTS = list(corpus.QUESTIONS)[:12]


def quick(algorithm: str, **fields):
    values = {"learning_rate": 3e-3, "batch_size": 4, "num_generations": 4, "max_new_tokens": 16, **fields}
    return GROUP_CONFIGS[algorithm](**values)


def rate(prompts: list[str], answers: list[str]) -> Scores:
    return Scores([rater.rate(a) * 4 - 2 for a in answers], [rater.rate(a) for a in answers])


@pytest.mark.slow  # imports transformers' models and datasets: ~15 s on 2 cores
def test_prompts_are_formatted_as_serving_formats_them(tiny_model, tmp_path):
    trainer = GroupPolicyTrainer("grpo", quick("grpo"), str(tiny_model), tmp_path, "cpu")
    tokenizer = trainer.tokenizer
    # No chat template: plain text, which TRL tokenizes to the ids serving sends the model.
    plain = trainer._dataset(PROMPTS[:2])
    assert plain["prompt"] == PROMPTS[:2] and plain["query"] == PROMPTS[:2]
    assert tokenizer(text=PROMPTS[0])["input_ids"] == sequences.encode_prompt(tokenizer, PROMPTS[0])
    # With one: conversations, which TRL renders through the template with the generation prompt, as serving.
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    chat = trainer._dataset(PROMPTS[:1])
    assert chat["prompt"] == [[{"role": "user", "content": PROMPTS[0]}]] and chat["query"] == PROMPTS[:1]
    rendered = tokenizer.apply_chat_template(chat["prompt"][0], add_generation_prompt=True, tokenize=False)
    assert rendered == sequences.prompt_text(tokenizer, PROMPTS[0]) == f"<user>{PROMPTS[0]}<assistant>"


def test_a_long_prompt_is_cut_from_the_left_to_fit_beside_the_answer(tiny_model):
    from rlhf.training.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    long = " ".join(PROMPTS * 10)
    fitted, cut = fit_prompt(tokenizer, long, 40)
    assert cut and len(sequences.encode_prompt(tokenizer, fitted)) <= 40 and long.endswith(fitted.strip()[-20:])
    assert fit_prompt(tokenizer, PROMPTS[0], 40) == (PROMPTS[0], False)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_stopped_run_leaves_a_checkpoint_and_resumes_where_it_stopped(tiny_model, tmp_path, algorithm):
    """TRL resumes weights, optimizer, scheduler, step count, log history (the curves) and RNG states. Not the
    prompt order: its RepeatSampler draws a fresh shuffle after a resume, so the answers sampled after it are
    not those of an uninterrupted run (PPO's resume is exact); the run is the same in distribution."""
    config = quick(algorithm, max_steps=6)
    calls: list[int] = []

    def counted(prompts: list[str], answers: list[str]) -> Scores:
        calls.append(len(answers))
        return rate(prompts, answers)

    whole_steps: list[dict] = []
    # Checkpoints every 4 steps (and at the end); TRL keeps the newest only.
    periodic = dataclasses.replace(config, checkpoint_interval=4)
    whole = GroupPolicyTrainer(algorithm, periodic, str(tiny_model), tmp_path / "whole", "cpu")
    whole_history = whole.train(PROMPTS, counted, lambda step, m: whole_steps.append(m))
    assert calls == [16] * 6  # one call per generated batch: 4 prompts x 4 answers
    assert [p.name for p in (tmp_path / "whole").glob("checkpoint-*")] == ["checkpoint-6"]
    assert len(whole_history.reward) == 6 and len(whole_history.rating) == 6

    class Stop(Exception):
        pass

    def stop_after_3(step: int, metrics: dict) -> None:
        if step == 3:
            raise Stop

    first = GroupPolicyTrainer(algorithm, config, str(tiny_model), tmp_path / "stopped", "cpu")
    with pytest.raises(Stop):
        first.train(PROMPTS, rate, stop_after_3)
    assert last_checkpoint(tmp_path / "stopped").name == "checkpoint-3"

    resumed_steps: list[tuple[int, dict]] = []
    second = GroupPolicyTrainer(algorithm, config, str(tiny_model), tmp_path / "stopped", "cpu")
    history = second.train(PROMPTS, rate, lambda step, m: resumed_steps.append((step, m)))
    assert [step for step, _ in resumed_steps] == [4, 5, 6] and second.step == 6
    # The curves of both runs, once each; the first three steps are the uninterrupted run's (same seed).
    assert len(history.reward) == 6 and history.reward[:3] == pytest.approx(whole_history.reward[:3])
    # The schedule continues where it stopped (linear decay over 6 steps).
    lrs = [m["learning_rate"] for _, m in resumed_steps]
    assert lrs == pytest.approx([m["learning_rate"] for m in whole_steps[3:]])


@pytest.mark.slow
def test_the_library_runs_grpo_without_grpc_or_the_services(tiny_model, tmp_path):
    """In a fresh interpreter: one GRPO step with a local reward function imports no transport (grpc), no
    runtime and no SDK, as the rest of the training library."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, pathlib
        from rlhf.training.config import GRPOTrainingConfig
        from rlhf.training.trl_trainers import GroupPolicyTrainer
        config = GRPOTrainingConfig(max_steps=1, batch_size=2, num_generations=2, max_new_tokens=4)
        trainer = GroupPolicyTrainer("grpo", config, {str(tiny_model)!r}, pathlib.Path({str(tmp_path)!r}), "cpu")
        trainer.train(["Hello?", "How are you?"], lambda p, a: [float(len(x)) for x in a], lambda s, m: None)
        trainer.save(pathlib.Path({str(tmp_path)!r}))
        bad = sorted(m for m in sys.modules if m.split(".")[0] == "grpc" or m.startswith(("rlhf.runtime", "rlhf.sdk")))
        print("IMPORTED", bad)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "IMPORTED []" in done.stdout, done.stdout
    assert (tmp_path / "policy" / "config.json").is_file()
