"""AWM: advantage-weighted matching, the pretraining denoising loss on the policy's own samples weighted by
advantages, in DiffusionNFT's bounded form.

Xue et al. (2025), "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models";
Zheng et al. (2025), "DiffusionNFT: Online Diffusion Reinforcement with Forward Process". The likelihood-free,
forward-process family: only x_0 is trained on, through the forward process, so no reverse-step log-probs are
needed and the sampler may be deterministic (DDIM, eta = 0).

Per epoch: sample B chains, score x_0 once, turn one return per chain into an advantage, as DDPO does,
    G_b = r(x0_b) - beta sum_k kl_k,b   (beta = --kl-coef; G_b = r(x0_b) when beta = 0),
    A_b = (G_b - mean of the other chains of b's class) / scale, clipped to +-adv_clip (ddpo.advantages),
then an optimality weight w_b = 1/2 + A_b / (2 adv_clip) in [0, 1], and take
inner_epochs * K B / minibatch_size gradient steps on
    L(theta) = (1 / B) sum_b E_{t, eps} [ w_b ||eps_theta - eps||^2 + (1 - w_b) ||2 eps_old - eps_theta - eps||^2 ] / D,
    x_t = sqrt(abar_t) x0_b + sqrt(1 - abar_t) eps,   t ~ U{1..T},   eps ~ N(0, I),
with eps_old the policy before this epoch's update. The second term fits the reflection of eps_theta about
eps_old (DiffusionNFT's implicit negative policy, at strength 1): a sample with w_b < 1/2 pushes the model away
from denoising it, but only as far as a quadratic allows. The plain weighted loss sum_b A_b ||eps_theta - eps||^2,
unbounded below in its negative part, diverged on the known-answer targets at the default learning rate (every
seed at the same collapsed samples, path KL 149): that is why the bounded form.

Why it climbs the reward. At theta = theta_old the gradient of L is (2 / adv_clip) (1 / B) sum_b A_b
E (eps_old - eps) d eps_theta / d theta, that of the advantage-weighted denoising loss. The denoising loss is,
up to constants and a per-t weighting, -ELBO(x_0) >= -log p_theta(x_0), so -grad ~ E[A grad log p_theta(x_0)]:
a score-function gradient of E[G] on the marginal of x_0. For one sample the minimiser is
eps_theta = eps_old + (2 w_b - 1)(eps - eps_old): a step of bounded size towards (or away from) the sample.

Fixed point (caveat): not exactly p_pre exp(r / beta) / Z. The ELBO is a surrogate for log p, the simple loss
weights timesteps uniformly, and the per-chain path KL stands in for log p_theta(x_0) / p_pre(x_0). beta acts as
a regulariser towards the pretrained model, not as the temperature of an exact tilt.
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

    def __init__(self, s):
        super().__init__(s)
        self.old = copy.deepcopy(s.policy).requires_grad_(False)  # eps_old: the policy before this epoch's update

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        s, cfg = self.s, self.s.config
        self.old.load_state_dict(s.policy.state_dict())
        returns = chain_returns(batch.rewards, batch.kl, self.kl_coef)
        adv = advantages(returns[None], batch.c, cfg.adv_clip)[0][0]  # [B]
        w = optimality(adv, cfg.adv_clip)
        rows = s.ranks.shard(batch.B, "--chains")

        def loss() -> Tensor:
            x_t, t, target = s.diffusion.noised(batch.x0, generator, rows)  # target: eps, or a flow's velocity
            c = None if batch.c is None else batch.c[rows]
            with torch.no_grad():
                eps_old = self.old(x_t, t, c)
            per_sample = nft_loss(s.synced_policy(x_t, t, c), eps_old, target, w[rows])
            return per_sample.sum() * s.ranks.world_size / batch.B  # DDP's mean over ranks: the batch mean

        return {
            "loss/policy": self.descend(loss, self.forward_process_steps(batch)),
            "awm/adv_abs": adv.abs().mean().item(),
        }
