"""Sampled chains as (state, action) pairs, rescored by any network, and their exact path KL.

Diffusion math shared by every trainer and by evaluation (which imports no trainer). `cfg` is any
object with the attributes of the chain the pairs were sampled on: `sampler`, `eta`,
`log_prob_reduction` and, for batching, `minibatch_size` (a FinetuneConfig is one).

The path KL of a policy to the pretrained model, both chains sharing x_T and sigma, is exactly
KL = E sum_k kl_k, kl_k = ||mu_theta(x_k, t_k) - mu_ref(x_k, t_k)||^2 / (2 sigma_k^2)
(docs/design.md, section 2).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rl_diffusion.diffusion import DenoisingProcess, ReverseStep, Trajectory


@dataclass
class Pairs:
    """The (trajectory, timestep) pairs of one sampled batch, flattened to N = K * B rows (step-major: k * B + b)."""

    x_t: Tensor  # [N, ...]
    t: Tensor  # [N]
    t_prev: Tensor  # [N]
    x_prev: Tensor  # [N, ...] the action taken
    log_prob_old: Tensor | None  # [N] log pi_old(x_prev | x_t), recorded while sampling (None: deterministic chain)
    mean_old: Tensor | None = None  # [N, ...] the mean of pi_old, recorded while sampling (None: not recorded)
    c: Tensor | None = None  # [N] class labels of the chains, or None
    # [N] bool: the pairs whose step was stochastic, where a chain mixes in deterministic steps (MixGRPO); None: all
    stochastic: Tensor | None = None

    def __len__(self) -> int:
        return len(self.t)

    @classmethod
    def from_trajectory(cls, traj: Trajectory) -> Pairs:
        B = traj.xs.shape[1]
        return cls(
            x_t=traj.xs[:-1].flatten(0, 1),
            t=traj.timesteps.repeat_interleave(B),
            t_prev=traj.prev_timesteps.repeat_interleave(B),
            x_prev=traj.xs[1:].flatten(0, 1),
            log_prob_old=None if traj.log_probs is None else traj.log_probs.flatten(),
            mean_old=None if traj.means is None else traj.means.flatten(0, 1),
            c=None if traj.c is None else traj.c.repeat(len(traj.timesteps)),
            stochastic=None if traj.stochastic is None else traj.stochastic.repeat_interleave(B),
        )

    def select(self, keep: Tensor) -> Pairs:
        return Pairs(**{f.name: None if (v := getattr(self, f.name)) is None else v[keep] for f in fields(self)})


def policy_step(diffusion: DenoisingProcess, cfg, model: torch.nn.Module, pairs: Pairs, idx: Tensor) -> ReverseStep:
    """The shared reverse step of `model` on the chosen pairs: one network call, the actions scored."""
    x_t, t = pairs.x_t[idx], pairs.t[idx]
    return diffusion.reverse_step(
        model(x_t, t, None if pairs.c is None else pairs.c[idx]),
        x_t,
        t,
        t_prev=pairs.t_prev[idx],
        sampler=cfg.sampler,
        eta=cfg.eta,
        x_prev=pairs.x_prev[idx],
        log_prob_reduction=cfg.log_prob_reduction,
    )


def step_kl(
    diffusion: DenoisingProcess, cfg, reference: torch.nn.Module, mean: Tensor, pairs: Pairs, idx: Tensor
) -> Tensor:
    """kl_k = ||mu_theta - mu_ref||^2 / (2 sigma^2) at the chosen pairs, for the policy mean `mean`
    (differentiable in theta)."""
    with torch.no_grad():
        ref = policy_step(diffusion, cfg, reference, pairs, idx)
    return kl_to(mean, ref)


def kl_to(mean: Tensor, ref: ReverseStep) -> Tensor:
    """KL(N(mean, sigma^2 I) || N(ref.mean, sigma^2 I)) = ||mean - ref.mean||^2 / (2 sigma^2), per row."""
    return ((mean - ref.mean) ** 2).flatten(1).sum(1) / (2 * ref.sigma**2)


def path_kls(
    diffusion: DenoisingProcess, cfg, policy: torch.nn.Module, reference: torch.nn.Module, pairs: Pairs, K: int
) -> Tensor:
    """kl_k of every pair as [K, B]; summed over k it is the exact path KL of each chain."""
    return reference_scores(diffusion, cfg, policy, reference, pairs, K)[0]


def reference_scores(
    diffusion: DenoisingProcess, cfg, policy: torch.nn.Module, reference: torch.nn.Module, pairs: Pairs, K: int
) -> tuple[Tensor, Tensor | None]:
    """(kl_k, log pi_ref(x_prev | x_t) - log pi_policy(x_prev | x_t)) of every pair, each [K, B], from one
    reference call per pair: summed over k, the exact path KL of each chain and its path log-ratio
    log P_ref(tau) / P_policy(tau) (both chains start at x_T ~ N(0, I)). The log-ratio is None on a
    deterministic chain (DDIM, eta = 0), which has no density; its KL is still that of the means.

    The policy's means and log-probs are those recorded while sampling when the pairs have them (then only the
    reference is called), else the policy is called (sb3-ppo's rollout buffer keeps no means). A chain that mixes
    in deterministic steps (`pairs.stochastic`) has no density there: those steps count 0, so the KL and the
    log-ratio are those of its stochastic steps given the states they start from.
    """

    def scores(idx: Tensor) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            ref = policy_step(diffusion, cfg, reference, pairs, idx)
        if pairs.mean_old is None or pairs.log_prob_old is None:
            step = policy_step(diffusion, cfg, policy, pairs, idx)
            mean, log_prob = step.mean, step.log_prob
        else:
            mean, log_prob = pairs.mean_old[idx], pairs.log_prob_old[idx]
        kl, log_ratio = kl_to(mean, ref), None if ref.log_prob is None else ref.log_prob - log_prob
        if pairs.stochastic is not None:
            kl = torch.where(pairs.stochastic[idx], kl, 0.0)
            log_ratio = None if log_ratio is None else torch.where(pairs.stochastic[idx], log_ratio, 0.0)
        return kl, log_ratio

    with torch.no_grad():
        kl, log_ratio = zip(
            *(scores(idx) for idx in torch.arange(len(pairs), device=pairs.t.device).split(cfg.minibatch_size)),
            strict=True,
        )
    if log_ratio[0] is None:
        return torch.cat(kl).reshape(K, -1), None
    return torch.cat(kl).reshape(K, -1), torch.cat(log_ratio).reshape(K, -1)
