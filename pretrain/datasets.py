"""2D point-set data sets, drawn fresh from a seeded numpy generator.

Every set lives in coordinates with a spread (``rl_diffusion.metrics.data_spread``)
between about 0.8 and 2.1; the model trains directly in these coordinates, so no
normalisation happens elsewhere. Each description in ``DATASETS_2D`` states its coordinates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rl_diffusion.errors import UserError, nearest

Sampler = Callable[[np.random.Generator, int], np.ndarray]

DINO_CSV = Path(__file__).with_name("datasaurus_dino.csv")

DATASETS_2D: dict[str, str] = {}
"""Name -> one-line description with its coordinates (for ``rl-diffusion datasets``)."""

_SAMPLERS: dict[str, Sampler] = {}


@dataclass(frozen=True)
class Mixture:
    """A mixture of isotropic 2D Gaussians sum_k weights_k N(means_k, std^2 I), in data units."""

    means: np.ndarray  # [K, 2] float64
    std: float  # per-axis standard deviation of every component
    weights: np.ndarray  # [K] float64, normalised to sum to 1 on construction

    def __post_init__(self) -> None:
        means = np.array(self.means, dtype=np.float64)
        weights = np.array(self.weights, dtype=np.float64)
        weights /= weights.sum()
        # Shared by every caller: nobody may change a data set's definition in place.
        means.setflags(write=False)
        weights.setflags(write=False)
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "weights", weights)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n points of the mixture, float64 [n, 2]: a component by weight, then its Gaussian."""
        component = rng.choice(len(self.weights), size=n, p=self.weights)
        return self.means[component] + rng.normal(0.0, self.std, size=(n, 2))


_EIGHT_ANGLES = np.arange(8) * (np.pi / 4)
_GRID = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])

MIXTURES: dict[str, Mixture] = {
    "8gaussians": Mixture(2.0 * np.stack([np.cos(_EIGHT_ANGLES), np.sin(_EIGHT_ANGLES)], axis=1), 0.2, np.ones(8)),
    "gmm25": Mixture(
        np.stack(np.meshgrid(_GRID, _GRID, indexing="ij"), axis=-1).reshape(-1, 2), np.sqrt(0.3) / 5, np.ones(25)
    ),
}
"""The data sets that are Gaussian mixtures, by name: their samplers draw from these definitions."""


def _dataset(name: str, description: str) -> Callable[[Sampler], Sampler]:
    """Register a sampler ``(rng, n) -> float array [n, 2]`` under ``name``."""

    def register(sampler: Sampler) -> Sampler:
        DATASETS_2D[name] = description
        _SAMPLERS[name] = sampler
        return sampler

    return register


@functools.lru_cache(maxsize=1)
def load_dino() -> np.ndarray:
    """The 142 Datasaurus dino points in raw units, float64 [142, 2], read-only (cached)."""
    points = np.loadtxt(DINO_CSV, delimiter=",", skiprows=2)  # attribution line, header
    # The cache hands out one shared array: a caller must not be able to change it.
    points.setflags(write=False)
    return points


@_dataset(
    "dino",
    "Datasaurus dino, 142 points resampled with N(0, 0.15^2) jitter (raw units); "
    "x' = (x/54 - 1)*4 in [-2.4, 3.3], y' = (y/48 - 1)*4 in [-3.8, 4.3], spread 1.8",
)
def _dino(rng: np.random.Generator, n: int) -> np.ndarray:
    raw = load_dino()[rng.integers(len(load_dino()), size=n)] + rng.normal(0.0, 0.15, size=(n, 2))
    # The customary scaling, so figures compare with other implementations.
    return np.stack([(raw[:, 0] / 54 - 1) * 4, (raw[:, 1] / 48 - 1) * 4], axis=1)


@_dataset(
    "moons",
    "two interleaved half circles (as sklearn make_moons, noise 0.03); "
    "x' = (x + 0.3)*2 - 1 in [-2.4, 3.6], y' = (y + 0.3)*3 - 1 in [-1.6, 2.9], spread 1.6",
)
def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    # sklearn spaces the angles evenly and splits n in half; i.i.d. draws
    # (random moon, uniform angle) are the same distribution as a proper sample.
    angle = rng.uniform(0.0, np.pi, size=n)
    lower = rng.random(n) < 0.5
    x = np.where(lower, 1 - np.cos(angle), np.cos(angle))
    y = np.where(lower, 0.5 - np.sin(angle), np.sin(angle))
    points = np.stack([x, y], axis=1) + rng.normal(0.0, 0.03, size=(n, 2))
    return np.stack([(points[:, 0] + 0.3) * 2 - 1, (points[:, 1] + 0.3) * 3 - 1], axis=1)


@_dataset("circle", "circle of radius 3 centred at 0, uniform angle, radial jitter std 0.09; spread 2.1")
def _circle(rng: np.random.Generator, n: int) -> np.ndarray:
    angle = rng.uniform(0.0, 2 * np.pi, size=n)
    radius = 3.0 + rng.normal(0.0, 0.09, size=n)
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


@_dataset("line", "thin horizontal segment: x uniform in [-2, 2], y uniform in [-0.1, 0.1]; spread 0.82")
def _line(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.stack([rng.uniform(-2.0, 2.0, size=n), rng.uniform(-0.1, 0.1, size=n)], axis=1)


@_dataset(
    "swissroll",
    "2D swiss roll (t cos t, t sin t)/4 with t = 1.5*pi*(1 + 2u), u ~ U[0, 1], "
    "plus N(0, 0.1^2); radius 1.2 to 3.5, arms 1.57 apart, spread 1.7",
)
def _swissroll(rng: np.random.Generator, n: int) -> np.ndarray:
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    return np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 4 + rng.normal(0.0, 0.1, size=(n, 2))


_dataset("8gaussians", "8 Gaussians with std 0.2 centred on a circle of radius 2 at angles k*pi/4; spread 1.4")(
    MIXTURES["8gaussians"].sample
)
_dataset(
    "gmm25",
    "5 x 5 grid of equal-weight Gaussians at {-2, -1, 0, 1, 2}^2 with std sqrt(0.3)/5 = 0.110: the 2D benchmark "
    "of Relative Trajectory Balance (Venkatraman et al. 2024; grid {-10, -5, 0, 5, 10}, std sqrt(0.3)) "
    "scaled by 1/5; spread 1.42",
)(MIXTURES["gmm25"].sample)


@_dataset(
    "checkerboard",
    "FFJORD checkerboard: uniform on the 8 unit squares of [-2, 2]^2 where floor(x) + floor(y) is even; spread 1.15",
)
def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.uniform(-2.0, 2.0, size=n)
    # A column of the board holds two squares; shift them up one row in odd columns.
    y = rng.random(n) - 2 * rng.integers(2, size=n) + np.floor(x) % 2
    return np.stack([x, y], axis=1)


def sample_2d(name: str, num_samples: int, seed: int | np.random.Generator) -> np.ndarray:
    """Draw ``num_samples`` points of data set ``name``: float32 [num_samples, 2].

    An int seed draws fresh from ``np.random.default_rng(seed)``: the same seed gives
    the same points, so use a different seed for an independent draw. A Generator is
    drawn from and advanced, for a stream of independent batches.
    """
    if name not in _SAMPLERS:
        raise UserError(f"unknown data set '{name}'{nearest(name, DATASETS_2D)}; available: {', '.join(DATASETS_2D)}")
    if num_samples < 1:
        raise UserError(f"num_samples must be at least 1, got {num_samples}")
    return _SAMPLERS[name](np.random.default_rng(seed), num_samples).astype(np.float32)
