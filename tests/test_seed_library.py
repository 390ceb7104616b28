"""The seed's Python library snippets, run as the seed document writes them with only the import line changed
(`from n3_server.rlhf import X` -> `from rlhf import X`), in-process with no server.

Substitutions, each said where it is made: no model hub is reachable, so where a snippet names a hub model
("gpt2", "facebook/opt-125m", ...) the project's tiny model, or a tiny local model of the same architecture,
stands in; step counts are tiny. Everything between `# --- seed:` and `# --- end seed` is the seed's text.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import rated_answers

# Step counts for the tests: a couple of PPO steps of 2 prompts, 8 new tokens.
TINY_RUN = dict(max_steps=2, batch_size=2, mini_batch_size=1, ppo_epochs=1, max_new_tokens=8, learning_rate=1e-3)


def seed_feedback(count: int = 20) -> list[dict]:
    """Feedback as the seed's POST /feedback bodies (prompt, response, score, runId, notes)."""
    return [
        {"prompt": p, "response": r, "score": s, "runId": f"execution_{i}", "notes": "rated by the simulated rater"}
        for i, (p, r, s) in enumerate(rated_answers(count, seed=11))
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model) -> pathlib.Path:
    """One folder for the module: the snippets' relative models/... paths build on each other."""
    return tmp_path_factory.mktemp("seed-library")


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return workdir


@pytest.fixture(scope="module")
def trained_v1(workdir) -> pathlib.Path:
    """Step 2 of the seed's pipeline (RLHFTrainer on the feedback list), run once for the module."""
    from rlhf import TrainingConfig

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        training_config = TrainingConfig(**TINY_RUN)  # the seed leaves training_config to the reader
        feedback_list = seed_feedback()
        # --- seed: "Step 2: PPO Training" (import line changed)
        from rlhf import RLHFTrainer

        trainer = RLHFTrainer(training_config)

        result = trainer.train(
            feedbacks=feedback_list,
            output_dir="models/my_agent/v1",
        )

        print(f"Final reward: {result.final_reward_mean}")
        print(f"Training steps: {result.training_steps}")
        # --- end seed
        assert result.training_steps == 2
    finally:
        os.chdir(cwd)
    return workdir / "models" / "my_agent" / "v1"


def test_import_rlhf_needs_no_torch_and_exports_the_seed_names():
    script = (
        "import sys, rlhf\n"
        "from rlhf import TrainingConfig, RewardModelConfig, TrainingResult\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "names = {'TrainingConfig', 'RewardModelConfig', 'train_reward_model', 'RLHFTrainer', 'TrainingResult',\n"
        "         'FeedbackDataset', 'PPODataset', 'RewardModel'}\n"
        "assert names <= set(dir(rlhf)) and names <= set(rlhf.__all__)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    import rlhf

    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        rlhf.Nothing  # noqa: B018


def test_the_seeds_training_configurations_are_accepted_with_its_defaults():
    # --- seed: "Default Configuration" (import line changed; only constructed: nothing is downloaded)
    from rlhf import TrainingConfig

    config = TrainingConfig(
        # Model settings
        base_model="gpt2",  # Base LLM to train
        use_lora=True,  # Use LoRA for efficient fine-tuning
        lora_r=8,  # LoRA rank
        lora_alpha=32,  # LoRA alpha
        lora_dropout=0.1,  # LoRA dropout
        # Training hyperparameters
        learning_rate=1e-5,  # Learning rate
        batch_size=8,  # Training batch size
        mini_batch_size=4,  # PPO mini-batch size
        ppo_epochs=4,  # PPO update epochs per batch
        max_steps=1000,  # Total training steps
        # PPO-specific
        init_kl_coef=0.2,  # KL divergence coefficient
        target_kl=6.0,  # Target KL divergence
        gamma=1.0,  # Discount factor
        lam=0.95,  # GAE lambda
        cliprange=0.2,  # PPO clip range
        vf_coef=0.1,  # Value function coefficient
        # Generation settings
        max_new_tokens=128,  # Max tokens to generate
        temperature=1.0,  # Sampling temperature
        top_k=50,  # Top-K sampling
        top_p=0.95,  # Nucleus sampling
    )
    # --- end seed
    defaults = TrainingConfig()
    seed_values = {k: v for k, v in vars(config).items() if k != "base_model"}
    assert all(getattr(defaults, k) == v for k, v in seed_values.items() if k in vars(config))
    assert defaults.base_model == "rlhf-tiny"  # the one default that differs: no hub here
    # --- seed: "Memory-Constrained" and "GPU Training" (constructed only)
    config = TrainingConfig(
        base_model="gpt2",
        use_lora=True,
        lora_r=4,
        batch_size=4,
        mini_batch_size=2,
        gradient_accumulation_steps=4,
    )
    config = TrainingConfig(
        device="cuda",  # Use GPU
        batch_size=32,  # Larger batch size with GPU
        mixed_precision="fp16",  # Use mixed precision
    )
    # --- end seed
    from rlhf import RewardModelConfig

    # --- seed: "4. Reward Model Overfitting"
    config = RewardModelConfig(
        num_epochs=2,  # Fewer epochs
        lora_dropout=0.2,  # Higher dropout
    )
    # --- end seed
    assert (config.num_epochs, config.lora_dropout, RewardModelConfig().batch_size) == (2, 0.2, 8)


@pytest.mark.slow
def test_step_1_reward_model_training(in_workdir):
    from rlhf import FeedbackDataset
    from rlhf.training.modeling import load_tokenizer, resolve_model

    # Not in the seed: its datasets and tokenizer come from "Dataset Preparation" (FeedbackDataset,
    # train/val splitting); the tokenizer is the base model's.
    tokenizer = load_tokenizer(resolve_model("rlhf-tiny", in_workdir))
    train_dataset, val_dataset = FeedbackDataset(seed_feedback(), tokenizer).split(val_fraction=0.2)
    assert (len(train_dataset), len(val_dataset)) == (16, 4)
    assert set(train_dataset[0]) == {"input_ids", "attention_mask", "label"}

    # --- seed: "Step 1: Reward Model Training" (import line changed; base_model "gpt2" -> "rlhf-tiny")
    from rlhf import RewardModelConfig, train_reward_model

    config = RewardModelConfig(
        base_model="rlhf-tiny",
        use_lora=True,
        batch_size=8,
        num_epochs=3,
        learning_rate=1e-5,
    )

    reward_model = train_reward_model(
        train_dataset,
        val_dataset,
        config,
        tokenizer,
    )

    # Save reward model
    reward_model.save_pretrained("models/my_agent/reward_model")
    # --- end seed
    folder = in_workdir / "models" / "my_agent" / "reward_model"
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(folder).config.num_labels == 1
    assert {"normalization.json", "reward_config.json"} <= {p.name for p in folder.iterdir()}
    # Validated on the val_dataset it was given: 4 held-out items.
    history = json.loads((folder / "loss_history.json").read_text())
    assert len(history["validation"]) == 3 and len(history["train"]) == 3 * 2  # 16 items, batches of 8


@pytest.mark.slow
def test_step_2_writes_the_services_version_folder(trained_v1):
    assert {p.name for p in trained_v1.iterdir()} >= {
        "policy",
        "reward_model",
        "value_head.pt",
        "value_head.json",
        "curves.png",
        "training_results.json",
    }
    results = json.loads((trained_v1 / "training_results.json").read_text())
    assert results["model_path"] == str(trained_v1 / "policy")
    assert results["reward_model_path"] == str(trained_v1 / "reward_model")
    assert results["feedback_count"] == 20 and results["algorithm"] == "ppo"
    assert len(results["reward_history"]) == len(results["kl_history"]) == len(results["loss_history"]) == 2
    assert all(0.0 <= r <= 1.0 for r in results["reward_history"])  # the 0..1 feedback scale, as the service
    assert not list(trained_v1.parent.glob(".*tmp"))  # staged under a temporary name, renamed when complete


@pytest.mark.slow
def test_step_3_policy_deployment(trained_v1, in_workdir):
    # --- seed: "Step 3: Policy Deployment"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("models/my_agent/v1/policy")
    tokenizer = AutoTokenizer.from_pretrained("models/my_agent/v1/policy")

    # Generate response
    prompt = "What is quantum computing?"
    inputs = tokenizer(prompt, return_tensors="pt")
    outputs = model.generate(**inputs, max_new_tokens=128)
    response = tokenizer.decode(outputs[0], skip_special_tokens=True)
    # --- end seed
    assert response.startswith(prompt[:10]) and outputs.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.slow
def test_visualization(trained_v1, in_workdir):
    import matplotlib

    matplotlib.use("Agg")  # not in the seed: no display here; plt.show() is then a no-op

    # --- seed: "Visualization" (import line changed)
    import matplotlib.pyplot as plt

    # Load results
    from rlhf import TrainingResult

    result = TrainingResult.load("models/my_agent/v1/training_results.json")

    # Plot reward over time
    plt.plot(result.reward_history)
    plt.xlabel("Step")
    plt.ylabel("Reward")
    plt.title("Training Progress")
    plt.show()
    # --- end seed
    assert len(plt.gca().lines[0].get_ydata()) == 2
    plt.close("all")
    assert result.model_path.endswith("models/my_agent/v1/policy") and result.training_steps == 2
    assert result.feedback_count == 20 and result.reward_model_path.endswith("v1/reward_model")
    assert len(result.kl_history) == len(result.loss_history) == 2
    assert result.final_reward_mean == pytest.approx(sum(result.reward_history) / 2)
    assert result.final_reward_std >= 0 and "config" in result.details
    assert TrainingResult.load("models/my_agent/v1") == result  # the folder works too


@pytest.mark.slow
def test_pre_trained_reward_model(trained_v1, in_workdir):
    from rlhf import RLHFTrainer, TrainingConfig

    config = TrainingConfig(**TINY_RUN)
    feedbacks = seed_feedback()
    # --- seed: "Pre-trained Reward Model"
    trainer = RLHFTrainer(config)

    result = trainer.train(
        feedbacks=feedbacks,
        output_dir="models/my_agent/v2",
        reward_model_path="models/my_agent/v1/reward_model",  # Reuse
    )
    # --- end seed
    v2 = in_workdir / "models" / "my_agent" / "v2"
    assert result.reward_model_path == str(trained_v1 / "reward_model")
    assert not (v2 / "reward_model").exists() and (v2 / "policy").is_dir()
    with pytest.raises(FileExistsError, match="never overwritten"):
        trainer.train(feedbacks=feedbacks, output_dir="models/my_agent/v2", reward_model_path=result.reward_model_path)


def tiny_local_model(architecture: str, folder: pathlib.Path, tokenizer_path: str) -> pathlib.Path:
    """A randomly initialised model of `architecture`, two heads wide, with the tiny model's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoConfig, LlamaConfig, OPTConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=256,
    )
    config = {
        "opt": lambda: OPTConfig(
            hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32, **ids
        ),
        "gpt_neo": lambda: GPTNeoConfig(
            hidden_size=32, num_layers=1, num_heads=2, attention_types=[[["global"], 1]], window_size=256, **ids
        ),
        "llama": lambda: LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            **ids,
        ),
    }[architecture]()
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_custom_base_models(trained_v1, in_workdir, tiny_model):
    from rlhf import RLHFTrainer, TrainingConfig

    # --- seed: "Custom Base Models". As written it repeats the keyword base_model (a SyntaxError in Python),
    # so each alternative is its own call; constructing them downloads nothing.
    configs = [
        TrainingConfig(
            base_model="facebook/opt-125m",  # OPT model
        ),
        TrainingConfig(
            base_model="EleutherAI/gpt-neo-125M",  # GPT-Neo
        ),
        TrainingConfig(
            base_model="meta-llama/Llama-2-7b-hf",  # Llama 2
        ),
    ]
    # --- end seed
    assert [c.base_model for c in configs][0] == "facebook/opt-125m"
    # No hub here: a tiny local model of each architecture stands in for the hub id, trained the same way.
    for architecture in ("opt", "gpt_neo", "llama"):
        folder = tiny_local_model(architecture, in_workdir / "bases" / architecture, str(tiny_model))
        config = TrainingConfig(base_model=str(folder), **{**TINY_RUN, "max_steps": 1})
        result = RLHFTrainer(config).train(
            feedbacks=seed_feedback(),
            output_dir=f"models/my_agent/{architecture}",
            reward_model_path="models/my_agent/v1/reward_model",
        )
        from transformers import AutoModelForCausalLM

        trained = AutoModelForCausalLM.from_pretrained(result.model_path)
        assert trained.config.model_type == architecture and result.training_steps == 1


@pytest.mark.slow
def test_custom_reward_functions_subclass_form(trained_v1, in_workdir):
    # --- seed: "Custom Reward Functions" (import line changed)
    from rlhf import RewardModel

    class CustomRewardModel(RewardModel):
        def forward(self, input_ids, attention_mask):
            # Custom reward logic
            base_rewards = super().forward(input_ids, attention_mask)

            # Apply custom transformations
            rewards = base_rewards * 2.0 - 1.0  # Scale to [-1, 1]

            return rewards

    # --- end seed
    from rlhf import RLHFTrainer, TrainingConfig
    from rlhf.training.reward_functions import RewardFunctionRegistry

    path = "models/my_agent/v1/reward_model"
    pairs = [(f["prompt"], f["response"]) for f in seed_feedback(6)]
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    base = RewardModel.from_pretrained(path).score(prompts, responses)
    custom = CustomRewardModel.from_pretrained(path).score(prompts, responses)
    assert custom == pytest.approx([2.0 * b - 1.0 for b in base], abs=1e-5)
    # The same transform as a built-in reward function of the library (and of the reward service).
    scale = RewardFunctionRegistry().combination([{"name": "scale_shift", "params": {"scale": 2, "shift": -1}}], "f")
    assert RewardModel.from_pretrained(path).reward_fn(scale)(prompts, responses).scores == pytest.approx(custom)

    seen: list[list[float]] = []

    class Recording(CustomRewardModel):  # not in the seed: records what the trainer's scorer got
        def forward(self, input_ids, attention_mask):
            rewards = super().forward(input_ids, attention_mask)
            seen.append(rewards.tolist())
            return rewards

    result = RLHFTrainer(TrainingConfig(**TINY_RUN), reward_model_class=Recording).train(
        feedbacks=seed_feedback(), output_dir="models/my_agent/v3", reward_model_path=path
    )
    assert len(seen) == 2  # one scoring pass per step (a batch of 2 fits one micro-batch)
    assert result.details["lineage"]["reward_model_class"].endswith("Recording")
    # Transformed rewards are not on the 0..1 feedback scale: the reported reward is the subclass's own.
    assert result.reward_history == result.details["score_history"]
    for rewards, mean in zip(seen, result.reward_history, strict=True):
        assert mean == pytest.approx(sum(rewards) / len(rewards), abs=1e-5)


@pytest.mark.slow
def test_feedback_mistakes_are_clear_errors(in_workdir):
    from rlhf import RLHFTrainer, TrainingConfig
    from rlhf.training.errors import NotEnoughData

    trainer = RLHFTrainer(TrainingConfig(**TINY_RUN))
    bad = seed_feedback(12)
    bad[3]["score"] = 9
    with pytest.raises(ValueError, match=r"feedbacks\[3\]\.score: must be a number between 0"):
        trainer.train(feedbacks=bad, output_dir="models/bad/v1")
    with pytest.raises(NotEnoughData, match="at least 10"):
        trainer.train(feedbacks=seed_feedback(5), output_dir="models/few/v1")
    # Prompts given beside the feedback are checked as the feedback's are, before anything is trained.
    with pytest.raises(ValueError, match=r"prompts\[1\]: must be a non-empty string"):
        trainer.train(feedbacks=seed_feedback(), output_dir="models/empty/v1", prompts=["Hi.", "  "])
    assert not (in_workdir / "models" / "empty").exists()
    assert not (in_workdir / "models" / "few").exists() or not any((in_workdir / "models" / "few").iterdir())
    with pytest.raises(Exception, match=r"config.reward_functions\[0\].name"):
        RLHFTrainer(TrainingConfig(reward_functions=[{"name": "nope"}])).train(
            feedbacks=seed_feedback(), output_dir="models/bad/v2"
        )


def readme_block(heading: str, index: int = 0) -> str:
    """The `index`-th python code block under `heading` in README.md."""
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split(heading, 1)[1].split("\n### ", 1)[0]
    return section.split("```python\n")[index + 1].split("```", 1)[0]


@pytest.mark.slow
def test_the_readme_library_example_runs_as_written(tmp_path, monkeypatch, capsys, tiny_model):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_block("### Python library (the seed's, in-process)"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(tmp_path / "models" / "my_agent" / "v1" / "policy")
    assert printed[1] == str(tmp_path / "models" / "my_agent" / "v1" / "reward_model")
    assert printed[2].startswith("11 4 ") and printed[3] == "2 2"


def test_feedback_in_every_form_the_seed_and_the_sdk_give_it():
    from rlhf import FeedbackDataset, PPODataset
    from rlhf.feedback.v1 import feedback_service_pb2 as fb
    from rlhf.training.reward_training import Comparison, Rating

    feedbacks = [
        {"prompt": "Q1?", "response": "A.", "score": 0.9, "runId": "execution_1", "notes": "seed's shape"},
        {"prompt": "Q2?", "chosen": "Good.", "rejected": "Bad.", "margin": 0.5},
        fb.Feedback(kind=fb.FEEDBACK_KIND_RATING, prompt="Q1?", response="B.", score=0.2),  # the SDK's records
        fb.Feedback(kind=fb.FEEDBACK_KIND_COMPARISON, prompt="Q3?", chosen="Yes.", rejected="No."),
    ]
    dataset = FeedbackDataset(feedbacks)
    assert dataset.items == [
        Rating("Q1?", "A.", 0.9),
        Comparison("Q2?", "Good.", "Bad.", 0.5),
        Rating("Q1?", "B.", 0.2),
        Comparison("Q3?", "Yes.", "No.", 0.0),
    ]
    assert dataset.score_mean == pytest.approx(0.55) and dataset.score_std == pytest.approx(0.35)
    assert PPODataset(feedbacks).prompts == ["Q1?", "Q2?", "Q3?"]
    assert list(PPODataset(["Hi?", "Hi?", "Bye?"])) == ["Hi?", "Bye?"]
    with pytest.raises(ValueError, match=r"feedbacks\[1\]\.rejected"):
        FeedbackDataset([feedbacks[0], {"prompt": "Q?", "chosen": "Good."}])
    with pytest.raises(ValueError, match=r"feedbacks\[0\]\.response"):
        FeedbackDataset([{"prompt": "Q?", "score": 0.5}])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_the_library_trains_grpo_and_rloo_into_the_same_version_folder(trained_v1, in_workdir, algorithm):
    from transformers import AutoModelForCausalLM

    from rlhf import RLHFTrainer, TrainingConfig, TrainingResult

    config = TrainingConfig(**{**TINY_RUN, "max_steps": 2, "batch_size": 2})
    trainer = RLHFTrainer(config, algorithm=algorithm, algorithm_config={"num_generations": 2})
    steps = []
    result = trainer.train(
        feedbacks=seed_feedback(),
        output_dir=f"models/my_agent/{algorithm}",
        reward_model_path="models/my_agent/v1/reward_model",
        on_step=lambda step, metrics: steps.append((step, metrics)),
    )
    folder = in_workdir / "models" / "my_agent" / algorithm
    assert [s for s, _ in steps] == [1, 2] and "reward" in steps[-1][1]  # TRL's own metric names
    assert result.training_steps == 2 and len(result.reward_history) == 2
    assert TrainingResult.load(folder).training_steps == 2
    saved = json.loads((folder / "training_results.json").read_text())
    assert saved["algorithm"] == algorithm and saved["algorithm_config"]["num_generations"] == 2
    assert not (folder / "trl").exists()  # TRL's checkpoints stay out of the version
    AutoModelForCausalLM.from_pretrained(folder / "policy")
    with pytest.raises(ValueError, match="'ppo', 'grpo' or 'rloo'"):
        RLHFTrainer(config, algorithm="dpo")
    with pytest.raises(ValueError, match="GRPO and RLOO"):
        RLHFTrainer(config, algorithm_config={"num_generations": 2})
