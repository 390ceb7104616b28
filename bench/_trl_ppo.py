"""TRL's PPOTrainer for bench_ppo_vs_trl.py, run with TRL's own interpreter (never imported by the project).

    <trl-venv>/bin/python bench/_trl_ppo.py SPEC.json RESULT.json

SPEC (written by bench_ppo_vs_trl.py): policy_path, reward_path (an AutoModelForSequenceClassification
folder, num_labels=1: the reward model, and the starting point of the value model as in TRL's own example),
prompt_ids (token ids, already encoded the way our trainer encodes prompts), batch, mini_batch, epochs,
new_tokens, lora (null or {r, alpha, dropout}), learning_rate, seed, warmup, steps, output_dir.

RESULT: seconds of every PPO update step (rollout + update, i.e. the time between two `on_step_end`
callbacks, the first measured from `on_train_begin`), the warm-up steps first; per step, the CPU seconds
of the process (every thread), the seconds spent in TRL's own `gc.collect()` calls and the mean response
length (tokens through the first EOS); TRL's per-step logs; what was trained. The probes only wrap TRL's
calls with a clock (timing, no behaviour change). Imports only torch, transformers, datasets, peft and
trl: nothing from this repository.
"""

from __future__ import annotations

import gc
import json
import sys
import time


class TimedGC:
    """Stands in for the `gc` module inside TRL's trainer: the same calls, with the seconds counted."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def collect(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return gc.collect(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    def __getattr__(self, name):
        return getattr(gc, name)


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    result_path = sys.argv[2]

    import torch
    import trl
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    # Probes (timing only): TRL's gc.collect() calls, and the responses batch_generation returns.
    timed_gc = TimedGC()
    trl_ppo.gc = timed_gc
    lengths: list[float] = []
    widths: list[int] = []
    generate = trl_ppo.batch_generation

    def batch_generation(model, queries, *args, **kwargs):
        query_responses, logits = generate(model, queries, *args, **kwargs)
        response = query_responses[:, queries.shape[1] :]
        ended = (response == tokenizer.eos_token_id).int()
        before_end = (torch.cumsum(ended, 1) - ended) == 0  # through the first EOS, as our response mask
        lengths.append(before_end.sum(1).float().mean().item())
        widths.append(response.shape[1])
        return query_responses, logits

    trl_ppo.batch_generation = batch_generation

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["policy_path"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_path"])
    lora = spec["lora"]
    # Full fine-tuning: a frozen copy as the reference; LoRA: TRL disables the adapters instead (as ours does).
    reference = None if lora else AutoModelForCausalLM.from_pretrained(spec["policy_path"])
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_path"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_path"], num_labels=1)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"]
        )

    batch, steps = spec["batch"], spec["warmup"] + spec["steps"]
    config = PPOConfig(
        output_dir=spec["output_dir"],
        # One rollout batch of `batch` prompts per update step, split into batch / mini_batch minibatches,
        # one optimiser step per minibatch (per_device_train_batch_size is the rollout batch here; the
        # micro-batch loop then runs once per minibatch; gradient_accumulation_steps=1).
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_mini_batches=batch // spec["mini_batch"],
        num_ppo_epochs=spec["epochs"],
        local_rollout_forward_batch_size=batch,
        response_length=spec["new_tokens"],
        temperature=1.0,
        stop_token="eos",  # stop at EOS as ours does (TRL's default None always generates response_length)
        total_episodes=batch * steps,
        learning_rate=spec["learning_rate"],
        seed=spec["seed"],
        # No eval, no saving, no logging integrations, no sample generations; fp32 on CPU (as ours).
        num_sample_generations=0,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        logging_steps=1_000_000,
        disable_tqdm=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_dict({"input_ids": spec["prompt_ids"]})

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []
            self.gc_marks: list[float] = []
            self.cpu_marks: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())
            self.gc_marks.append(timed_gc.seconds)
            self.cpu_marks.append(time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())
            self.gc_marks.append(timed_gc.seconds)
            self.cpu_marks.append(time.process_time())

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append({k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))})

    timer = Timer()
    setup_started = time.perf_counter()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward,
        train_dataset=dataset,
        value_model=value,
        peft_config=peft_config,
        callbacks=[timer],
    )
    for callback in (PrinterCallback, ProgressCallback):  # logging off: no per-step printing
        trainer.remove_callback(callback)
    setup_s = time.perf_counter() - setup_started
    trainer.train()
    step_s = [b - a for a, b in zip(timer.marks, timer.marks[1:], strict=False)]
    gc_s = [b - a for a, b in zip(timer.gc_marks, timer.gc_marks[1:], strict=False)]
    cpu_s = [b - a for a, b in zip(timer.cpu_marks, timer.cpu_marks[1:], strict=False)]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    payload = {
        "trl": trl.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "setup_s": setup_s,
        "step_s": step_s,
        "gc_s": gc_s,
        "cpu_s": cpu_s,
        "response_length": lengths,
        "response_width": widths,
        "warmup": spec["warmup"],
        "logs": timer.logs,
        "trainable_parameters": trainable,
        "policy_parameters": sum(p.numel() for p in policy.parameters()),
    }
    with open(result_path, "w") as handle:
        json.dump(payload, handle, indent=1)


if __name__ == "__main__":
    main()
