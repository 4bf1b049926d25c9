"""The exploratory sampler of the off-policy updates (rtb, ddpo-is with --kl-return path).

The epoch's chains are drawn with the policy's means and sigma times a scale S >= 1, held at --explore-scale for
--explore-epochs epochs and then decayed linearly to 1 (on-policy) over --explore-decay-epochs. Their log_prob_old
stays the real policy's (sigma), so the loop's path KL and path log-ratio are those of the policy's own means. Only
an update whose fixed point holds for any distribution of training chains may use it: rtb's balance, and
ddpo-is's whole-chain return (docs/design.md, section 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rl_diffusion.algos.base import Algorithm
from rl_diffusion.config import arg
from rl_diffusion.errors import UserError
from rl_diffusion.path_kl import Pairs


def explore_scale(epoch: int, scale: float, hold_epochs: int, decay_epochs: int) -> float:
    """The exploratory sampler's sigma multiplier at `epoch` (0-based): `scale` for hold_epochs epochs (0: for
    good), then linearly down to 1 (on-policy) over decay_epochs epochs (0: at once)."""
    if hold_epochs == 0 or epoch < hold_epochs:
        return scale
    if epoch >= hold_epochs + decay_epochs:
        return 1.0
    return scale - (scale - 1) * (epoch - hold_epochs) / decay_epochs


@dataclass(frozen=True)
class ExplorationSettings:
    explore_scale: float = arg(
        1.0,
        "rtb, ddpo-is: sigma multiplier of the exploratory sampler that draws the training chains (1 = on-policy; "
        "rtb's default on points is 2.45)",
    )
    explore_epochs: int = arg(
        250, "rtb, ddpo-is: epochs at the full --explore-scale before it decays (0 = for the whole run)"
    )
    explore_decay_epochs: int = arg(
        750, "rtb, ddpo-is: epochs of linear decay of --explore-scale to 1 after --explore-epochs"
    )

    def validate(self) -> None:
        if self.explore_scale < 1:
            raise UserError(f"--explore-scale must be >= 1 (1 = on-policy), got {self.explore_scale}")
        if self.explore_epochs < 0 or self.explore_decay_epochs < 0:
            raise UserError("--explore-epochs and --explore-decay-epochs must be >= 0")


class Exploring(Algorithm):
    """An algorithm whose training chains come from the exploratory sampler (its Settings hold ExplorationSettings)."""

    def sample(self, generator: torch.Generator, noise_scale: float = 1.0) -> tuple[Pairs, Tensor, Tensor | None]:
        return super().sample(generator, noise_scale=self.exploration())

    def exploration(self) -> float:
        """This epoch's sigma multiplier of the exploratory sampler: --explore-scale on its schedule."""
        settings = self.settings
        return explore_scale(self.epoch, settings.explore_scale, settings.explore_epochs, settings.explore_decay_epochs)
