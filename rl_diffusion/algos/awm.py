"""AWM: advantage-weighted matching, the pretraining denoising loss on the policy's own samples weighted by advantages.

Xue et al. (2025), "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion Models";
the same likelihood-free, forward-process family as DiffusionNFT (Zheng et al. 2025).

Per epoch: sample B chains, score x_0 once, then take inner_epochs * max(1, K B // minibatch_size)
gradient steps on
    L(theta) = (1 / B) sum_b A_b E_{t, eps} ||eps_theta(x_t, t, c_b) - eps||^2 / D,
    x_t = sqrt(abar_t) x0_b + sqrt(1 - abar_t) eps,   t ~ U{1..T},   eps ~ N(0, I),
with a fresh (t, eps) per sample and step, drawn for the whole batch by the run's generator (so
every rank draws the same). The advantages are those of DDPO, from one return per chain
    G_b = r(x0_b) - beta sum_k kl_k,b   (beta = --kl-coef; G_b = r(x0_b) when beta = 0),
    A_b = (G_b - mean of the other chains of b's class) / scale, clipped to +-adv_clip,
leave-one-out, so A_b does not depend on G_b's own noise, and equal returns give A = 0 exactly.
Advantages may be negative: the loss then pushes the model's denoising error UP on bad samples.

Why it climbs the reward. The simple denoising loss is, up to constants and a per-t weighting,
-ELBO(x_0) <= -log p_theta(x_0), so -grad L ~ E[A grad log p_theta(x_0)]: the score-function
(REINFORCE) gradient of E[G] on the marginal of x_0, with no log-probs of the reverse chain. So
no reverse-step scores are needed (needs_log_prob = False) and the sampler may be deterministic
(DDIM, eta = 0): only x_0 is trained on.

Fixed point (caveat). With an exact likelihood and beta > 0 the stationary point of E[A grad log p]
would be p_pre(x_0) exp(r(x_0) / beta) / Z. Here it is not exactly that: the ELBO is a surrogate
for log p (its gap depends on theta), the simple loss weights the timesteps uniformly rather than
as the ELBO does, and the per-chain path KL stands in for log p_theta(x_0) / p_pre(x_0) (a bound on
it, tight only for a memoryless chain). Treat beta as a regulariser towards the pretrained model,
not as the temperature of an exact tilt. With beta = 0 nothing holds the policy: like RWR, it
keeps moving towards high reward.

No trust region: the loss on negative advantages is unbounded below, but advantages are
standardised and clipped, steps are few per batch and the gradient norm is clipped (--grad-clip);
simplicity first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl_diffusion.algos.base import Algorithm, Batch
from rl_diffusion.algos.ddpo import advantages


def chain_returns(rewards: Tensor, kl: Tensor | None, beta: float) -> Tensor:
    """G_b = r_b - beta * path KL_b [B]; r itself when beta = 0 (or the chain is deterministic: no KL)."""
    if beta > 0 and kl is not None:
        return rewards - beta * kl.sum(0)
    return rewards


class AdvantageWeightedMatching(Algorithm):
    """AWM: minimise the advantage-weighted denoising loss on the epoch's x_0, over several steps."""

    needs_log_prob = False  # trains on x_0 only: any sampler, deterministic DDIM included

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        cfg = self.s.config
        returns = chain_returns(batch.rewards, batch.kl, cfg.kl_coef)
        adv = advantages(returns[None], batch.c, cfg.adv_clip)[0][0]  # [B]
        loss = self.fit_denoising(batch, adv / batch.B, generator)  # (1 / B) sum_b A_b ||eps_theta - eps||^2 / D
        return {"loss/policy": loss, "awm/adv_abs": adv.abs().mean().item()}
