import sys, time, os
import _common as common
import torch
if len(sys.argv) > 1: torch.set_num_threads(int(sys.argv[1]))
from policy_service.config import TrainingConfig
from policy_service.trainer import PPOTrainer
from rlhf import corpus, rater
mp, _ = common.ensure_tiny_model()
cfg = TrainingConfig(use_lora=False, batch_size=16, mini_batch_size=4, ppo_epochs=4, max_new_tokens=32, device="cpu")
tr = PPOTrainer(cfg, str(mp), "cpu")
ps = corpus.prompts(64)
out=[]
for i in range(4):
    m = tr.step_on(ps[i*16:(i+1)*16], lambda p, r: [rater.rate(x) for x in r])
    out.append(round(m["time/step_s"],2))
print(os.environ.get("OMP_WAIT_POLICY"), torch.get_num_threads(), out, os.getloadavg()[0])
