"""Data parallelism over the processes `torchrun` starts: one rank per GPU (or CPU process).

`torchrun --nproc_per_node N -m rl_diffusion.cli pretrain|finetune ...` sets WORLD_SIZE, RANK and
LOCAL_RANK; `init` joins the process group (nccl for CUDA, gloo for CPU) and every rank takes an
equal share of the global batch. Gradients are averaged by DistributedDataParallel.

Randomness: every rank holds the same generator, draws the random numbers of the WHOLE batch
and keeps its own rows (`Ranks.shard`). So rank r's chains, noise and timesteps are exactly
those one process would draw for rows shard(r), and the generator's state does not depend on
the number of ranks: a run continues from its checkpoint on any number of ranks (for the same
global batch) and N ranks compute what 1 rank computes, up to float summation order. The price
is drawing the whole batch's Gaussian noise on every rank, small next to the network's work.

Only rank 0 writes (TensorBoard, checkpoints, figures, metrics); every rank reads checkpoints
to resume, so the run directory must be on a file system all ranks share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from rl_diffusion.errors import UserError


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")  # where this rank's collectives run (CUDA for nccl)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    def shard(self, batch: int, what: str) -> slice:
        """This rank's rows of a global batch of `batch` rows; an uneven split is a UserError naming `what`."""
        if batch % self.world_size:
            raise UserError(
                f"{what} {batch} does not split evenly over {self.world_size} ranks; "
                f"use a multiple of {self.world_size}"
            )
        size = batch // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def gather(self, local: Tensor, dim: int = 0) -> Tensor:
        """Every rank's equally shaped `local` concatenated along `dim` in rank order: the global batch."""
        if self.world_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim)

    def sum(self, local: Tensor) -> Tensor:
        """The sum of `local` over ranks (every rank gets it)."""
        if self.world_size == 1:
            return local
        total = local.clone()
        dist.all_reduce(total)
        return total

    def any(self, flag: bool) -> bool:
        """True on every rank if `flag` is true on any: ranks agree on when to stop."""
        return bool(self.sum(torch.tensor([float(flag)], device=self.device)).item()) if self.world_size > 1 else flag

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` under DistributedDataParallel (gradients averaged over ranks in backward), or itself on 1 rank."""
        if self.world_size == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None
        )


def resolve_device(name: str) -> torch.device:
    """The torch.device a --device flag names; a UserError if it is malformed or absent here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise UserError(f"--device {name}: this machine has {count} GPU(s), numbered 0 to {count - 1}")
    return device


class NoWriter:
    """A SummaryWriter that writes nothing: the writer of every rank but 0."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def summary_writer(ranks: Ranks, log_dir: Path, **kwargs) -> SummaryWriter | NoWriter:
    """TensorBoard writer of rank 0; the others log nothing."""
    return SummaryWriter(str(log_dir), **kwargs) if ranks.is_main else NoWriter()


def init(device_name: str) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group if this process is one of several ranks; the ranks and this rank's device.

    `--device cuda` becomes cuda:LOCAL_RANK (one GPU per rank) and the backend nccl; on CPU gloo.
    """
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks(), device
    if device.type == "cuda":
        if device.index is not None:
            raise UserError(
                f"--device {device_name} under torchrun: pass --device cuda, each rank takes the GPU of its LOCAL_RANK"
            )
        device = resolve_device(f"cuda:{os.environ['LOCAL_RANK']}")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device), device


def is_main_process() -> bool:
    """Rank 0 of the process group, or a process outside any."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shutdown(completed: bool) -> None:
    """Leave the process group (at the end of a command), if one was joined.

    After a command that `completed` on this rank, the ranks first wait for each other: a gloo rank
    that leaves while another still works (rank 0 writing the figures) can abort at exit
    ("terminate called without an active exception"). After an error there is no waiting: the other
    ranks may be anywhere, and torchrun ends them.
    """
    if dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()
