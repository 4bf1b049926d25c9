"""The Gaussian diffusion: every schedule-dependent quantity, and the one reverse step.

Time runs t = T, ..., 1, 0 with x_0 the data. Arrays are indexed by t itself
(index 0 is "no noise": beta_0 = 0, abar_0 = 1), so the code reads like the paper.
`reverse_step` is the only code that computes a step's (mean, sigma, log-prob), with two special cases
(docs/design.md, section 1): the sigma floor, sigma^2 = eta^2 beta~_2 on the last step (to x_0), whose
posterior variance beta~_1 is 0 (the mean never sees the floor); and the clipped x_0 (`clip_x0`, to the
run's `x0_range`), a step the policy and the reference share, so the path KL stays exact.
Every schedule-dependent number is precomputed (or, for DDIM's pairs of timesteps, computed) in float64
and cast to float32 only when it multiplies a batch.

`DenoisingProcess` holds what a flow-matching model (`rl_diffusion/flow.py`) shares with the DDPM:
integer timesteps, the training loss's draws, the clip of x_0 and the sampling loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from rl_diffusion.errors import UserError
from rl_diffusion.schedules import betas_for

LOG_PROB_REDUCTIONS = ("sum", "mean")


@dataclass
class ReverseStep:
    """One step of pi(x_{t-1} | x_t): the action, its Gaussian and its log-density."""

    x_prev: Tensor  # [B, ...] the sampled (or given) x_{t-1}
    mean: Tensor  # [B, ...] mu(x_t, t)
    sigma: Tensor  # [B] standard deviation per chain, fixed by the schedule
    log_prob: Tensor | None  # [B] log N(x_prev; mean, sigma^2 I); None when sigma = 0 (DDIM eta = 0)


@dataclass
class Trajectory:
    """Whole batched chains, as RL consumes them. K = number of reverse steps."""

    xs: Tensor  # [K + 1, B, ...]: xs[0] = x_T, xs[k + 1] = the action taken at step k, xs[K] = x_0
    timesteps: Tensor  # [K] long: t at step k (decreasing)
    prev_timesteps: Tensor  # [K] long: the t the step lands on (timesteps[k + 1], and 0 last)
    log_probs: Tensor | None  # [K, B]: log pi(xs[k + 1] | xs[k], timesteps[k])
    means: Tensor | None = None  # [K, B, ...]: the policy's mean mu(xs[k], timesteps[k]) at step k
    c: Tensor | None = None  # [B] class labels the chains were conditioned on
    # [K] bool: the stochastic steps, where a chain mixes in deterministic ones (one eta per step); None: not mixed
    stochastic: Tensor | None = None


class DenoisingProcess:
    """A process over T integer timesteps (t = T: noise, t = 0: the data) that a network learns to reverse.

    A subclass defines the forward process `q_sample(x0, t, noise)`, the network's `regression_target(x0, noise)`,
    `predict_x0(x_t, t, model_output)`, `config`, and its samplers: `reverse_step(model_output, x_t, t, *, t_prev,
    sampler, eta, x_prev, noise, log_prob_reduction)`, `timesteps(sampler, sampling_steps)`, and the static
    `check_eta`, `is_memoryless` and `is_deterministic` of (sampler, eta). The training loss, the clip of x_0 and
    the sampling loop are shared.
    """

    model_type: str  # `config` records it when it is not "ddpm": a checkpoint without one is a DDPM's
    SAMPLERS: tuple[str, ...]  # the first is the default
    DETERMINISTIC: dict  # the keyword arguments of the deterministic sampler (in-training evaluations)
    POLICY_SAMPLER: str  # the stochastic sampler a policy's chains run by default: every step has a density

    def __init__(self, num_timesteps: int, x0_range: tuple | list | None):
        self.num_timesteps = num_timesteps
        self.x0_range = None if x0_range is None else (x0_range[0], x0_range[1])

    @classmethod
    def check_sampler(cls, sampler: str, eta: float = 1.0) -> None:
        """Refuse a sampler of another process (a DDPM sampler for a flow run, or the other way round), and an eta
        the sampler cannot take."""
        if sampler not in cls.SAMPLERS:
            raise UserError(
                f"unknown sampler '{sampler}' for a {cls.model_type} run; choose one of {', '.join(cls.SAMPLERS)}"
            )
        cls.check_eta(sampler, eta)

    def clip_x0(self, x0: Tensor) -> Tensor:
        """x0 clipped to `x0_range` (per coordinate when the range has one bound per coordinate); x0 itself
        without a range."""
        if self.x0_range is None:
            return x0
        low, high = (torch.as_tensor(bound, dtype=x0.dtype, device=x0.device) for bound in self.x0_range)
        return torch.maximum(torch.minimum(x0, high), low)

    def _timestep_tensor(self, t: Tensor | int, x: Tensor) -> Tensor:
        if isinstance(t, int):
            return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return t.to(device=x.device, dtype=torch.long)

    def step_times(
        self, x_t: Tensor, t: Tensor | int, t_prev: Tensor | int | None, sampler: str, eta: float
    ) -> tuple[Tensor, Tensor]:
        """A reverse step's (t, t_prev) as long tensors [B] (t_prev defaults to t - 1), its sampler checked."""
        self.check_sampler(sampler, eta)
        t = self._timestep_tensor(t, x_t)
        return t, t - 1 if t_prev is None else self._timestep_tensor(t_prev, x_t)

    def gaussian_step(
        self,
        mean: Tensor,
        sigma: Tensor,
        sampler: str,
        eta: float,
        x_prev: Tensor | None,
        noise: Tensor | None,
        log_prob_reduction: str,
    ) -> ReverseStep:
        """The step N(mean, sigma^2 I) that every process's `reverse_step` ends in: x_prev drawn as mean + sigma
        noise unless given, and its log-density unless the sampler is deterministic."""
        if x_prev is None:
            x_prev = mean + sigma * (torch.randn(mean.shape, device=mean.device) if noise is None else noise)
        log_prob = None
        if not self.is_deterministic(sampler, eta):
            log_prob = gaussian_log_prob(x_prev, mean, sigma, log_prob_reduction)
        return ReverseStep(x_prev=x_prev, mean=mean, sigma=sigma.reshape(-1), log_prob=log_prob)

    def training_loss(
        self,
        model: nn.Module,
        x0: Tensor,
        c: Tensor | None = None,
        generator: torch.Generator | None = None,
        weights: Tensor | None = None,
        shard: slice | None = None,
    ) -> Tensor:
        """E_{t, eps} ||target - f_theta(x_t, t, c)||^2 / D with t ~ U{1..T}: Ho et al.'s simple loss (target eps)
        for a DDPM, the flow-matching loss (target eps - x_0) for a flow.

        Averaged over the batch, or summed with per-sample `weights` [B] (reward-weighted regression).
        With `shard` (a data-parallel rank's rows) t and eps are drawn for the whole batch, the
        network sees only those rows, and the loss is scaled so that the mean over equal shards
        (what DistributedDataParallel averages) is the whole batch's loss.
        """
        rows = slice(None) if shard is None else shard
        x_t, t, target = self.noised(x0, generator, rows)
        prediction = model(x_t, t, None if c is None else c[rows])
        per_sample = ((prediction - target) ** 2).flatten(1).mean(1)
        if weights is None:
            return per_sample.mean()
        return len(x0) / len(per_sample) * (weights[rows] * per_sample).sum()

    def noised(self, x0: Tensor, generator: torch.Generator | None, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, t, target) of the training loss for the rows of x0 [B, ...]: t ~ U{1..T} and eps ~ N(0, I) drawn
        for the whole batch (so a rank's rows are those one process would draw), x_t = q_sample(x0, t, eps) and
        the network's regression target."""
        t = torch.randint(1, self.num_timesteps + 1, (x0.shape[0],), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        x0, t, noise = x0[rows], t[rows], noise[rows]
        return self.q_sample(x0, t, noise), t, self.regression_target(x0, noise)

    def sample(
        self,
        model: nn.Module,
        shape: tuple[int, ...],
        *,
        c: Tensor | None = None,
        sampler: str | None = None,
        sampling_steps: int | None = None,
        eta: float | list[float] = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        record: bool = False,
        log_prob_reduction: str = "sum",
        shard: slice | None = None,
        noise_scale: float = 1.0,
    ) -> Trajectory:
        """Run the reverse chain from x_T ~ N(0, I) for a batch of `shape` [B, ...], with `sampler` (default: the
        process's first) in `sampling_steps` steps (default: all T).

        With record=False only x_0 is kept (xs has one entry, the final sample) and no
        log-probs; with record=True every state, per-step mean and log-prob is kept for RL.
        One network call per step for the whole batch. Call under torch.inference_mode()
        (or torch.no_grad()) unless gradients are wanted.

        `shard` samples only those rows of the batch (a data-parallel rank's chains; `c` holds
        their labels): every random draw is made for the whole batch and cut to the shard, so
        the rows are exactly the ones one process would sample.

        `noise_scale` S > 1 draws x_{t-1} = mean + S sigma z, an exploratory chain (off-policy
        training); its log-probs stay those of the real step (sigma).

        `eta` may be one value per step (MixGRPO's chains: stochastic steps in a window, deterministic ones
        elsewhere); a deterministic step of a chain that has stochastic ones records a log-prob of 0.
        """
        sampler = sampler or self.SAMPLERS[0]
        steps = self.timesteps(sampler, sampling_steps)
        prevs = steps[1:] + [0]
        etas = list(eta) if isinstance(eta, list | tuple) else [eta] * len(steps)
        if len(etas) != len(steps):
            raise ValueError(f"{len(etas)} etas for a chain of {len(steps)} steps")
        stochastic = [not self.is_deterministic(sampler, e) for e in etas]
        scored = any(stochastic)

        def standard_normal() -> Tensor:
            z = torch.randn(shape, device=device, generator=generator)
            return z if shard is None else z[shard]

        x = standard_normal()
        xs, means, log_probs = [x], [], []
        for t, t_prev, step_eta in zip(steps, prevs, etas, strict=True):
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
            out = self.reverse_step(
                model(x, t_batch, c),
                x,
                t_batch,
                t_prev=t_prev,
                sampler=sampler,
                eta=step_eta,
                noise=noise_scale * standard_normal(),
                log_prob_reduction=log_prob_reduction,
            )
            x = out.x_prev
            if record:
                xs.append(x)
                means.append(out.mean)
                log_probs.append(out.log_prob if out.log_prob is not None else torch.zeros(len(x), device=device))
        return Trajectory(
            xs=torch.stack(xs) if record else x.unsqueeze(0),
            timesteps=torch.tensor(steps, device=device),
            prev_timesteps=torch.tensor(prevs, device=device),
            log_probs=torch.stack(log_probs) if record and scored else None,
            means=torch.stack(means) if record else None,
            c=c,
            stochastic=torch.tensor(stochastic, device=device) if scored and not all(stochastic) else None,
        )


class GaussianDiffusion(DenoisingProcess):
    """A DDPM with T steps over a beta schedule; knows nothing about the network.

    Args:
        beta_schedule: one of `rl_diffusion.schedules.SCHEDULES`; None when `betas` are given.
        num_timesteps: T, the number of noising steps the network was trained on.
        x0_range: (low, high) that every predicted x_0 is clipped to while sampling, each a
            number or one number per coordinate of a sample (data units); None: no clipping.
        betas: beta_1..beta_T taken as they are instead of a named schedule: a network imported
            from another library keeps the schedule it was trained with, to the bit. len(betas) = T.
    """

    model_type = "ddpm"
    SAMPLERS = ("ddpm", "ddim")
    DETERMINISTIC = {"sampler": "ddim", "eta": 0.0}
    POLICY_SAMPLER = "ddpm"

    def __init__(
        self,
        beta_schedule: str | None = "linear",
        num_timesteps: int = 100,
        x0_range: tuple | list | None = None,
        betas: list[float] | None = None,
    ):
        super().__init__(num_timesteps, x0_range)
        T = num_timesteps
        self.beta_schedule = None if betas is not None else beta_schedule
        self.explicit_betas = None if betas is None else checked_betas(betas, T).tolist()
        betas = np.concatenate([[0.0], betas_for(beta_schedule, T) if betas is None else self.explicit_betas])
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        posterior_variance = np.zeros(T + 1)
        posterior_variance[1:] = betas[1:] * (1.0 - abar_prev[1:]) / (1.0 - abar[1:])
        reverse_variance = posterior_variance.copy()
        reverse_variance[1] = posterior_variance[2]  # the floor, see module docstring
        self.np = dict(
            betas=betas,
            alphas=alphas,
            abar=abar,
            sqrt_abar=np.sqrt(abar),
            sqrt_one_minus_abar=np.sqrt(1.0 - abar),
            posterior_variance=posterior_variance,
            reverse_sigma=np.sqrt(reverse_variance),
            # Ho et al. eq. 11: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
            mean_coef_x=1.0 / np.sqrt(alphas),
            mean_coef_eps=-np.divide(
                betas, np.sqrt(1.0 - abar) * np.sqrt(alphas), where=betas > 0, out=np.zeros(T + 1)
            ),
            # x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): Ho et al. eq. 4 solved for x_0
            x0_coef_x=1.0 / np.sqrt(abar),
            x0_coef_eps=np.sqrt(1.0 / abar - 1.0),
            # the mean of q(x_{t-1} | x_t, x_0), Ho et al. eq. 7
            posterior_coef_x0=np.divide(betas * np.sqrt(abar_prev), 1.0 - abar, where=betas > 0, out=np.zeros(T + 1)),
            posterior_coef_x=np.divide(
                (1.0 - abar_prev) * np.sqrt(alphas), 1.0 - abar, where=betas > 0, out=np.zeros(T + 1)
            ),
        )
        self._tensors: dict[tuple[torch.device, torch.dtype], dict[str, Tensor]] = {}

    @property
    def config(self) -> dict:
        config = {"beta_schedule": self.beta_schedule, "num_timesteps": self.num_timesteps}
        if self.x0_range is not None:
            config["x0_range"] = list(self.x0_range)
        if self.explicit_betas is not None:
            config["betas"] = self.explicit_betas
        return config

    def _coef(self, name: str, t: Tensor, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """schedule[name][t] in `dtype` on like's device, shaped to broadcast over like."""
        table = self._tensors.setdefault((like.device, dtype), {})
        if name not in table:
            table[name] = torch.as_tensor(self.np[name], dtype=dtype, device=like.device)
        return table[name][t].reshape(-1, *([1] * (like.dim() - 1)))

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The x_0 that the noise prediction eps implies at (x_t, t)."""
        return self._coef("x0_coef_x", t, x_t) * x_t - self._coef("x0_coef_eps", t, x_t) * eps

    # Forward process

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Sample from q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), given the noise."""
        return self._coef("sqrt_abar", t, x0) * x0 + self._coef("sqrt_one_minus_abar", t, x0) * noise

    def regression_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The network predicts the noise."""
        return noise

    # Reverse process

    def reverse_step(
        self,
        eps: Tensor,
        x_t: Tensor,
        t: Tensor | int,
        *,
        t_prev: Tensor | int | None = None,
        sampler: str = "ddpm",
        eta: float = 1.0,
        x_prev: Tensor | None = None,
        noise: Tensor | None = None,
        log_prob_reduction: str = "sum",
    ) -> ReverseStep:
        """The reverse step pi(x_{t_prev} | x_t) = N(mean, sigma^2 I) and its log-density.

        Args:
            eps: the network's noise prediction eps_theta(x_t, t, c), shape of x_t.
            t: current timestep(s) in 1..T, int or long tensor [B].
            t_prev: where the step lands (DDIM may skip); default t - 1. DDPM requires t - 1.
            sampler: "ddpm" (Ho et al. eq. 11, sigma^2 = posterior variance) or
                "ddim" (Song et al. eq. 12 with sigma = eta * sigma_DDPM-like).
            eta: DDIM stochasticity in [0, 1]; ignored by "ddpm". eta = 0 is deterministic (no
                log-prob); eta = 1 forgets x_T like DDPM (memoryless), eta < 1 does not.
            x_prev: the action to score; when None it is sampled as mean + sigma * noise.
            noise: the N(0, I) draw of that sample, shape of x_t; from torch's global RNG when None.
            log_prob_reduction: "sum" over data dimensions (the exact log-density, default) or
                "mean" (per dimension, as large-image systems use; clip ranges shrink accordingly).
        """
        t, t_prev = self.step_times(x_t, t, t_prev, sampler, eta)
        # One mean in two forms: a x_t + b eps, and c_x0 x_0 + c_x x_t with x_0 the prediction. The
        # first is better conditioned (1 / sqrt(abar_t) amplifies rounding in x_0 near t = T); the
        # second is used where x_0 was clipped.
        if sampler == "ddpm":
            # Ho et al. eq. 11, and the mean of q(x_{t-1} | x_t, x_0), eq. 7
            a, b, c_x0, c_x = (
                self._coef(name, t, x_t)
                for name in ("mean_coef_x", "mean_coef_eps", "posterior_coef_x0", "posterior_coef_x")
            )
            sigma = self._coef("reverse_sigma", t, x_t)
        else:
            # Song et al. eq. 12: mean = sqrt(abar_s) x_0 + sqrt(1 - abar_s - sigma^2) eps. Its coefficients
            # depend on the pair (t, t_prev), so they are computed here, in float64.
            abar_t, abar_s = self._coef("abar", t, x_t, torch.float64), self._coef("abar", t_prev, x_t, torch.float64)
            sigma = eta * torch.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
            floor = eta * self._coef("reverse_sigma", torch.ones_like(t), x_t, torch.float64)
            sigma = torch.where(t_prev.reshape(sigma.shape) == 0, floor, sigma)
            # the floor's sigma^2 exceeds 1 - abar_0 = 0 on the last step: its mean is x_0
            direction = (1 - abar_s - sigma**2).clamp(min=0).sqrt()
            a = (abar_s / abar_t).sqrt()
            b = direction - (abar_s * (1 - abar_t) / abar_t).sqrt()
            c_x0 = (
                abar_s.sqrt() - direction * (abar_t / (1 - abar_t)).sqrt()
            )  # with eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)
            c_x = direction / (1 - abar_t).sqrt()
            a, b, c_x0, c_x, sigma = (v.float() for v in (a, b, c_x0, c_x, sigma))
        mean = a * x_t + b * eps
        if self.x0_range is not None:
            x0 = self.predict_x0(x_t, t, eps)
            clipped = self.clip_x0(x0)
            mean = torch.where(clipped != x0, c_x0 * clipped + c_x * x_t, mean)
        return self.gaussian_step(mean, sigma, sampler, eta, x_prev, noise, log_prob_reduction)

    @staticmethod
    def check_eta(sampler: str, eta: float) -> None:
        """DDIM takes eta in [0, 1]: above 1 its sigma^2 exceeds 1 - abar_{t_prev}."""
        if sampler == "ddim" and not 0 <= eta <= 1:
            raise UserError(f"--eta must be in [0, 1], got {eta}: above 1 the DDIM step has no valid mean")

    @staticmethod
    def is_memoryless(sampler: str, eta: float) -> bool:
        """Whether the chain forgets x_T, so that the KL-regularised optimum p_pre(x_0) exp(r / beta) / Z is
        reachable with x_T shared (docs/design.md, section 2): DDPM, and DDIM with eta = 1."""
        return sampler == "ddpm" or eta == 1.0

    @staticmethod
    def is_deterministic(sampler: str, eta: float) -> bool:
        """Whether every step's sigma is 0 (no log-prob): DDIM with eta = 0."""
        return sampler == "ddim" and eta == 0

    def timesteps(self, sampler: str = "ddpm", sampling_steps: int | None = None) -> list[int]:
        """The decreasing timesteps a chain visits before x_0: all of T..1 for DDPM, K evenly spaced for DDIM."""
        T = self.num_timesteps
        self.check_sampler(sampler)
        if sampler == "ddpm":
            if sampling_steps not in (None, T):
                raise UserError(
                    f"the ddpm sampler takes all {T} steps; use --sampler ddim for --sampling-steps {sampling_steps}"
                )
            return list(range(T, 0, -1))
        K = T if sampling_steps is None else sampling_steps
        # K = 1 would take pure noise x_T for x_1 and jump to x_0 from the wrong time
        if not 2 <= K <= T:
            raise UserError(f"--sampling-steps must be between 2 and {T}, got {K}")
        return sorted({int(round(x)) for x in np.linspace(1, T, K)}, reverse=True)


def checked_betas(betas: list[float], num_timesteps: int) -> np.ndarray:
    """beta_1..beta_T as given, float64 [T]; refused unless there are T of them, each in (0, 1)."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.shape != (num_timesteps,):
        raise UserError(f"betas must hold one number per timestep, {num_timesteps}; got {betas.size}")
    if not np.all((betas > 0) & (betas < 1)):
        raise UserError(f"every beta must be in (0, 1); got {betas.min()} to {betas.max()}")
    return betas


def gaussian_log_prob(x: Tensor, mean: Tensor, sigma: Tensor, reduction: str = "sum") -> Tensor:
    """log N(x; mean, sigma^2 I) per batch element, summed (or averaged) over data dimensions.

    sigma has shape [B] or broadcasts against x as [B, 1, ...].
    """
    if reduction not in LOG_PROB_REDUCTIONS:
        raise UserError(f"unknown log-prob reduction '{reduction}'; choose one of {', '.join(LOG_PROB_REDUCTIONS)}")
    sigma = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    per_dim = -((x - mean) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)
    per_dim = per_dim.flatten(1)
    return per_dim.sum(1) if reduction == "sum" else per_dim.mean(1)
