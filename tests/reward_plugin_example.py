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
