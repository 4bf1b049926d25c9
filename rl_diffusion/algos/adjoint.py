"""Adjoint matching: regress the control onto the lean adjoint of the reward (Domingo-Enrich, Drozdzal,
Karrer, Chen, "Adjoint Matching: Fine-tuning Flow and Diffusion Generative Models with Memoryless Stochastic
Optimal Control", ICLR 2025), in discrete time on the reverse chain.

Once per epoch, on chains of the current policy (detached), with the control
u_k(x) = (mu_theta(x, t_k) - mu_ref(x, t_k)) / sigma_k (its per-step KL is ||u_k||^2 / 2):
  - lean adjoint, backwards along each chain: a_K = grad_x r(x_K) / beta,
    a_k = (d mu_ref(x_k, t_k) / d x_k)^T a_{k+1}, vector-Jacobian products through the reference's mean;
  - loss over (trajectory, timestep) pairs, states detached: L = sum_k || u_k(x_k) - sigma_k a_{k+1} ||^2,
    minimised over --inner-epochs passes of shuffled minibatches.
The regression's minimiser u_k = sigma_k E[a_{k+1} | x_k] is the optimality condition of E[r] - beta KL, so
the fixed point is the KL-regularised optimum on a memoryless chain. The control problem, why "lean" is
exact there, and the adjoint's scale: docs/design.md, section 8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rl_diffusion.algos.base import Algorithm, Batch
from rl_diffusion.config import arg
from rl_diffusion.errors import UserError
from rl_diffusion.path_kl import Pairs, policy_step


def lean_adjoint(run, pairs: Pairs, K: int, a_final: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The reference's mean mu_ref(x_k, t_k), sigma_k and the lean adjoint a_{k+1} at every pair (rows k * B + b
    of `pairs`), from a_K = a_final [B, ...]: a_k = J_ref(x_k)^T a_{k+1}, one batched VJP per step through the
    reference's `reverse_step` (so the x_0 clipping is that of the chain)."""
    cfg, B = run.config, len(pairs) // K
    mean_ref, adjoint = torch.empty_like(pairs.x_t), torch.empty_like(pairs.x_t)
    sigma = torch.empty(len(pairs), device=pairs.x_t.device)
    a = a_final
    for k in reversed(range(K)):
        rows = slice(k * B, (k + 1) * B)
        adjoint[rows] = a
        with torch.enable_grad():
            x = pairs.x_t[rows].detach().requires_grad_(True)
            t = pairs.t[rows]
            eps = run.reference(x, t, None if pairs.c is None else pairs.c[rows])
            step = run.diffusion.reverse_step(
                eps, x, t, t_prev=pairs.t_prev[rows], sampler=cfg.sampler, eta=cfg.eta, x_prev=pairs.x_prev[rows]
            )
            if k > 0:  # a_0 (at x_T) trains nothing
                (a,) = torch.autograd.grad(step.mean, x, a)
        mean_ref[rows], sigma[rows] = step.mean.detach(), step.sigma
    return mean_ref, sigma, adjoint


def matching_terms(mean: Tensor, mean_ref: Tensor, sigma: Tensor, adjoint: Tensor) -> Tensor:
    """||u_k - sigma_k a_{k+1}||^2 per pair, u_k = (mu_theta - mu_ref) / sigma_k."""
    sigma = sigma.reshape(-1, *([1] * (mean.dim() - 1)))
    return ((mean - mean_ref) / sigma - sigma * adjoint).flatten(1).square().sum(1)


class AdjointMatching(Algorithm):
    """Adjoint matching: the policy's control regressed onto sigma_k times the lean adjoint of r / beta."""

    needs_reward_gradient = True
    needs_memoryless = True
    needs_log_prob = False  # it regresses means: no action is scored
    uses_kl = True
    defaults = {"kl_coef": 1.0}  # its target is r / beta: the CLI's beta = 0 has none

    @dataclass(frozen=True)
    class Settings:
        check_targets: bool = arg(
            True,
            "adjoint: stop with an error at the first epoch when its targets ask for more KL per chain (nats, "
            "median) than any tilt of the reward can hold ((max r - mean r) / beta over that batch)",
        )

    @classmethod
    def validate(cls, config) -> None:
        if config.kl_coef <= 0:
            raise UserError(
                "--algo adjoint needs --kl-coef > 0: its adjoint starts at grad r / beta, and beta = 0 has no optimum"
            )

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        run, cfg = self.run, self.run.config
        K, B, pairs = batch.K, batch.B, batch.pairs
        B_rank = len(pairs) // K
        last = slice((K - 1) * B_rank, K * B_rank)  # this rank's x_K: the last step's actions
        rewards, grad = run.reward.gradient(pairs.x_prev[last], None if pairs.c is None else pairs.c[last])
        # a gradient that is non-finite where the reward was not: that chain is left out of the loss
        finite_chains = torch.isfinite(rewards)
        finite = finite_chains.repeat(K)
        with torch.no_grad():
            a_final = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0) / self.kl_coef
            mean_ref, sigma, adjoint = lean_adjoint(run, pairs, K, a_final)
            target_norm = (sigma.reshape(-1, *[1] * (adjoint.dim() - 1)) * adjoint).flatten(1).norm(dim=1)
            target_kl = 0.5 * target_norm.square().reshape(K, B_rank).sum(0)  # nats per chain the targets ask for
            target_norm = run.ranks.sum(torch.stack([(target_norm * finite).sum(), finite.sum().float()]))
        kl_median = run.ranks.gather(target_kl[finite_chains]).median().item()
        kept = run.ranks.gather(rewards[finite_chains])
        kl_bound = ((kept.max() - kept.mean()) / self.kl_coef).item()
        if self.epoch == 0 and self.settings.check_targets:
            gradient = run.ranks.gather(a_final.flatten(1).norm(dim=1) * self.kl_coef).median().item()
            self.check_targets(kl_median, kl_bound, gradient)
        sums, count = torch.zeros((), device=run.device), 0
        for _ in range(cfg.inner_epochs):
            perm = torch.randperm(K * B, generator=generator, device=run.device)
            for idx in perm.split(cfg.minibatch_size):
                self.optimizer.zero_grad(set_to_none=True)
                for group in self.pair_groups(idx, pairs):  # one gradient, accumulated in groups that fit
                    _, own = self.own_rows(group, B)
                    ours = policy_step(run.diffusion, cfg, run.synced_policy, pairs, own)
                    terms = matching_terms(ours.mean, mean_ref[own], sigma[own], adjoint[own])
                    terms = torch.where(finite[own], terms, torch.zeros_like(terms))
                    # DDP's mean over ranks: the minibatch mean
                    (terms.sum() * run.ranks.world_size / len(idx)).backward()
                    sums += terms.detach().sum()
                self.step()
                count += len(idx)
        return {
            "loss/policy": run.ranks.sum(sums).item() / count,
            "adjoint/target_norm": (target_norm[0] / target_norm[1].clamp(min=1)).item(),
            "adjoint/target_kl_median": kl_median,
            "adjoint/tilt_kl_bound": kl_bound,
        }

    def check_targets(self, kl_median: float, kl_bound: float, gradient: float) -> None:
        """Refuse targets that ask for more than any tilt holds. The optimum's KL is E*[r] / beta - log Z, at
        most (sup r - E_pre r) / beta (Jensen: log Z >= E_pre r / beta); on the first epoch's chains the targets
        sigma_k a_{k+1} ask for sum_k ||sigma_k a_{k+1}||^2 / 2 nats per chain. On a reward that steep the
        regression follows the gradient of E[r | x_k], not of log E[exp(r / beta) | x_k], and overshoots
        (docs/design.md, section 8: on gmm25's posterior the median asks 137 nats against a bound of 37)."""
        if kl_median > kl_bound:
            raise UserError(
                f"--algo adjoint: its first targets ask for {kl_median:.3g} nats per chain (median), more than "
                f"any tilt of this reward at beta = {self.kl_coef:g} can hold ({kl_bound:.3g} nats: max r - mean r "
                f"over the batch, over beta); the reward's gradient is {gradient:.3g} at the median, too steep "
                "for adjoint matching's regression to be trusted. Raise --kl-coef, use --algo rtb, ddpo-is or "
                "iw-distill, or pass --no-check-targets to run it anyway"
            )
