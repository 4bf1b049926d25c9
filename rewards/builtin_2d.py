"""Built-in rewards for 2D points x0 of shape [B, 2], in the data's own units.

Each factory checks its arguments (ValueError) and returns a batched ``reward(x0, c)``; the
condition ``c`` is ignored. A reward raises ValueError when x0 is not [B, 2]. A reward that is
bounded above declares its bound as ``reward.max_value`` (see ``rewards.Reward.max_value``).
All of them are smooth torch functions of x0 (almost everywhere), so all are ``@differentiable``:
the region indicators are sigmoids of a signed distance, whose gradient is useful within a few
1 / sharpness of the boundary.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from pretrain.datasets import MIXTURES, Mixture
from rewards.base import RewardFn, differentiable, register

_SHAPES = ("box", "disc")


def _floats(arg: str, value: Any, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``value`` as a finite float64 tensor; shape None accepts any shape."""
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{arg} must be numbers, got {value!r}") from e
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{arg} must have shape {shape}, got {tuple(t.shape)} from {value!r}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{arg} must be finite, got {value!r}")
    return t


def _check_2d(x0: torch.Tensor) -> None:
    if x0.dim() != 2 or x0.shape[1] != 2:
        raise ValueError(f"this reward is for 2D points: x0 must have shape [B, 2], got {list(x0.shape)}")


def _bounded(reward: RewardFn, max_value: float) -> RewardFn:
    """``reward`` declaring ``max_value``, an upper bound of its score over every x0."""
    reward.max_value = float(max_value)  # type: ignore[attr-defined]
    return reward


@register("target_point")
@differentiable
def target_point(point: Sequence[float] = (0.0, 0.0)) -> RewardFn:
    """Negative Euclidean distance from x0 to a point (0 at the point, lower further away).

    Args:
        point: the target (x, y), in data units.
    """
    p = _floats("point", point, (2,))

    def reward(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        _check_2d(x0)
        return -torch.linalg.vector_norm(x0 - p.to(x0), dim=1)

    return _bounded(reward, 0.0)


def _inside_distance(shape: str, box: Sequence[float], center: Sequence[float], radius: float) -> RewardFn:
    """Signed distance to the region's boundary in data units: positive inside, 0 on it."""
    if shape == "box":
        b = _floats("box", box, (4,))
        if not (b[0] < b[2] and b[1] < b[3]):
            raise ValueError(f"box must be (xmin, ymin, xmax, ymax) with xmin < xmax and ymin < ymax, got {box!r}")
        mid, half = (b[:2] + b[2:]) / 2, (b[2:] - b[:2]) / 2

        def distance(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
            _check_2d(x0)
            # Per-axis excess over the half-width: exact distance outside, nearest edge inside.
            q = (x0 - mid.to(x0)).abs() - half.to(x0)
            outside = torch.linalg.vector_norm(q.clamp(min=0), dim=1)
            return -(outside + q.max(dim=1).values.clamp(max=0))

        return distance
    if shape == "disc":
        ctr = _floats("center", center, (2,))
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius!r}")

        def distance(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
            _check_2d(x0)
            return radius - torch.linalg.vector_norm(x0 - ctr.to(x0), dim=1)

        return distance
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(map(repr, _SHAPES))}")


def _smooth_indicator(
    sign: float, shape: str, box: Sequence[float], center: Sequence[float], radius: float, sharpness: float
) -> RewardFn:
    if not sharpness > 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness!r}")
    distance = _inside_distance(shape, box, center, radius)

    def reward(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # sigmoid(-z) rather than 1 - sigmoid(z) keeps small scores accurate.
        return torch.sigmoid(sign * sharpness * distance(x0))

    return _bounded(reward, 1.0)


@register("in_region")
@differentiable
def in_region(
    shape: str = "box",
    box: Sequence[float] = (-1.0, -1.0, 1.0, 1.0),
    center: Sequence[float] = (0.0, 0.0),
    radius: float = 1.0,
    sharpness: float = 10.0,
) -> RewardFn:
    """Smooth indicator in [0, 1] of being inside a box or a disc: 0.5 on the boundary.

    The score is sigmoid(sharpness * d) with d the signed distance to the boundary, positive
    inside, so it reaches 0.99 at 4.6 / sharpness (data units) inside the boundary.

    Args:
        shape: "box" or "disc".
        box: (xmin, ymin, xmax, ymax) in data units; used when shape is "box".
        center: disc center (x, y) in data units; used when shape is "disc".
        radius: disc radius in data units (> 0); used when shape is "disc".
        sharpness: steepness in 1 / data units (> 0); large values approach a hard 0/1 step,
            which gives no signal far from the boundary.
    """
    return _smooth_indicator(1.0, shape, box, center, radius, sharpness)


@register("avoid_region")
@differentiable
def avoid_region(
    shape: str = "box",
    box: Sequence[float] = (-1.0, -1.0, 1.0, 1.0),
    center: Sequence[float] = (0.0, 0.0),
    radius: float = 1.0,
    sharpness: float = 10.0,
) -> RewardFn:
    """Smooth indicator in [0, 1] of being outside a box or a disc: 1 - in_region.

    Args:
        shape: "box" or "disc".
        box: (xmin, ymin, xmax, ymax) in data units; used when shape is "box".
        center: disc center (x, y) in data units; used when shape is "disc".
        radius: disc radius in data units (> 0); used when shape is "disc".
        sharpness: steepness in 1 / data units (> 0); large values approach a hard 0/1 step,
            which gives no signal far from the boundary.
    """
    return _smooth_indicator(-1.0, shape, box, center, radius, sharpness)


@register("gmm_log_density")
@differentiable
def gmm_log_density(
    means: Sequence[Sequence[float]] = ((0.0, 0.0),),
    stds: Sequence[float] = (1.0,),
    weights: Sequence[float] | None = None,
) -> RewardFn:
    """Log density (nats) of x0 under a mixture of K isotropic 2D Gaussians.

    Unbounded below: far from every mean the reward falls like -distance^2 / (2 std^2). Bounded
    above by log sum_k w_k / (2 pi std_k^2), the log of the weighted sum of the component peaks.

    Args:
        means: K component means, a [K, 2] list, in data units.
        stds: K per-component standard deviations (> 0), in data units.
        weights: K non-negative mixture weights, normalised to sum to 1; None means equal weights.
    """
    mu = _floats("means", means)
    if mu.dim() != 2 or mu.shape[1] != 2 or mu.shape[0] == 0:
        raise ValueError(f"means must be a non-empty [K, 2] list, got shape {tuple(mu.shape)}")
    k = mu.shape[0]
    sd = _floats("stds", stds, (k,))
    if not (sd > 0).all():
        raise ValueError(f"stds must all be > 0, got {stds!r}")
    w = torch.ones(k, dtype=torch.float64) if weights is None else _floats("weights", weights, (k,))
    if (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights!r}")
    # Per-component constant: log w_k - D log std_k - (D / 2) log(2 pi), with D = 2.
    const = torch.log(w / w.sum()) - 2 * torch.log(sd) - math.log(2 * math.pi)

    def reward(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        _check_2d(x0)
        sq = ((x0[:, None, :] - mu.to(x0)) ** 2).sum(dim=2)  # [B, K]
        return torch.logsumexp(const.to(x0) - sq / (2 * sd.to(x0) ** 2), dim=1)

    return _bounded(reward, torch.logsumexp(const, dim=0).item())


@register("linear")
@differentiable
def linear(a: Sequence[float] = (0.0, 1.0)) -> RewardFn:
    """Linear score a . x0, unbounded: it tilts a Gaussian mixture into another one in closed form.

    Args:
        a: the direction (a_x, a_y), in reward units per data unit.
    """
    direction = _floats("a", a, (2,))

    def reward(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        _check_2d(x0)
        return x0 @ direction.to(x0)

    return reward


@register("gaussian_bump")
@differentiable
def gaussian_bump(center: Sequence[float] = (0.0, 0.0), width: float = 0.5, scale: float = 10.0) -> RewardFn:
    """Gaussian bump scale * exp(-||x0 - center||^2 / (2 width^2)): scale at the center, 0 far away.

    Args:
        center: the bump's center (x, y), in data units.
        width: the bump's standard deviation in data units (> 0).
        scale: the score at the center; a negative scale makes a dip.
    """
    ctr = _floats("center", center, (2,))
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")

    def reward(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        _check_2d(x0)
        return scale * torch.exp(-((x0 - ctr.to(x0)) ** 2).sum(dim=1) / (2 * width**2))

    return _bounded(reward, max(scale, 0.0))


# Relative Trajectory Balance's posterior modes on their grid {-10, -5, 0, 5, 10}^2, with weights / 61.
_POSTERIOR_MODES = {
    (-10, -5): 4,
    (-5, -10): 10,
    (-5, 0): 4,
    (10, -5): 5,
    (0, 0): 10,
    (0, 5): 5,
    (5, -5): 4,
    (5, 0): 15,
    (5, 10): 4,
}


def gmm25_posterior(modes: list | None = None) -> Mixture:
    """A posterior over the ``gmm25`` prior: some of its 25 components, reweighted.

    ``modes``: [[x, y, weight], ...] on the grid {-10, -5, 0, 5, 10}^2 of Venkatraman et al. (2024), scaled
    like the data by 1/5; None: their 9-mode posterior (weights 4, 10, 4, 5, 10, 5, 4, 15, 4 over 61).
    """
    weights = _POSTERIOR_MODES
    if modes is not None:
        try:
            weights = {(int(x), int(y)): float(w) for x, y, w in modes}
        except (TypeError, ValueError):
            raise ValueError(f"modes must be [[x, y, weight], ...], got {modes!r}") from None
        grid = {tuple((5 * m).round()) for m in MIXTURES["gmm25"].means}
        off = [point for point in weights if point not in grid]
        if off or not weights or min(weights.values()) <= 0:
            raise ValueError(
                f"modes must be points of the grid {{-10, -5, 0, 5, 10}}^2 with weights > 0, got {modes!r}"
            )
    means = MIXTURES["gmm25"].means
    return Mixture(means, MIXTURES["gmm25"].std, np.array([weights.get(tuple((5 * m).round()), 0) for m in means]))


GMM25_POSTERIOR = gmm25_posterior()
"""The 9-mode posterior of Venkatraman et al. (2024) over the ``gmm25`` prior, scaled like it by 1/5.

Written as a mixture over the prior's 25 components, 16 of them with weight 0.
"""


def _log_mixture(x0: torch.Tensor, mixture: Mixture) -> torch.Tensor:
    """log sum_k w_k exp(-||x0 - mu_k||^2 / (2 std^2)), float64 [B]: the log density up to a constant."""
    means, weights = (torch.tensor(a, device=x0.device) for a in (mixture.means, mixture.weights))
    sq = ((x0.to(torch.float64)[:, None, :] - means) ** 2).sum(dim=2)
    return torch.logsumexp(torch.log(weights) - sq / (2 * mixture.std**2), dim=1)


@register("gmm_posterior")
@differentiable
def gmm_posterior(modes: list | None = None) -> RewardFn:
    """log p_post(x0) - log p_prior(x0): the ``gmm25`` prior tilted at kl_coef 1 is the posterior.

    The prior is the ``gmm25`` data set; the posterior is ``gmm25_posterior(modes)``: by default
    ``GMM25_POSTERIOR``, 9 of its 25 components with weights (4, 10, 4, 5, 10, 5, 4, 15, 4) / 61
    (Venkatraman et al. 2024); ``modes`` [[x, y, weight], ...] on their grid {-10, -5, 0, 5, 10}^2 picks
    another. Both share one std, so their normalisers cancel; computed in float64 because far from
    the grid it is a difference of two large numbers. With v the posterior and w the prior
    weights of the same components, p_post <= max_k (v_k / w_k) p_prior, so the score is at
    most log max_k (v_k / w_k).
    """
    prior, posterior = MIXTURES["gmm25"], gmm25_posterior(modes)

    def reward(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        _check_2d(x0)
        return (_log_mixture(x0, posterior) - _log_mixture(x0, prior)).to(x0.dtype)

    return _bounded(reward, math.log(np.max(posterior.weights / prior.weights)))
