"""Minibatches sized by memory: what one unit of an algorithm's work keeps for backward, measured on the run's
own network, and the fewest groups of units that fit the run's budget (--memory-mib).

A unit is what the algorithm's gradient is a sum over: a chain replayed with gradients (DRaFT), a (chain,
step) pair (DDPO-SF, RTB). Splitting a sum into groups and accumulating their gradients changes nothing but
rounding, so the budget sets memory and speed, never the update. The budget is the process's: what the
process held at its first update (torch, the networks, the batch) is taken from it once per run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch import Tensor

MIB = 2**20


def in_use_mib(device: torch.device) -> float:
    """What the process holds now, in MiB: allocated tensors on a GPU; the resident set on a CPU (Linux; 0 where
    /proc is missing, and the budget then bounds the update's tensors alone)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MIB
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        return 0.0


def saved_bytes(forward: Callable[[], object]) -> int:
    """Bytes of the tensors that forward()'s autograd graph keeps for backward, each storage counted once."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values())


def bytes_per_unit(forward: Callable[[int], object], units: int = 2) -> float:
    """What one more unit adds to what forward(n) keeps for backward: the difference between 2n and n units,
    over n, so that what is saved once whatever the batch (the weights) is not counted. Measured with a graph
    even where the caller is under no_grad (a no-grad pass may be the first to ask for the groups)."""
    with torch.enable_grad():
        return max(saved_bytes(lambda: forward(2 * units)) - saved_bytes(lambda: forward(units)), 0) / units


def groups(units: int, unit_bytes: float, budget_mib: float) -> int:
    """The fewest near-equal groups of `units` units of `unit_bytes` each that each fit `budget_mib` (a unit that
    alone exceeds it gets a group of its own)."""
    per_group = max(1, math.floor(budget_mib * MIB / unit_bytes)) if unit_bytes > 0 else max(units, 1)
    return max(1, math.ceil(units / per_group))


def split(indices: Tensor, unit_bytes: float, budget_mib: float) -> tuple[Tensor, ...]:
    """`indices` in the fewest near-equal groups that fit the budget."""
    return indices.tensor_split(groups(len(indices), unit_bytes, budget_mib))
