"""Models loaded from several threads of one process (a reward or inference server loading two versions at
once) come out whole: transformers' from_pretrained patches process-wide state while it runs, and two loads
at once used to leave every later model of the process with an uninitialised (meta) LM head."""

from __future__ import annotations

import subprocess
import sys

from tests.servers import ROOT

CONCURRENT_LOADS = """
import sys, threading
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from rlhf.training.modeling import load_model
path = sys.argv[1]
errors = []
def load(i):
    try:
        for _ in range(6):
            if i % 2:
                load_model(AutoModelForCausalLM, path)
            else:
                load_model(AutoModelForSequenceClassification, path, num_labels=1)
    except Exception as error:
        errors.append(repr(error))
threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join()
model = load_model(AutoModelForCausalLM, path)
print("errors", len(errors), "meta", [n for n, p in model.named_parameters() if p.is_meta])
"""


def test_models_loaded_from_several_threads_are_whole(tiny_model):
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT_LOADS, str(tiny_model)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-4:] == ["errors", "0", "meta", "[]"], done.stdout[-500:]
