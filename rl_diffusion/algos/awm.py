"""AWM: advantage-weighted matching, the pretraining denoising loss on the policy's own samples weighted by
advantages, in DiffusionNFT's bounded form.

Xue et al. (2025), "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models";
Zheng et al. (2025), "DiffusionNFT: Online Diffusion Reinforcement with Forward Process". Only x_0 is trained
on, through the forward process, so no log-probs are needed and the sampler may be deterministic.

Per epoch: A_b the advantage of G_b = r(x0_b) - beta sum_k kl_k,b (ddpo.advantages), the weight
w_b = 1/2 + A_b / (2 adv_clip) in [0, 1], then inner_epochs * K B / minibatch_size gradient steps on
    L(theta) = (1 / B) sum_b E_{t, eps} [ w_b ||eps_theta - eps||^2 + (1 - w_b) ||2 eps_old - eps_theta - eps||^2 ] / D,
x_t = sqrt(abar_t) x0_b + sqrt(1 - abar_t) eps, eps_old the policy before this epoch's update. Why the bounded
form, why it climbs the reward, and its fixed point (approximately the tilt, not exactly): docs/design.md,
section 8.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from rl_diffusion.algos.base import Algorithm, Batch
from rl_diffusion.algos.ddpo import advantages


def chain_returns(rewards: Tensor, kl: Tensor | None, beta: float) -> Tensor:
    """G_b = r_b - beta * path KL_b [B]; r itself when beta = 0 (or the chain is deterministic: no KL)."""
    if beta > 0 and kl is not None:
        return rewards - beta * kl.sum(0)
    return rewards


def optimality(adv: Tensor, adv_clip: float) -> Tensor:
    """w_b = 1/2 + A_b / (2 adv_clip) in [0, 1]: 1/2 for an average chain, 1 for the best the clip allows."""
    return 0.5 + 0.5 * adv / adv_clip


def nft_loss(eps: Tensor, eps_old: Tensor, noise: Tensor, w: Tensor) -> Tensor:
    """Per sample: w ||eps - noise||^2 / D + (1 - w) ||2 eps_old - eps - noise||^2 / D."""
    positive = (eps - noise).square().flatten(1).mean(1)
    negative = (2 * eps_old - eps - noise).square().flatten(1).mean(1)
    return w * positive + (1 - w) * negative


class AdvantageWeightedMatching(Algorithm):
    """AWM: the bounded advantage-weighted denoising loss on the epoch's x_0, over several steps."""

    needs_log_prob = False  # trains on x_0 only: any sampler, deterministic DDIM included

    def __init__(self, run):
        super().__init__(run)
        self.old = copy.deepcopy(run.policy).requires_grad_(False)  # eps_old: the policy before this epoch's update

    def refresh_old(self) -> None:
        """eps_old <- the policy, before each epoch's update."""
        self.old.load_state_dict(self.run.policy.state_dict())

    def matching_loss(
        self, pred: Tensor, pred_old: Tensor, target: Tensor, x_t: Tensor, t: Tensor, x0: Tensor, w: Tensor
    ):
        """The per-sample loss of the network's prediction against the forward process's target."""
        return nft_loss(pred, pred_old, target, w)

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        run, cfg = self.run, self.run.config
        self.refresh_old()
        returns = chain_returns(batch.rewards, batch.kl, self.kl_coef)
        adv = advantages(returns[None], batch.c, cfg.adv_clip)[0][0]  # [B]
        w = optimality(adv, cfg.adv_clip)
        rows = run.ranks.shard(batch.B, "--chains")

        def loss() -> Tensor:
            x_t, t, target = run.diffusion.noised(batch.x0, generator, rows)  # target: eps, or a flow's velocity
            c = None if batch.c is None else batch.c[rows]
            with torch.no_grad():
                eps_old = self.old(x_t, t, c)
            per_sample = self.matching_loss(
                run.synced_policy(x_t, t, c), eps_old, target, x_t, t, batch.x0[rows], w[rows]
            )
            return per_sample.sum() * run.ranks.world_size / batch.B  # DDP's mean over ranks: the batch mean

        return {
            "loss/policy": self.descend(loss, self.forward_process_steps(batch)),
            "awm/adv_abs": adv.abs().mean().item(),
        }
