import numpy as np
import pytest
import torch

from pretrain.datasets import sample_2d
from rl_diffusion.metrics import (
    diversity,
    energy_distance,
    gaussian_fit,
    mmd_rbf,
    sample_quality,
    sliced_wasserstein2,
)


def _normal(n: int, seed: int, mean: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=generator) + torch.tensor(mean)


def test_sw2_of_a_set_with_itself_is_zero() -> None:
    x = _normal(500, seed=0)
    assert sliced_wasserstein2(x, x) == 0.0


def test_sw2_of_shifted_gaussians_matches_closed_form() -> None:
    # Projected W2^2 = (m . theta)^2; its mean over uniform 2D directions is |m|^2 / 2.
    x, y = _normal(10_000, seed=0), _normal(10_000, seed=1, mean=(1.2, -1.6))
    assert sliced_wasserstein2(x, y) == pytest.approx(2.0 / np.sqrt(2), rel=0.03)


def test_sw2_is_permutation_invariant_and_handles_unequal_sizes() -> None:
    x, y = _normal(300, seed=0), _normal(700, seed=1, mean=(1.0, 0.0))
    assert sliced_wasserstein2(x[torch.randperm(300)], y) == pytest.approx(sliced_wasserstein2(x, y), rel=1e-12)
    # Each point repeated k times is the same empirical distribution.
    assert sliced_wasserstein2(x.repeat(3, 1), y) == pytest.approx(sliced_wasserstein2(x, y), rel=1e-12)
    # Point masses at 0 (N = 3) and at distance 2 (M = 5): every projection moves mass |2 cos theta|.
    masses = sliced_wasserstein2(torch.zeros(3, 2), torch.tensor([[2.0, 0.0]]).repeat(5, 1), num_projections=4000)
    assert masses == pytest.approx(2.0 / np.sqrt(2), rel=0.03)


def test_mmd_separates_distributions() -> None:
    same = mmd_rbf(_normal(1000, seed=0), _normal(1000, seed=1))
    different = mmd_rbf(_normal(1000, seed=0), _normal(1000, seed=1, mean=(1.0, 0.0)))
    assert abs(same) < 0.01
    assert different > 0.3
    assert different > 50 * abs(same)


def test_energy_distance_and_diversity_of_point_masses() -> None:
    a = 1.5
    x, y = torch.zeros(10, 2), torch.tensor([[a, 0.0]]).repeat(7, 1)
    assert energy_distance(x, y) == pytest.approx(2 * a, abs=1e-6)
    assert diversity(torch.tensor([[0.0, 0.0], [0.0, a]])) == pytest.approx(a)
    # Three corners of a unit square: pairwise distances 1, 1, sqrt(2).
    assert diversity(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])) == pytest.approx((2 + np.sqrt(2)) / 3)


def test_sample_quality_floors_beat_gaussian_fit_on_a_ring() -> None:
    data, data_again = sample_2d("circle", 2000, seed=0), sample_2d("circle", 2000, seed=1)
    quality = sample_quality(gaussian_fit(data, 2000, seed=2), data, torch.from_numpy(data_again))
    for name in ("sw2", "mmd", "energy"):
        assert quality[f"{name}_floor"] < quality[name] / 3, name
    assert quality["spread"] == pytest.approx(3 / np.sqrt(2), rel=0.03)
    assert quality["sw2_over_spread"] == pytest.approx(quality["sw2"] / quality["spread"])
    assert quality["sw2_floor_over_spread"] < 0.05


def test_gaussian_fit_matches_first_two_moments() -> None:
    data = np.random.default_rng(0).normal([1.0, -2.0], [0.5, 3.0], size=(5000, 2))
    fit = gaussian_fit(data, 50_000, seed=0)
    assert fit.shape == (50_000, 2) and fit.dtype == np.float32
    np.testing.assert_allclose(fit.mean(axis=0), data.mean(axis=0), atol=0.03)
    np.testing.assert_allclose(np.cov(fit, rowvar=False), np.cov(data, rowvar=False), rtol=0.03, atol=0.03)
