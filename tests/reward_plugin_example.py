"""A minimal reward plugin, found in tests as 'tests.reward_plugin_example:factory'."""

from __future__ import annotations

from typing import Callable, Optional

import torch


def factory(scale: float = 1.0) -> Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
    """Sum of all coordinates of each sample, times scale.

    Args:
        scale: multiplier, unitless.
    """

    def reward(x0: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        return scale * x0.flatten(1).sum(dim=1)

    return reward


def broken_after(calls: int = 3, mode: str = "nan") -> Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]:
    """Behaves (negative norm) for `calls` calls, then fails: mode nan | half (first half nan) | raise | shape."""
    count = {"n": 0}

    def reward(x0: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        count["n"] += 1
        good = -x0.flatten(1).norm(dim=1)
        if count["n"] <= calls:
            return good
        if mode == "raise":
            raise RuntimeError("the reward server went away")
        if mode == "half":
            return torch.where(torch.arange(len(good)) < len(good) // 2, float("nan"), good)
        return good[:1] if mode == "shape" else good * float("nan")

    return reward
