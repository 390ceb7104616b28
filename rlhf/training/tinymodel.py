"""Build the project's tiny GPT-2-style default model: BPE tokenizer + small GPT2 pre-trained on rlhf.corpus.

Built once per data dir (under models/), deterministic from its seed, written to a temporary folder and
renamed into place, with a file lock so concurrent services build it only once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Iterator

BUILD_VERSION = 1  # bump when the recipe changes so caches rebuild
# Tokens of context (n_positions) of the tiny model.
CONTEXT = 256
# The tiny model's architecture (GPT-2); the vocabulary is what its BPE training yields (631 tokens).
TINY_CONFIG = {"model_type": "gpt2", "n_embd": 96, "n_layer": 2, "n_head": 4, "n_positions": CONTEXT, "vocab_size": 631}
# Its parameter count (build_info.json of a build; the build is deterministic).
TINY_PARAMETERS = 309_024
log = logging.getLogger(__name__)


def tiny_model_dir(data_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """data_dir/models/..., or RLHF_MODEL_CACHE/... when set (one cache shared by several data dirs)."""
    root = (
        pathlib.Path(os.environ["RLHF_MODEL_CACHE"])
        if os.environ.get("RLHF_MODEL_CACHE")
        else pathlib.Path(data_dir) / "models"
    )
    return root / f"rlhf-tiny-v{BUILD_VERSION}-s{seed}"


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tiny_model(
    data_dir: pathlib.Path, seed: int = 0, progress: Callable[[str], None] | None = None
) -> pathlib.Path:
    """The tiny model's folder, building it first if this data dir has none."""
    target = tiny_model_dir(data_dir, seed)
    if (target / "build_info.json").exists():
        return target
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / "build_info.json").exists():  # another process built it while we waited
            return target
        tmp = target.parent / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        build_tiny_model(tmp, seed=seed, progress=progress)
        tmp.rename(target)
    return target


def build_tiny_model(
    folder: pathlib.Path, seed: int = 0, steps: int = 600, progress: Callable[[str], None] | None = None
) -> None:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf.training.corpus import documents

    say = progress or log.info
    started = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    docs = documents(6000, seed=seed)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        docs, vocab_size=640, min_frequency=2, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False
    )
    tokenizer = gpt2_style_tokenizer(bpe, CONTEXT)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=CONTEXT,
        n_embd=TINY_CONFIG["n_embd"],
        n_layer=TINY_CONFIG["n_layer"],
        n_head=TINY_CONFIG["n_head"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    encoded = [tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id] for doc in docs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    batch = 32
    model.train()
    for step in range(steps):
        rows = [encoded[i] for i in torch.randint(len(encoded), (batch,), generator=generator).tolist()]
        width = max(map(len, rows))
        ids = torch.full((batch, width), tokenizer.pad_token_id)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        lr = 3e-3 * min(1.0, (step + 1) / 50) * (1 - step / steps) + 1e-5
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            say(f"building tiny model: step {step + 1}/{steps}, loss {loss.item():.3f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    info = {
        "build_version": BUILD_VERSION,
        "seed": seed,
        "steps": steps,
        "final_loss": loss.item(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.monotonic() - started, 1),
    }
    (folder / "build_info.json").write_text(json.dumps(info, indent=2))
    say(f"tiny model built in {info['seconds']}s ({info['parameters']} parameters, loss {info['final_loss']:.3f})")


def gpt2_style_tokenizer(bpe, context: int):
    """A trained byte-level BPE (`tokenizers`) as a transformers tokenizer the GPT-2 way: <|endoftext|> for
    BOS/EOS/UNK, a separate <|pad|> (both must be the BPE's special tokens), left padding."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        padding_side="left",
        model_max_length=context,
    )
