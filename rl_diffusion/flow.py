"""Flow matching on the linear interpolant, with the integer timesteps of the DDPM (docs/design.md, section 10).

x_t = (1 - t) x_0 + t eps at t = k / T, k = 0..T (t = 1: noise, t = 0: the data); the network predicts the
velocity v = eps - x_0 from (x_t, k), so checkpoints, samplers and algorithms keep integer timestep indices and
the networks read k / T = t as they read a DDPM's t / T.

`FlowMatching.reverse_step` is this process's one reverse step, two samplers of it:
  euler  x_s = x_t - (t - s) v: the ODE, deterministic (sigma = 0, no log-prob);
  sde    Euler-Maruyama of the SDE with the ODE's marginals (Flow-GRPO, Liu et al. 2025), noise
         sigma_t = eta sqrt(2 t / (1 - t)): Gaussian steps, and eta = 1 is adjoint matching's memoryless
         schedule (Domingo-Enrich et al. 2024). sigma_t is infinite at t = 1: there the first step reads 1 - t
         at the time it lands on, as Flow-GRPO does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rl_diffusion.diffusion import DenoisingProcess, ReverseStep
from rl_diffusion.errors import UserError


class FlowMatching(DenoisingProcess):
    """Flow matching with T + 1 grid times t_k = k / T; knows nothing about the network.

    Args:
        num_timesteps: T, the number of grid steps between the data (k = 0) and the noise (k = T).
        x0_range: (low, high) that every predicted x_0 is clipped to while sampling (see GaussianDiffusion).
    """

    model_type = "flow"
    SAMPLERS = ("euler", "sde")
    DETERMINISTIC = {"sampler": "euler"}
    POLICY_SAMPLER = "sde"

    def __init__(self, num_timesteps: int = 100, x0_range: tuple | list | None = None):
        if num_timesteps < 2:
            raise UserError(f"--num-timesteps must be at least 2, got {num_timesteps}")
        super().__init__(num_timesteps, x0_range)

    @property
    def config(self) -> dict:
        config = {"model_type": self.model_type, "num_timesteps": self.num_timesteps}
        if self.x0_range is not None:
            config["x0_range"] = list(self.x0_range)
        return config

    def time(self, k: Tensor, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The flow time t = k / T of timestep indices k [B], shaped to broadcast over like."""
        return (k.to(dtype) / self.num_timesteps).reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = (1 - t) x_0 + t eps at t = k / T."""
        time = self.time(t, x0)
        return (1 - time) * x0 + time * noise

    def regression_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The network predicts the velocity d x_t / d t = eps - x_0."""
        return noise - x0

    def predict_x0(self, x_t: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
        """The x_0 that the velocity implies at (x_t, t): x_t - t v."""
        return x_t - self.time(t, x_t) * velocity

    def clipped_velocity(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The velocity itself, or, where its x_0 leaves `x0_range`, the velocity (x_t - x_0) / t of the clipped
        x_0 (the flow's `clip_x0`)."""
        if self.x0_range is None:
            return velocity
        x0 = self.predict_x0(x_t, t, velocity)
        clipped = self.clip_x0(x0)
        return torch.where(clipped != x0, (x_t - clipped) / self.time(t, x_t), velocity)

    def reverse_step(
        self,
        velocity: Tensor,
        x_t: Tensor,
        t: Tensor | int,
        *,
        t_prev: Tensor | int | None = None,
        sampler: str = "euler",
        eta: float = 1.0,
        x_prev: Tensor | None = None,
        noise: Tensor | None = None,
        log_prob_reduction: str = "sum",
    ) -> ReverseStep:
        """The step from x_t to x_s, s = t_prev / T < t = t / T: N(a x_t + b v, sigma^2 I) and its log-density.

        Args:
            velocity: the network's velocity v_theta(x_t, t, c), shape of x_t.
            t: current timestep(s) in 1..T, int or long tensor [B].
            t_prev: where the step lands; default t - 1.
            sampler: "euler" (the ODE, sigma = 0) or "sde" (docs/design.md, section 10).
            eta: the sde's noise level, sigma_t = eta sqrt(2 t / (1 - t)); eta = 1 forgets x_T (memoryless),
                eta = 0 is the ODE. Flow-GRPO's noise level a is eta sqrt(2). Ignored by "euler".
            x_prev, noise, log_prob_reduction: as in GaussianDiffusion.reverse_step.
        """
        k, k_prev = self.step_times(x_t, t, t_prev, sampler, eta)
        v = self.clipped_velocity(velocity, x_t, k)
        a, b, sigma = self.step_coefficients(k, k_prev, x_t, sampler, eta)
        mean = a * x_t + b * v
        return self.gaussian_step(mean, sigma, sampler, eta, x_prev, noise, log_prob_reduction)

    def step_coefficients(
        self, k: Tensor, k_prev: Tensor, like: Tensor, sampler: str, eta: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(a, b, sigma) of the step mean = a x_t + b v, in float64 and cast once: Euler-Maruyama over
        dt = t - s of dx = -[v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt + sigma_t dW in reverse time."""
        t, s = self.time(k, like, torch.float64), self.time(k_prev, like, torch.float64)
        dt = t - s
        if sampler == "euler":
            a, b, sigma = torch.ones_like(t), -dt, torch.zeros_like(t)
        else:
            # sigma_t^2 = eta^2 2 t / (1 - t) is infinite at t = 1: the first step reads 1 - t at s
            variance_rate = eta**2 * 2 * t / (1 - torch.where(t == 1, s, t))
            a = 1 - dt * variance_rate / (2 * t)
            b = -dt * (1 + variance_rate * (1 - t) / (2 * t))
            sigma = (variance_rate * dt).sqrt()
        return a.float(), b.float(), sigma.float()

    @staticmethod
    def check_eta(sampler: str, eta: float) -> None:
        """The sde takes any finite eta >= 0."""
        if sampler == "sde" and not (0 <= eta and math.isfinite(eta)):
            raise UserError(f"--eta must be a finite number >= 0 for the sde sampler, got {eta}")

    @staticmethod
    def is_memoryless(sampler: str, eta: float) -> bool:
        """The sde with eta >= 1 (docs/design.md, section 10): eta = 1 is the memoryless schedule, and a larger
        eta forgets x_T faster still; Euler remembers x_T entirely, and an sde with eta < 1 in part."""
        return sampler == "sde" and eta >= 1

    @staticmethod
    def is_deterministic(sampler: str, eta: float) -> bool:
        """Euler, and the sde with eta = 0 (which is Euler)."""
        return sampler == "euler" or eta == 0

    def timesteps(self, sampler: str = "euler", sampling_steps: int | None = None) -> list[int]:
        """The decreasing timesteps k a chain visits before k = 0: K of them, evenly spaced in t (default all T)."""
        self.check_sampler(sampler)
        T = self.num_timesteps
        K = T if sampling_steps is None else sampling_steps
        if not 1 <= K <= T:
            raise UserError(f"--sampling-steps must be between 1 and {T}, got {K}")
        return [round(T * j / K) for j in range(K, 0, -1)]
