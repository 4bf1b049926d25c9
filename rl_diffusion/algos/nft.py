"""DiffusionNFT: the forward-process loss with implicit positive and negative policies of a chosen strength.

Zheng et al. (2025), "DiffusionNFT: Online Diffusion Reinforcement with Forward Process". As `awm` (its strength
1 case): each epoch's x_0 carry an optimality weight w_b = 1/2 + A_b / (2 adv_clip), and with v the network's
prediction (a flow's velocity, a DDPM's noise), v_old the old policy's and beta_N = --nft-strength, the implicit
policies are v+ = beta_N v + (1 - beta_N) v_old and v- = (1 + beta_N) v_old - beta_N v. The loss per sample is
    [ w ||x0(v+) - x_0||^2 / s+ + (1 - w) ||x0(v-) - x_0||^2 / s- ] / beta_N,
in x_0-space (x0(v) the x_0 the prediction implies at (x_t, t)), each term divided by its own detached mean
absolute error s (the adaptive weighting). The old policy is a moving average, old <- d old + (1 - d) theta
before each epoch with d = min(--old-decay-rate x epoch, --old-decay-max): a hard copy at d = 0. No likelihoods
and no SDE: any sampler. docs/design.md, section 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rl_diffusion.algos.awm import AdvantageWeightedMatching
from rl_diffusion.config import arg
from rl_diffusion.errors import UserError

MIN_SCALE = 1e-5  # the adaptive weighting's floor on a sample's mean absolute error


def old_decay(epoch: int, rate: float, most: float) -> float:
    """d of the old policy's moving average before `epoch` (0-based): min(rate x epoch, most)."""
    return min(rate * epoch, most)


def implicit_policies(pred: Tensor, pred_old: Tensor, strength: float) -> tuple[Tensor, Tensor]:
    """(v+, v-) = (s v + (1 - s) v_old, (1 + s) v_old - s v)."""
    return strength * pred + (1 - strength) * pred_old, (1 + strength) * pred_old - strength * pred


def adaptive_error(x0_pred: Tensor, x0: Tensor) -> Tensor:
    """Per sample: mean squared error of x0_pred over its own detached mean absolute error."""
    error = x0_pred - x0
    scale = error.detach().abs().flatten(1).mean(1).clamp(min=MIN_SCALE)
    return error.square().flatten(1).mean(1) / scale


class DiffusionNFT(AdvantageWeightedMatching):
    """Implicit positive and negative policies of strength --nft-strength against a moving-average old policy."""

    @dataclass(frozen=True)
    class Settings:
        nft_strength: float = arg(1.0, "nft: beta_N, how far the implicit positive and negative policies move")
        old_decay_rate: float = arg(
            0.001, "nft: the old policy's moving-average decay grows by this per epoch (0 = a copy every epoch)"
        )
        old_decay_max: float = arg(0.5, "nft: the most the old policy's moving-average decay grows to, in [0, 1)")

    @classmethod
    def validate(cls, config) -> None:
        settings = config.settings
        if not settings.nft_strength > 0:
            raise UserError(f"--nft-strength must be positive, got {settings.nft_strength}")
        if settings.old_decay_rate < 0 or not 0 <= settings.old_decay_max < 1:
            raise UserError("--old-decay-rate must be >= 0 and --old-decay-max in [0, 1)")

    def refresh_old(self) -> None:
        d = old_decay(self.epoch, self.settings.old_decay_rate, self.settings.old_decay_max)
        with torch.no_grad():
            for old, new in zip(self.old.parameters(), self.run.policy.parameters(), strict=True):
                old.mul_(d).add_(new.detach(), alpha=1 - d)

    def matching_loss(
        self, pred: Tensor, pred_old: Tensor, target: Tensor, x_t: Tensor, t: Tensor, x0: Tensor, w: Tensor
    ):
        positive, negative = implicit_policies(pred, pred_old, self.settings.nft_strength)
        x0_of = self.run.diffusion.predict_x0
        terms = w * adaptive_error(x0_of(x_t, t, positive), x0) + (1 - w) * adaptive_error(x0_of(x_t, t, negative), x0)
        return terms / self.settings.nft_strength

    def state_dict(self) -> dict:
        return {**super().state_dict(), "nft_old": self.old.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.old.load_state_dict(state["nft_old"])
