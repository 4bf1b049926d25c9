"""DDPO-SF (REINFORCE) and DDPO-IS (PPO-clip): policy gradients on the denoising MDP.

Black et al. (2023), "Training diffusion models with reinforcement learning". Per epoch: sample `chains`
trajectories in one batch, recording (x_t, t, x_{t-1}, log pi_old); score x_0 once; turn returns into
advantages; update. With beta = kl_coef (adapted by the loop under --kl-target), the loss of step k is
    -A_k log pi_theta(a_k | x_k) + beta kl_k / scale,   A_k from G_k = r(x_0) - beta sum_{j>k} kl_j,
kl_k = ||mu_theta - mu_ref||^2 / (2 sigma_k^2) (DDPO-IS: PPO's clipped surrogate in place of -A_k log pi).
The update follows the gradient of J = E[r] - beta KL(path) times a positive number, so its fixed point is the
KL-regularised optimum for any batch or group size: why the baseline leaves the chain out and what the
scale may depend on, docs/design.md, section 4.

DDPO-IS with --kl-return path: every step of a chain takes the advantage clip(A - log Z, +-adv_clip) of its
soft return A = r / beta - log p_old(tau) / p_pre(tau) and a running log Z, and the loss has no direct KL term.
Its fixed point is the same and holds for chains from the exploratory sampler (--explore-scale) too: relative
trajectory balance read as a policy gradient (Trust-PCL; docs/design.md, section 8).

Data parallel: every rank computes the same advantages over the whole batch; minibatches are drawn
over the whole batch's pairs and each rank computes the loss of its own pairs in them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rl_diffusion.algos.base import Algorithm, Batch
from rl_diffusion.algos.exploration import ExplorationSettings, Exploring
from rl_diffusion.config import arg
from rl_diffusion.errors import UserError
from rl_diffusion.path_kl import policy_step, step_kl

MIN_GROUP_FOR_OWN_SCALE = 8  # chains a group needs to be scaled by its own spread (its others' spread: >= 7 values)
SCALE_FLOOR = 0.1  # no group's scale falls below this fraction of the batch's spread
KL_RETURNS = ("step", "path")  # --kl-return


def advantages(returns: Tensor, groups: Tensor | None, adv_clip: float) -> tuple[Tensor, Tensor]:
    """Standardised advantages [K, B] of returns [K, B] (step k, chain b) and the scale of each chain [B].

    Baseline: the mean return of the OTHER chains of the same group (class label) at the same
    step, leave-one-out, so it is independent of the chain it is subtracted from; a chain alone
    in its group is compared with the rest of the batch. Returns that are equal within a group
    give advantages of exactly 0 (they are measured from one member of the group).
    Scale: the spread of the group's other chains (sample variance, pooled over steps) for groups
    of at least MIN_GROUP_FOR_OWN_SCALE chains, so a class with easy rewards does not drown the
    others; smaller groups take the batch's spread. No scale falls below SCALE_FLOOR times the
    batch's spread, so a group with (nearly) equal returns cannot blow up the direct KL term that
    is divided by the same scale. Advantages are clipped to [-adv_clip, adv_clip].
    Computed in float64; returned as float32.
    """
    G = returns.double()
    K, B = G.shape
    groups = torch.zeros(B, dtype=torch.long, device=G.device) if groups is None else groups
    one_hot = torch.nn.functional.one_hot(groups).double()  # [B, number of groups]
    n = one_hot.sum(0)[groups]  # [B] chains in each chain's group
    first = one_hot.argmax(0)  # [number of groups] the first chain of each group
    d = G - G[:, first[groups]]  # returns measured from one member of the group
    group_sum, group_sum_sq = (d @ one_hot)[:, groups], (d.square() @ one_hot)[:, groups]  # [K, B]
    others = (n - 1).clamp(min=1)
    others_mean = (group_sum - d) / others
    batch_others_mean = (G.sum(1, keepdim=True) - G) / max(B - 1, 1)
    centred = torch.where(n > 1, d - others_mean, G - batch_others_mean)
    batch_scale = G.var(1, correction=0).mean().sqrt()
    others_var = ((group_sum_sq - d.square()) - (group_sum - d).square() / others) / (n - 2).clamp(min=1)
    own_scale = others_var.clamp(min=0).mean(0).sqrt()
    scale = torch.where(n >= MIN_GROUP_FOR_OWN_SCALE, own_scale, batch_scale)
    # the absolute floor only matters when every return in the batch is equal (then every advantage is 0)
    scale = torch.maximum(scale, SCALE_FLOOR * batch_scale).clamp(min=torch.finfo(torch.float32).tiny)
    return (centred / scale).clamp(-adv_clip, adv_clip).float(), scale.float()


def batch_advantages(run, batch: Batch, beta: float) -> tuple[Tensor, Tensor]:
    """Advantages [K, B] of the whole batch from G_k = r - beta sum_{j>k} kl_j, and the scale of each chain [B]."""
    kl_after = batch.kl.flip(0).cumsum(0).flip(0) - batch.kl  # sum_{j > k} kl_j
    return advantages(batch.rewards[None, :] - beta * kl_after, batch.c, run.config.adv_clip)


def kl_penalty(run, beta: float, mean: Tensor, pairs, own: Tensor, scale: Tensor) -> Tensor:
    """The direct KL term of the loss per pair: beta kl_k / scale, with kl_k reduced over data dimensions
    the way the log-prob is (summed, or averaged for --log-prob-reduction mean), so that the two parts
    of the gradient stay in the ratio of grad J."""
    kl = step_kl(run.diffusion, run.config, run.reference, mean, pairs, own)
    if run.config.log_prob_reduction == "mean":
        kl = kl / mean[0].numel()
    return beta * kl / scale


class ScoreFunction(Algorithm):
    """DDPO-SF: REINFORCE, -A * log pi, gradients accumulated over all pairs, one optimizer step."""

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        run, cfg = self.run, self.run.config
        adv, scale = batch_advantages(run, batch, self.kl_coef)
        K, B = adv.shape
        self.optimizer.zero_grad(set_to_none=True)
        total, adv, scale_pairs = torch.zeros((), device=run.device), adv.flatten(), scale.repeat(K)
        for idx in self.pair_groups(torch.arange(K * B, device=run.device), batch.pairs):
            rows, own = self.own_rows(idx, B)
            ours = policy_step(run.diffusion, cfg, run.synced_policy, batch.pairs, own)
            terms = -adv[rows] * ours.log_prob
            if self.kl_coef > 0:
                terms = terms + kl_penalty(run, self.kl_coef, ours.mean, batch.pairs, own, scale_pairs[rows])
            # DDP's mean over ranks: the sum over all pairs / (K B)
            (terms.sum() * run.ranks.world_size / (K * B)).backward()
            total += terms.detach().sum()
        grad_norm = self.step()
        return {"loss/policy": run.ranks.sum(total).item() / (K * B), "train/grad_norm": grad_norm.item()}


def ppo_terms(adv: Tensor, log_prob: Tensor, log_prob_old: Tensor, clip_range: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair: the PPO-clip surrogate max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old (its
    mean is the loss); the approx_kl estimate; and whether r was clipped."""
    log_ratio = log_prob - log_prob_old
    ratio = log_ratio.exp()
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    with torch.no_grad():
        # (r - 1) - log r: unbiased and always >= 0 (Schulman's k3 estimator), unlike -log r
        approx_kl = (ratio - 1) - log_ratio
        clipped = ((ratio - 1).abs() > clip_range).float()
    return loss, approx_kl, clipped


def path_advantages(soft_returns: Tensor, log_z: Tensor, labels: Tensor, clip: float, step: float) -> Tensor:
    """Advantages [B] of the whole-chain soft returns A = r / beta - log p_old(tau) / p_pre(tau) [B] (nats):
    A - log Z of the chain's label, clipped to [-clip, clip]. log Z [labels] is a running baseline, updated in place
    after use: a label seen for the first time starts at the log-mean-exp of its chains' A (the importance estimate
    of log E_pre exp(r / beta), rtb's start), then each batch moves it `step` nats times the mean clipped advantage
    over clip towards the robust centre of its A (it stops where the clipped advantages balance)."""
    fresh = torch.isnan(log_z)
    for label in labels[fresh[labels]].unique():
        mine = soft_returns[labels == label]
        log_z[label] = torch.logsumexp(mine, 0) - math.log(len(mine))
    adv = (soft_returns - log_z[labels]).clamp(-clip, clip)
    counts = torch.zeros_like(log_z).index_add_(0, labels, torch.ones_like(adv))
    sums = torch.zeros_like(log_z).index_add_(0, labels, adv)
    log_z += step * torch.where(counts > 0, sums / counts.clamp(min=1), 0.0) / clip
    return adv


class ImportanceSampling(Exploring):
    """DDPO-IS: PPO-clip over inner epochs of shuffled minibatches of (trajectory, timestep) pairs."""

    @dataclass(frozen=True)
    class Settings(ExplorationSettings):
        kl_return: str = arg(
            "step",
            "ddpo-is: how the path KL enters the return: step (each step's KL in the returns of the steps before it, "
            "and as its own loss term; on-policy chains only) | path (r / beta - log p_old / p_pre of the whole "
            "chain for every step, less a running log Z, clipped to --adv-clip nats; its fixed point holds for the "
            "exploratory chains of --explore-scale)",
        )
        log_z_step: float = arg(0.1, "ddpo-is: --kl-return path: nats the log Z baseline moves per epoch at most")

    def __init__(self, run):
        super().__init__(run)
        labels = getattr(run.policy, "num_classes", 0) if not run.config.null_label else 0
        self.log_z = torch.full((labels or 1,), math.nan, dtype=torch.float64, device=run.device)  # --kl-return path

    @classmethod
    def validate(cls, config) -> None:
        settings = config.settings
        settings.validate()
        if settings.kl_return not in KL_RETURNS:
            raise UserError(f"unknown --kl-return '{settings.kl_return}'; choose {' or '.join(KL_RETURNS)}")
        if settings.kl_return == "path" and config.kl_coef <= 0:
            raise UserError(f"--kl-return path needs --kl-coef > 0: its returns are r / beta, got {config.kl_coef}")
        if settings.kl_return == "path" and config.log_prob_reduction != "sum":
            raise UserError("--kl-return path reads whole-chain log-densities: use --log-prob-reduction sum")
        if settings.kl_return == "step" and settings.explore_scale > 1:
            raise UserError(
                "--explore-scale > 1 needs --kl-return path: the step return's gradient is the KL-regularised "
                "objective's only on the policy's own chains"
            )
        if settings.log_z_step <= 0:
            raise UserError(f"--log-z-step must be positive, got {settings.log_z_step}")

    def advantages(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Advantages [K, B] and the scale [B] that divides each chain's direct KL term (--kl-return step).

        --kl-return path: every step of a chain takes the chain's soft return A = r / beta - log p_old / p_pre less
        a running log Z (path_advantages). At p_theta = p_pre exp(r / beta) / Z every chain's A is log Z whatever
        sampler drew it, so the advantages vanish there for exploratory chains too: with one gradient step per
        epoch this is rtb's update with log Z tracked rather than learned (Trust-PCL; docs/design.md, section 8).
        The batch's mean as the baseline keeps that fixed point but lost the posterior's corner modes within 20
        epochs: the mean sits among the failed exploratory chains, so every chain that reached a mode pulled alike."""
        if self.settings.kl_return == "step":
            return batch_advantages(self.run, batch, self.kl_coef)
        soft_returns = (batch.rewards / self.kl_coef + batch.log_ratio.sum(0)).double()  # log_ratio: log pre - log old
        labels = torch.zeros_like(batch.rewards, dtype=torch.long) if batch.c is None else batch.c
        clip, step = self.run.config.adv_clip, self.settings.log_z_step
        adv = path_advantages(soft_returns, self.log_z, labels, clip, step).float()
        return adv.expand(batch.K, -1), torch.ones_like(adv)

    def direct_kl(self) -> bool:
        """Whether each step's KL is a term of the loss: the other half of the step return's gradient."""
        return self.kl_coef > 0 and self.settings.kl_return == "step"

    def training_rows(self, K: int, B: int, generator: torch.Generator) -> Tensor:
        """The pair rows k * B + b an inner epoch trains on: all, or (--timestep-fraction) a random subset of each
        chain's timesteps."""
        device, fraction = self.run.device, self.run.config.timestep_fraction
        if fraction == 1:
            return torch.arange(K * B, device=device)
        chosen = torch.rand(K, B, generator=generator, device=device).argsort(0)[: max(1, round(fraction * K))]
        return (chosen * B + torch.arange(B, device=device)).flatten()

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        run, cfg = self.run, self.run.config
        adv, scale = self.advantages(batch)
        K, B = adv.shape
        adv, scale_pairs = adv.flatten(), scale.repeat(K)
        sums, count = torch.zeros(3, device=run.device), 0  # loss, approx_kl, clipped: summed over the epoch's pairs
        for _ in range(cfg.inner_epochs):
            rows = self.training_rows(K, B, generator)
            for idx in rows[torch.randperm(len(rows), generator=generator, device=run.device)].split(
                cfg.minibatch_size
            ):
                self.optimizer.zero_grad(set_to_none=True)
                for group in self.pair_groups(idx, batch.pairs):  # one gradient step, accumulated within --memory-mib
                    mine, own = self.own_rows(group, B)
                    ours = policy_step(run.diffusion, cfg, run.synced_policy, batch.pairs, own)
                    terms, approx_kl, clipped = ppo_terms(
                        adv[mine], ours.log_prob, batch.pairs.log_prob_old[own], cfg.clip_range
                    )
                    if self.direct_kl():
                        terms = terms + kl_penalty(run, self.kl_coef, ours.mean, batch.pairs, own, scale_pairs[mine])
                    # DDP's mean over ranks: the minibatch mean
                    (terms.sum() * run.ranks.world_size / len(idx)).backward()
                    sums += torch.stack([terms.detach().sum(), approx_kl.sum(), clipped.sum()])
                self.step()
                count += len(idx)
        loss, approx_kl, clipfrac = (run.ranks.sum(sums) / count).tolist()
        stats = {"loss/policy": loss, "ppo/approx_kl": approx_kl, "ppo/clipfrac": clipfrac}
        stats["ppo/explore_scale"] = self.exploration()
        if not self.log_z.isnan().all():
            stats["ppo/log_z"] = self.log_z.nanmean().item()
        return stats

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_z": self.log_z.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "log_z" in state:  # checkpoints of ddpo-is from before --kl-return path hold none
            self.log_z.copy_(state["log_z"])
