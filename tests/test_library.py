"""The training library in-process, with no server running: reward model from ratings, then PPO on it.

Runs in a fresh interpreter that must never import grpc: the library needs no transport at all.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, pathlib, random, sys
    from rlhf.runtime.environment import prepare_environment
    prepare_environment()
    from rlhf.training.config import RewardModelConfig, TrainingConfig
    from rlhf.training.modeling import pick_device, resolve_model
    from rlhf.training.ppo_trainer import PPOTrainer
    from rlhf.training.reward_training import Comparison, Rating, train_reward_model
    from rlhf.training.scoring import reward_function
    from rlhf.sdk import rater
    from rlhf.training import corpus

    out = pathlib.Path(sys.argv[1])
    base = resolve_model("rlhf-tiny", out)  # the cached build (RLHF_MODEL_CACHE)
    rng = random.Random(5)
    answers = [" ".join(corpus.sentence(rng, rng.choice(sorted(corpus.TOPICS))) for _ in range(2)) for _ in range(40)]
    items = [Rating(rng.choice(corpus.QUESTIONS), a, rater.rate(a)) for a in answers]
    items += [Comparison("Q?", " the sea is calm and blue", " I ate bread", 0.0)] * 4
    events = []

    class Recorder:
        def progress(self, **fields):
            events.append(fields.get("phase"))

        def check_cancelled(self):
            pass

    result = train_reward_model(items, RewardModelConfig(use_lora=False, num_epochs=1, batch_size=16,
                                                          learning_rate=5e-4),
                                base, out / "reward", Recorder())
    score = reward_function(result["model_path"], device="cpu")
    config = TrainingConfig(learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_steps=2,
                            max_new_tokens=8)
    trainer = PPOTrainer(config, base, pick_device("cpu"))
    steps = []
    history = trainer.train(["Where did you go?", "Tell me a story."], score, lambda s, m: steps.append(m))
    trainer.save(out / "policy_version")
    print(json.dumps({"grpc_imported": "grpc" in sys.modules, "phases": sorted(set(filter(None, events))),
                      "rating_count": result["rating_count"], "comparison_count": result["comparison_count"],
                      "steps": len(steps), "rewards": history.reward, "kl": [m["objective/kl"] for m in steps]}))
""")


def test_reward_model_and_ppo_train_in_process_without_any_server(tmp_path, tiny_model):
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ)  # RLHF_MODEL_CACHE (conftest) points at the built tiny model
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["grpc_imported"] is False
    assert {"loading", "training", "saving"} <= set(report["phases"])
    assert (report["rating_count"], report["comparison_count"]) == (40, 4)
    assert report["steps"] == 2 and len(report["rewards"]) == 2
    assert all(isinstance(k, float) and k == k for k in report["kl"])  # finite numbers, not NaN

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "reward")
    assert reward.config.num_labels == 1
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy_version" / "policy")
    assert policy.config.vocab_size > 0


def test_the_library_imports_nothing_of_the_runtime_or_the_sdk():
    """DESIGN.md: nothing below imports anything above. Every module of rlhf.training, the seed-facing API
    included, loads without rlhf.runtime, rlhf.sdk or grpc."""
    import pkgutil

    import rlhf.training

    names = [f"rlhf.training.{m.name}" for m in pkgutil.iter_modules(rlhf.training.__path__)]
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('rlhf.runtime', 'rlhf.sdk', 'grpc')))))"
    )
    root = pathlib.Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
