"""Data-parallel plumbing for training under torchrun: the process group, the few collectives PPO needs, and
the launcher's command line.

`Group.current()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins
the process group: gloo on the CPU, nccl on CUDA. Outside torchrun it is a group of one whose collectives
return their input, so the trainer's code is the same in both.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from rlhf.training import ppo

# How long a rank waits in a collective for the others. Generous: while rank 0 trains the reward model or
# exports prompts the others wait in a broadcast; a rank that dies ends the wait at once (its peers' sockets
# close), so this only bounds a rank that hangs alive.
TIMEOUT = dt.timedelta(hours=2)
# Extra torchrun arguments from the environment, replacing `--standalone` (multi-node: --nnodes,
# --rdzv-backend c10d, --rdzv-endpoint host:port, --rdzv-id, --node-rank).
LAUNCHER_ARGS_ENV = "RLHF_TORCHRUN_ARGS"


def under_launcher() -> bool:
    """Whether this process is a rank started by torchrun."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launcher_argv(num_processes: int, module: str, args: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run ... -m module args`: num_processes ranks on this machine, with a
    standalone rendezvous unless RLHF_TORCHRUN_ARGS gives the rendezvous of several machines."""
    extra = os.environ.get(LAUNCHER_ARGS_ENV, "").split()
    rendezvous = extra or ["--standalone"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *rendezvous,
        "--nproc-per-node",
        str(num_processes),
        "-m",
        module,
        *args,
    ]


def peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank died (that rank says why)."""
    if isinstance(error, getattr(dist, "DistBackendError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("closed by peer" in text or "reset by peer" in text)


class Group:
    """This process's place among the data-parallel ranks, and the collectives PPO uses."""

    def __init__(
        self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device: str = "cpu", local_size: int = 0
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        # Ranks on this machine (torchrun's --nproc-per-node); all of them when not given.
        self.local_size = local_size or world_size
        # Where small tensors of bookkeeping collectives (flags, objects) live: the GPU under nccl.
        self.collective_device = device

    @classmethod
    def current(cls, device: str = "cpu") -> Group:
        """The group torchrun started this process in (joined once), or a group of one outside torchrun.
        `device`: where the collectives' tensors live (nccl for CUDA, gloo otherwise)."""
        if not under_launcher() or int(os.environ["WORLD_SIZE"]) == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.startswith("cuda")
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        collectives = f"cuda:{local_rank}" if cuda else "cpu"
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, collectives, local_size)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that reports, saves and checkpoints."""
        return self.rank == 0

    def rank_device(self, device: str) -> str:
        """This rank's device: its own GPU (cuda:LOCAL_RANK) when training on CUDA."""
        if self.distributed and device.split(":")[0] == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of a global batch (its length divides by world_size)."""
        size = len(items) // self.world_size
        return list(items[self.rank * size : (self.rank + 1) * size])

    # --- collectives (identity in a group of one) --------------------------------------------------------
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks (a new tensor)."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        top = tensor.detach().clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        return top

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.sum(tensor) / self.world_size if self.distributed else tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (same shape on each), concatenated along dim 0 in rank order."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (every rank gets the same answer)."""
        if not self.distributed:
            return flag
        return bool(self.max(torch.tensor([float(flag)], device=self.collective_device)).item())

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=torch.device(self.collective_device))
        return box[0]

    def average_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over ranks, in one all-reduce over a flat buffer (a missing
        gradient counts as zeros), so every rank takes the same optimiser step."""
        if not self.distributed:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in parameters:
            mean = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)

    def whiten(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ppo.whiten with the mean and (unbiased) variance of the masked entries of every rank's batch, so
        the ranks together whiten as one process would over the whole batch."""
        if not self.distributed:
            return ppo.whiten(values, mask)
        count = self.sum(mask.sum().double())
        mean = self.sum((values * mask).sum().double()) / count.clamp(min=1)
        squares = self.sum((((values - mean) ** 2) * mask).sum().double())
        variance = squares / (count - 1) if count > 1 else squares / count.clamp(min=1)
        return ((values - mean) * torch.rsqrt(variance + 1e-8)).to(values.dtype) * mask

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
