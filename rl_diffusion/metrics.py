"""Sample-quality metrics between point sets, in float64, batched over samples.

Inputs are numpy arrays or tensors [N, d] (trailing axes are flattened, so image
batches work too); every function returns a Python float in data units.
Pairwise metrics (MMD, energy distance, diversity) cost O(N^2) memory, so they
use at most ``MAX_PAIRWISE_POINTS`` points per set, chosen by a fixed-seed
generator: the same inputs always give the same number.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

Points = Tensor | np.ndarray
Kernel = Callable[[Tensor], Tensor]

MAX_PAIRWISE_POINTS = 2000
STATISTICS = ("u", "v")  # pairwise means without self-pairs (unbiased) or with them (biased, >= 0 for MMD)


def _as_points(a: Points) -> Tensor:
    """numpy or torch [N, ...] -> float64 tensor [N, d], detached, on the input's device."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        a = a.copy()  # torch warns on wrapping a read-only array
    a = torch.as_tensor(a).detach().to(torch.float64)
    return a.reshape(len(a), -1)


def sliced_wasserstein2(x: Points, y: Points, num_projections: int = 500, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between x [N, d] and y [M, d], in data units.

    Projects both sets on ``num_projections`` random unit directions drawn from a
    generator seeded with ``seed`` (the same directions on every call, so numbers
    are comparable across runs) and returns sqrt(mean over directions of W2^2).
    W2 between two 1-D empirical distributions is the integral over u in (0, 1)
    of (Q_x(u) - Q_y(u))^2 with step quantile functions; it is integrated exactly
    on the union of their breakpoints i/N and j/M, so N != M costs no accuracy.
    Memory: about 3 * (N + M) * num_projections float64 values.
    """
    x = _as_points(x)
    y = _as_points(y).to(x.device)
    n, m = len(x), len(y)
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0)).to(x.device)
    x_sorted = (x @ theta).sort(dim=0).values
    y_sorted = (y @ theta).sort(dim=0).values
    # Breakpoints i/N and j/M as integers over the common denominator N*M, so that
    # the index of each interval's quantile is exact integer arithmetic.
    breaks = torch.cat([torch.arange(n + 1, device=x.device) * m, torch.arange(m + 1, device=x.device) * n]).unique()
    twice_midpoints = breaks[:-1] + breaks[1:]
    widths = breaks.diff().to(torch.float64) / (n * m)
    gaps = x_sorted[twice_midpoints // (2 * m)] - y_sorted[twice_midpoints // (2 * n)]
    w2_squared = (widths[:, None] * gaps.square()).sum(dim=0)
    return math.sqrt(w2_squared.mean().item())


def _subsample(a: Tensor, generator: torch.Generator, max_points: int = MAX_PAIRWISE_POINTS) -> Tensor:
    """At most max_points rows of a, drawn without replacement."""
    if len(a) <= max_points:
        return a
    return a[torch.randperm(len(a), generator=generator)[:max_points].to(a.device)]


def _mean_within(a: Tensor, kernel: Kernel, statistic: str = "u") -> float:
    """Mean of kernel(||a_i - a_j||) over pairs i != j ("u") or over all pairs i, j ("v")."""
    n = len(a)
    if n < 2:
        raise ValueError(f"a pairwise metric needs at least 2 points, got {n}")
    k = kernel(torch.cdist(a, a))
    if statistic == "v":
        return k.mean().item()
    return ((k.sum() - k.diagonal().sum()) / (n * (n - 1))).item()


def _two_sample(x: Points, y: Points, kernel: Kernel, statistic: str = "u") -> float:
    """E k(X, X') + E k(Y, Y') - 2 E k(X, Y), as a U- or V-statistic, on subsamples of each set."""
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; expected one of {', '.join(map(repr, STATISTICS))}")
    generator = torch.Generator().manual_seed(0)
    x = _subsample(_as_points(x), generator)
    y = _subsample(_as_points(y).to(x.device), generator)
    between = kernel(torch.cdist(x, y)).mean().item()
    return _mean_within(x, kernel, statistic) + _mean_within(y, kernel, statistic) - 2 * between


def mmd_rbf(
    x: Points, y: Points, bandwidths: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0), statistic: str = "u"
) -> float:
    """Squared MMD between x [N, d] and y [M, d] with a sum of RBF kernels.

    k(a, b) = sum_h exp(-||a - b||^2 / (2 h^2)), bandwidths h in data units (the
    defaults suit data with spread 1-2). ``statistic`` "u" is the unbiased
    U-statistic: self-pairs are excluded, so two draws of one distribution give
    values scattered around 0, negative ones included. "v" is the biased
    V-statistic, the squared MMD between the two empirical distributions: self-pairs
    included, always >= 0, so two independent draws give a positive floor to
    compare a distance with. Uses at most MAX_PAIRWISE_POINTS points per set.
    """

    def kernel(distance: Tensor) -> Tensor:
        squared = distance.square()
        return sum(torch.exp(-squared / (2 * h * h)) for h in bandwidths)

    return _two_sample(x, y, kernel, statistic)


def energy_distance(x: Points, y: Points) -> float:
    """Energy distance 2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| in data units.

    U-statistics (self-pairs excluded); at most MAX_PAIRWISE_POINTS points per set.
    It is the two-sample statistic of the kernel k(a, b) = -||a - b||.
    """
    return _two_sample(x, y, torch.negative)


def entropy(shares: Points) -> float:
    """Entropy (nats) of a distribution given as shares [K] summing to 1; 0 log 0 = 0."""
    shares = torch.as_tensor(shares, dtype=torch.float64)
    positive = shares[shares > 0]
    return -(positive * positive.log()).sum().item()


def diversity(x: Points) -> float:
    """Mean Euclidean distance between distinct points of x [N, d] (self-pairs excluded).

    Uses at most MAX_PAIRWISE_POINTS points, like the other pairwise metrics.
    """
    return _mean_within(_subsample(_as_points(x), torch.Generator().manual_seed(0)), lambda distance: distance)


def within_class_diversity(x: Points, labels: Tensor, reference: Points, reference_labels: Tensor) -> float:
    """How much of the reference's variety each class of x keeps: over the labels that both x and the reference
    give to at least 2 points, the mean pairwise distance of x's points of that label over the reference's,
    averaged with weights the labels' shares of x. 1 when every class is as varied as the reference's, towards 0
    as a class collapses onto a few shapes; nan when no label qualifies. A class reward that turns every sample
    into one digit lowers `diversity` by design, but should not lower this."""
    x = _as_points(x)
    reference = _as_points(reference).to(x.device)
    labels, reference_labels = labels.to(x.device), reference_labels.to(x.device)
    ratios, counts = [], []
    for label in labels.unique():
        ours, theirs = x[labels == label], reference[reference_labels == label]
        if len(ours) >= 2 and len(theirs) >= 2:
            ratios.append(diversity(ours) / diversity(theirs))
            counts.append(len(ours))
    if not counts:
        return math.nan
    return sum(r * n for r, n in zip(ratios, counts, strict=True)) / sum(counts)


VENDI_MAX_POINTS = 1000  # the score eigendecomposes an n x n matrix, O(n^3): about 0.1 s at 1,000 points
# Below the spacing of the gmm25 (1) and 8gaussians (1.53) modes, above their stds (0.11, 0.2):
# on those data sets the score counts occupied modes.
VENDI_BANDWIDTH = 0.3


def vendi_score(x: Points, bandwidth: float = VENDI_BANDWIDTH) -> float:
    """Vendi score of x [N, d] (Friedman & Dieng 2023): the effective number of distinct samples.

    exp(-sum_i lambda_i log lambda_i), lambda_i the eigenvalues of K / n, with the RBF kernel
    K_ab = exp(-||a - b||^2 / (2 h^2)), h = ``bandwidth`` in data units. K has a unit diagonal,
    so the lambda_i sum to 1 and the score lies in [1, n]: 1 when every point is within << h of
    the others, k for k equal clusters each << h wide and >> h apart. Uses at most
    VENDI_MAX_POINTS points, chosen by a fixed-seed generator.
    """
    x = _subsample(_as_points(x), torch.Generator().manual_seed(0), VENDI_MAX_POINTS)
    kernel = torch.exp(-torch.cdist(x, x).square() / (2 * bandwidth**2))
    eigenvalues = torch.linalg.eigvalsh(kernel / len(x))
    positive = eigenvalues[eigenvalues > 0]  # 0 log 0 = 0; round-off leaves tiny negative ones
    return math.exp(-(positive * positive.log()).sum().item())


def mode_masses(samples: Points, means: Points, radius: float) -> tuple[np.ndarray, float]:
    """Mass of samples [N, 2] at each mode of means [M, 2], and the mass outside all modes.

    A sample counts for its nearest mode when it lies within ``radius`` (data units)
    of it. Returns the per-mode fractions of samples, float64 [M], and the fraction
    of samples within ``radius`` of no mode; together they sum to 1.
    """
    x, mu = _as_points(samples), _as_points(means)
    distance = torch.cdist(x, mu.to(x.device))  # [N, M]
    nearest_distance, nearest = distance.min(dim=1)
    inside = nearest_distance <= radius
    counts = torch.bincount(nearest[inside], minlength=len(mu)).cpu().numpy()
    return counts / len(x), 1.0 - inside.double().mean().item()


def mode_mass_l1(masses: np.ndarray, target_masses: np.ndarray) -> float:
    """sum_k |masses_k - target_masses_k|: the per-mode mass error, between 0 and 2."""
    return float(np.abs(np.asarray(masses) - np.asarray(target_masses)).sum())


def far_fraction(samples: Points, radius: float) -> float:
    """Fraction of samples [N, d] farther than ``radius`` (data units) from the origin."""
    return (_as_points(samples).norm(dim=1) > radius).double().mean().item()


def data_spread(x: np.ndarray) -> float:
    """sigma = sqrt(mean over axes of the per-axis variance) of points [N, d].

    The scale to divide SW2 by: a distance in data units over the data's own
    standard deviation. Accepts numpy arrays or CPU tensors.
    """
    return float(np.sqrt(np.asarray(x, dtype=np.float64).var(axis=0).mean()))


def sample_quality(samples: Points, data: Points, data_again: Points) -> dict[str, float]:
    """SW2, MMD^2 and energy distance of samples to data, each with its floor.

    The floor is the same metric between ``data_again`` (an independent draw of the
    same data set, ideally as many points as ``samples``) and ``data``: what a
    perfect sampler scores at this sample size. ``spread`` is ``data_spread(data)``;
    the ``*_over_spread`` entries express SW2 in units of the data's spread.
    """
    metrics: dict[str, Callable[[Points, Points], float]] = {
        "sw2": sliced_wasserstein2,
        "mmd": mmd_rbf,
        "energy": energy_distance,
    }
    quality: dict[str, float] = {}
    for name, metric in metrics.items():
        quality[name] = metric(samples, data)
        quality[f"{name}_floor"] = metric(data_again, data)
    quality["spread"] = data_spread(_as_points(data).cpu())
    quality["sw2_over_spread"] = quality["sw2"] / quality["spread"]
    quality["sw2_floor_over_spread"] = quality["sw2_floor"] / quality["spread"]
    return quality


def quality_metrics(samples: np.ndarray, reference: np.ndarray, again: np.ndarray) -> dict:
    """Sliced W2, MMD, energy distance with floors; for grey images also Frechet distance and KID on
    digit-classifier features."""
    metrics = sample_quality(samples, reference, again)
    if samples.ndim == 4 and samples.shape[1] == 1:
        from rl_diffusion.image_metrics import image_quality
        from rl_diffusion.models.digit_classifier import load_digit_classifier

        metrics.update(image_quality(samples, reference, again, load_digit_classifier()))
    return metrics


def gaussian_fit(data: Points, num_samples: int, seed: int) -> np.ndarray:
    """float32 [num_samples, d] drawn from the Gaussian with data's mean and covariance.

    The baseline a generative model must beat: it matches the first two moments
    and nothing else.
    """
    points = _as_points(data).cpu().numpy()
    covariance = np.atleast_2d(np.cov(points, rowvar=False))
    rng = np.random.default_rng(seed)
    return rng.multivariate_normal(points.mean(axis=0), covariance, size=num_samples).astype(np.float32)
