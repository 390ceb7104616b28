"""Intra-op CPU threads where models are served (rlhf.training.threads): OpenMP and MKL keep their thread
counts per calling thread, so the thread that scores with a model sets its own. The inference engines' side
is tested through real servers in tests/test_inference_batching.py."""

from __future__ import annotations

import threading

from rlhf.training.scoring import Scorer, load_reward_model
from rlhf.training.threads import DEFAULT_THREADS, serving_threads
from tests.test_inference_batching import _thread_counts


def small_reward_model(tiny_model, folder):
    """The tiny model with a fresh scalar head: a small reward model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_scoring_with_a_small_reward_model_runs_on_one_thread_in_a_fresh_pool_thread(tiny_model, tmp_path):
    loaded = load_reward_model(str(small_reward_model(tiny_model, tmp_path / "reward")), "cpu")
    assert loaded.cpu_threads == 1
    seen: list[tuple[int, int | None]] = []
    loaded.model.register_forward_pre_hook(lambda *_: seen.append(_thread_counts()))
    scored = []
    # A thread torch has never run in, as a server's pool thread is the first time it scores.
    worker = threading.Thread(target=lambda: scored.extend(Scorer("cpu", 4, 1).score(loaded, [("Hi", "Hello")] * 6)))
    worker.start()
    worker.join()
    assert len(scored) == 6 and all(s.ok for s in scored)
    assert len(seen) == 2  # two micro-batches of at most 4
    assert all(omp == 1 and mkl in (None, 1) for omp, mkl in seen), seen


def test_serving_threads_leave_large_models_and_gpus_to_torch(tiny_model):
    from transformers import GPT2Config, GPT2LMHeadModel

    large = GPT2LMHeadModel(GPT2Config(n_embd=256, n_layer=6, n_head=4))  # ~17M parameters
    assert serving_threads(large, "cpu") == DEFAULT_THREADS
    assert serving_threads(large, "cuda:0") is None
