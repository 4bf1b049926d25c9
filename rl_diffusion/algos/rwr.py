"""RWR: reward-weighted regression, the denoising loss on the policy's own samples weighted by softmax(r / T).

Each epoch fits p_old(x_0) exp(r(x_0) / T): the tilt compounds over epochs and nothing holds it
to the pretrained model, so --kl-coef is refused (Lee et al. 2023, "Aligning text-to-image models
using human feedback"; Black et al. 2023 use it as a baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rl_diffusion.algos.base import Algorithm, Batch
from rl_diffusion.config import arg
from rl_diffusion.errors import UserError


def rwr_weights(rewards: Tensor, temperature: float) -> Tensor:
    """softmax(r / temperature) over the batch: non-negative, summing to 1."""
    return torch.softmax(rewards / temperature, dim=0)


class RewardWeightedRegression(Algorithm):
    uses_kl = False
    defaults = {"kl_coef": 0.0}  # over the images' beta of 1: it has no KL term, and refuses one

    @dataclass(frozen=True)
    class Settings:
        rwr_temperature: float = arg(
            1.0,
            "rwr: softmax temperature on rewards, reward units; each epoch fits p_old exp(r / T), so the tilt "
            "compounds over epochs with nothing holding it to the pretrained model",
        )

    @classmethod
    def validate(cls, config) -> None:
        if config.settings.rwr_temperature <= 0:
            raise UserError(f"--rwr-temperature must be positive, got {config.settings.rwr_temperature}")
        if config.kl_coef > 0:
            raise UserError(
                "--algo rwr has no KL term: each epoch fits p_old exp(r / T), a tilt that compounds over epochs "
                "with nothing holding it to the pretrained model; use an algorithm with a KL term for --kl-coef"
            )

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        run = self.run
        weights = rwr_weights(batch.rewards, self.settings.rwr_temperature)
        shard = run.ranks.shard(batch.B, "--chains")

        def weighted_denoising_loss() -> Tensor:  # sum_b w_b E_{t, eps} ||eps_theta(x_t, t) - eps||^2 / D
            return run.diffusion.training_loss(
                run.synced_policy, batch.x0, batch.c, generator=generator, weights=weights, shard=shard
            )

        loss = self.descend(weighted_denoising_loss, self.forward_process_steps(batch))
        return {"loss/policy": loss, "rwr/weight_max": weights.max().item()}
