"""Flow-GRPO: PPO-clip on the SDE's steps with group-relative advantages and a per-step KL loss.

Liu et al. (2025), "Flow-GRPO: training flow matching models via online RL". The chains come in groups of
--group-size that share a condition (a class label; on an unconditional model, a block of chains). Per chain
b of group g the advantage is A_b = (r_b - mean_g r) / std_g r, the same at every step, and the loss of step k
is PPO's clipped surrogate of A_b plus beta kl_k, kl_k = ||mu_theta - mu_ref||^2 / (2 sigma_k^2) the step's KL
to the reference (no KL in the advantage). --train-steps W trains on W consecutive steps of each chain: the
first W (Flow-GRPO-Fast), or, with --window-shift S, a window that moves S steps later each epoch and starts
over at the chain's start (MixGRPO's schedule). By default the chain stays stochastic at every step, so its path
KL is exact; --ode-outside-window samples the steps outside the window deterministically (eta = 0: the flow's
ODE, or DDIM), as MixGRPO does, and the path KL then counts the window's steps only. docs/design.md, section 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rl_diffusion.algos.base import Batch
from rl_diffusion.algos.ddpo import ImportanceSampling
from rl_diffusion.config import arg
from rl_diffusion.errors import UserError
from rl_diffusion.processes import is_deterministic

STD_FLOOR = 1e-4  # a group of equal rewards gets advantages of 0, not 0 / 0


def group_advantages(rewards: Tensor, group_size: int, adv_clip: float) -> Tensor:
    """(r - group mean) / group std [B] over consecutive groups of group_size chains, clipped to +-adv_clip."""
    groups = rewards.double().reshape(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    adv = centred / groups.std(1, correction=0, keepdim=True).clamp(min=STD_FLOOR)
    return adv.flatten().clamp(-adv_clip, adv_clip).float()


def window_start(epoch: int, steps: int, window: int, shift: int) -> int:
    """The first trained step at `epoch` (0-based) of a chain of `steps` steps: 0 without a shift, else
    epoch * shift, starting over once the window would pass the chain's end."""
    return 0 if shift == 0 else (epoch * shift) % (steps - window + 1)


class FlowGRPO(ImportanceSampling):
    """Group-relative PPO-clip with a per-step KL loss over a window of steps."""

    @dataclass(frozen=True)
    class Settings:
        group_size: int = arg(
            16, "flow-grpo: chains per group, one condition each (a class label), standardised together"
        )
        train_steps: int = arg(0, "flow-grpo: consecutive steps of each chain trained on per epoch (0 = all)")
        window_shift: int = arg(
            0, "flow-grpo: steps the trained window moves per epoch (0 = the first --train-steps: Flow-GRPO-Fast)"
        )
        ode_outside_window: bool = arg(
            False,
            "flow-grpo: sample the steps outside the trained window with eta = 0 (the flow's ODE, or DDIM), as "
            "MixGRPO does; the path KL then counts the window's steps only",
        )

    @classmethod
    def validate(cls, config) -> None:
        settings = config.settings
        if settings.group_size < 2 or config.chains % settings.group_size:
            raise UserError(
                f"--group-size must be at least 2 and divide --chains {config.chains}, got {settings.group_size}"
            )
        if settings.train_steps < 0 or settings.window_shift < 0:
            raise UserError("--train-steps and --window-shift must be >= 0")
        if settings.window_shift and not settings.train_steps:
            raise UserError("--window-shift moves the window of --train-steps: give --train-steps too")
        if settings.ode_outside_window and not settings.train_steps:
            raise UserError("--ode-outside-window samples the steps outside the window of --train-steps: give it too")
        if settings.ode_outside_window and not is_deterministic(config.sampler, 0.0):
            raise UserError(
                f"--ode-outside-window needs a sampler that is deterministic at eta = 0 (sde, ddim), got "
                f"--sampler {config.sampler}"
            )

    @classmethod
    def validate_chain(cls, config, steps_per_chain: int) -> None:
        if config.settings.train_steps > steps_per_chain:
            raise UserError(
                f"--train-steps {config.settings.train_steps} exceeds the {steps_per_chain} steps of the chain"
            )

    @property
    def label_block(self) -> int:
        """A group's chains share their condition: one class label per --group-size consecutive chains."""
        return self.settings.group_size

    def advantages(self, batch: Batch) -> tuple[Tensor, Tensor]:
        adv = group_advantages(batch.rewards, self.settings.group_size, self.run.config.adv_clip)
        return adv.expand(batch.K, -1), torch.ones_like(adv)  # the KL term is not scaled

    def exploration(self) -> float:
        """On-policy: group-relative per-step advantages are the policy's gradient only on its own chains."""
        return 1.0

    def direct_kl(self) -> bool:
        """The per-step KL loss of Flow-GRPO (its advantages hold no KL)."""
        return self.kl_coef > 0

    def window(self, K: int) -> range:
        """The steps trained this epoch, of a chain of K."""
        W = self.settings.train_steps or K
        start = window_start(self.epoch, K, W, self.settings.window_shift)
        return range(start, start + W)

    def training_rows(self, K: int, B: int, generator: torch.Generator) -> Tensor:
        steps = self.window(K)
        return torch.arange(steps.start * B, steps.stop * B, device=self.run.device)

    def step_etas(self) -> list[float] | None:
        """With --ode-outside-window: --eta in the window, 0 elsewhere."""
        if not self.settings.ode_outside_window:
            return None
        K, eta = self.run.steps_per_chain, self.run.config.eta
        steps = self.window(K)
        return [eta if k in steps else 0.0 for k in range(K)]
