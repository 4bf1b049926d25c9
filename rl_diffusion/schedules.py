"""Noise schedules, each defined once in continuous time.

Every schedule is a function abar(t) on t in [0, 1] with abar(0) = 1 (the signal
fraction of q(x_t | x_0) = N(sqrt(abar) x_0, (1 - abar) I)). A discrete schedule
with T steps reads it at t = i / T:

    abar_i = abar(i / T),   beta_i = 1 - abar_i / abar_{i-1}   (clipped to 0.999)

so abar_T = abar(1) for every T: a schedule ends at (nearly) pure noise whether T
is 50 or 1000, and sampling from x_T ~ N(0, I) starts where training ended. (A
linear beta schedule with fixed endpoints does not: beta from 1e-4 to 0.02 over
50 steps ends at abar_T = 0.60.) The rates are the T = 1000 DDPM rates, so at
T = 1000 `linear` is beta from 1e-4 to 0.02 up to O(1/T^2).

All values are float64 numpy; the diffusion converts once.
"""

from __future__ import annotations

import math

import numpy as np

from rl_diffusion.errors import UserError, nearest

# DDPM's linear rates at T = 1000, per unit of continuous time.
_BETA_MIN, _BETA_MAX = 0.1, 20.0
MAX_BETA = 0.999


def _linear(t: np.ndarray) -> np.ndarray:
    # beta(s) = b0 + (b1 - b0) s  ->  log abar(t) = -(b0 t + (b1 - b0) t^2 / 2)
    return np.exp(-(_BETA_MIN * t + 0.5 * (_BETA_MAX - _BETA_MIN) * t**2))


def _quadratic(t: np.ndarray) -> np.ndarray:
    # beta(s) = (a + (b - a) s)^2 with a^2 = b0, b^2 = b1 (DDPM's "quad")
    a, b = math.sqrt(_BETA_MIN), math.sqrt(_BETA_MAX)
    return np.exp(-((a + (b - a) * t) ** 3 - a**3) / (3 * (b - a)))


def _cosine(t: np.ndarray, s: float = 0.008) -> np.ndarray:
    # Nichol & Dhariwal (2021), eq. 17
    f = lambda u: np.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0.0)


def _sigmoid(t: np.ndarray, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> np.ndarray:
    # Chen (2023), "On the importance of noise scheduling", Algorithm 1
    sig = lambda u: 1 / (1 + np.exp(-u))  # noqa: E731
    v_start, v_end = sig(start / tau), sig(end / tau)
    return (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)


SCHEDULES = {
    "linear": _linear,
    "quadratic": _quadratic,
    "cosine": _cosine,
    "sigmoid": _sigmoid,
}


def abar_continuous(name: str, t) -> np.ndarray:
    """abar(t) of schedule `name` at continuous time t in [0, 1] (float64)."""
    if name not in SCHEDULES:
        raise UserError(
            f"unknown beta schedule '{name}'{nearest(name, SCHEDULES)}; choose one of {', '.join(SCHEDULES)}"
        )
    t = np.asarray(t, dtype=np.float64)
    return np.clip(SCHEDULES[name](t), 0.0, 1.0)


def betas_for(name: str, num_timesteps: int) -> np.ndarray:
    """beta_1..beta_T of schedule `name` with T = num_timesteps steps, float64, shape [T]."""
    if num_timesteps < 2:
        raise UserError(f"--num-timesteps must be at least 2, got {num_timesteps}")
    abar = abar_continuous(name, np.arange(num_timesteps + 1) / num_timesteps)
    return np.clip(1.0 - abar[1:] / abar[:-1], 0.0, MAX_BETA)
