import numpy as np
import pytest
import torch

from pretrain.datasets import sample_2d
from rl_diffusion.metrics import (
    diversity,
    energy_distance,
    far_fraction,
    gaussian_fit,
    mmd_rbf,
    mode_mass_l1,
    mode_masses,
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
    assert quality["sw2_floor_over_spread"] < 0.05


def test_sample_quality_in_units_of_the_spread_by_hand() -> None:
    # Data: the four points (+-1, 0), (0, +-1), so per-axis variance 1/2 and spread sqrt(1/2).
    # A set scaled by k about the origin keeps the order of every projection, so its W2^2 along a
    # unit theta is (k - 1)^2 mean_i (p_i . theta)^2 = (k - 1)^2 / 2 for every theta, exactly.
    data = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    quality = sample_quality(3 * data, data, 0.5 * data)
    assert quality["spread"] == pytest.approx(np.sqrt(0.5), rel=1e-12)
    assert quality["sw2"] == pytest.approx(np.sqrt(2.0), rel=1e-9)  # k = 3: sqrt(4 / 2)
    assert quality["sw2_floor"] == pytest.approx(np.sqrt(0.125), rel=1e-9)  # k = 1/2: sqrt(1/4 / 2)
    assert quality["sw2_over_spread"] == pytest.approx(2.0, rel=1e-9)
    assert quality["sw2_floor_over_spread"] == pytest.approx(0.5, rel=1e-9)


def test_gaussian_fit_matches_first_two_moments() -> None:
    data = np.random.default_rng(0).normal([1.0, -2.0], [0.5, 3.0], size=(5000, 2))
    fit = gaussian_fit(data, 50_000, seed=0)
    assert fit.shape == (50_000, 2) and fit.dtype == np.float32
    np.testing.assert_allclose(fit.mean(axis=0), data.mean(axis=0), atol=0.03)
    np.testing.assert_allclose(np.cov(fit, rowvar=False), np.cov(data, rowvar=False), rtol=0.03, atol=0.03)


# V-statistic MMD, mode masses, far fraction.


def test_mmd_v_statistic_hand_computed() -> None:
    d = 0.7
    k0, kd = 1.0, np.exp(-(d**2) / 2)  # one bandwidth h = 1
    pair = torch.tensor([[0.0, 0.0], [d, 0.0]], dtype=torch.float64)
    # Identical sets: V = (2 k0 + 2 kd) / 4 * 2 - 2 (2 k0 + 2 kd) / 4 = 0; U drops the self-pairs: kd - k0 < 0.
    assert mmd_rbf(pair, pair, bandwidths=(1.0,), statistic="v") == pytest.approx(0.0, abs=1e-12)
    assert mmd_rbf(pair, pair, bandwidths=(1.0,), statistic="u") == pytest.approx(kd - k0, abs=1e-12)
    # Two points at 0 against two at distance a: V = 2 sum_h (1 - exp(-a^2 / (2 h^2))).
    zeros, far = torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    expected = 2 * sum(1 - np.exp(-1 / (2 * h * h)) for h in (0.5, 2.0))
    assert mmd_rbf(zeros, far, bandwidths=(0.5, 2.0), statistic="v") == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="unknown statistic 'w'"):
        mmd_rbf(zeros, far, statistic="w")


def test_mmd_v_statistic_floor_matches_its_expectation() -> None:
    # Two draws of N(0, I) in 2D, h = 1: E V = (k(0) - E k(X, X')) (1/n + 1/m), with
    # E exp(-|X - X'|^2 / 2) = 1/3 since X - X' ~ N(0, 2 I); so 2/3 * 2/500 here. One draw
    # scatters by about 50%, so the mean of 40 by about 8%.
    floors = [
        mmd_rbf(_normal(500, seed=2 * i), _normal(500, seed=2 * i + 1), bandwidths=(1.0,), statistic="v")
        for i in range(40)
    ]
    assert min(floors) > 0
    assert np.mean(floors) == pytest.approx(2 / 3 * 2 / 500, rel=0.25)


def test_mode_masses_nearest_mode_within_radius() -> None:
    means = np.array([[0.0, 0.0], [1.0, 0.0]])
    samples = np.array([[0.1, 0.0], [0.9, 0.0], [0.5, 0.0], [0.0, 0.29], [5.0, 5.0]])
    masses, outside = mode_masses(samples, means, radius=0.3)
    np.testing.assert_allclose(masses, [0.4, 0.2])
    assert outside == pytest.approx(0.4)
    # Overlapping discs: (0.45, 0) lies within 0.6 of both modes and counts once, for the nearer one.
    masses, outside = mode_masses(np.array([[0.45, 0.0]]), means, radius=0.6)
    assert masses.tolist() == [1.0, 0.0] and outside == 0.0
    assert mode_mass_l1(np.array([0.5, 0.5]), np.array([0.25, 0.75])) == pytest.approx(0.5)


def test_far_fraction_counts_points_strictly_beyond_the_radius() -> None:
    points = np.array([[1.0, 0.0], [0.0, -2.0], [3.0, 0.0], [0.0, 4.0]])
    assert far_fraction(points, 2.5) == 0.5
    assert far_fraction(points, 2.0) == 0.5
    assert far_fraction(torch.from_numpy(points), 0.5) == 1.0
