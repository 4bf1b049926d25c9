import numpy as np
import pytest

from pretrain.datasets import DATASETS_2D, MIXTURES, Mixture, sample_2d
from rl_diffusion.errors import UserError
from rl_diffusion.metrics import data_spread


@pytest.mark.parametrize("name", list(DATASETS_2D))
def test_shape_dtype_seeding_and_spread(name: str) -> None:
    points = sample_2d(name, 1000, seed=0)
    assert points.shape == (1000, 2) and points.dtype == np.float32
    np.testing.assert_array_equal(points, sample_2d(name, 1000, seed=0))
    assert not np.array_equal(points, sample_2d(name, 1000, seed=1))
    assert 0.7 < data_spread(points) < 2.2
    assert sample_2d(name, 1, seed=0).shape == (1, 2)


def test_dino_matches_scaled_csv() -> None:
    points = sample_2d("dino", 20_000, seed=0)
    # Raw CSV statistics: mean (54.26327324, 47.83225282), x in [22.3077, 98.2051], y in [2.9487, 99.4872].
    np.testing.assert_allclose(points.mean(axis=0), [(54.26327324 / 54 - 1) * 4, (47.83225282 / 48 - 1) * 4], atol=0.04)
    # Jitter is 0.15 raw units: 0.011 in x', 0.0125 in y' after scaling.
    np.testing.assert_allclose(points.min(axis=0), [(22.3077 / 54 - 1) * 4, (2.9487 / 48 - 1) * 4], atol=0.06)
    np.testing.assert_allclose(points.max(axis=0), [(98.2051 / 54 - 1) * 4, (99.4872 / 48 - 1) * 4], atol=0.06)


def test_circle_radius_and_checkerboard_squares() -> None:
    radius = np.linalg.norm(sample_2d("circle", 20_000, seed=0), axis=1)
    assert radius.mean() == pytest.approx(3.0, abs=0.005)
    assert radius.std() == pytest.approx(0.09, rel=0.05)
    board = sample_2d("checkerboard", 20_000, seed=0)
    assert np.all((np.floor(board[:, 0]) + np.floor(board[:, 1])) % 2 == 0)
    assert np.all(np.abs(board) <= 2)


def test_unknown_name_suggests_nearest() -> None:
    with pytest.raises(UserError, match="did you mean 'dino'.*available: dino, moons"):
        sample_2d("dinoo", 10, seed=0)
    with pytest.raises(UserError, match="at least 1"):
        sample_2d("dino", 0, seed=0)


def test_data_spread_of_diagonal_gaussian() -> None:
    points = np.random.default_rng(0).normal(0.0, [2.0, 1.0], size=(200_000, 2))
    assert data_spread(points) == pytest.approx(np.sqrt(2.5), rel=0.01)


def test_gmm25_grid_masses_and_std() -> None:
    points = sample_2d("gmm25", 50_000, seed=0).astype(np.float64)
    means = MIXTURES["gmm25"].means
    nearest = np.linalg.norm(points[:, None] - means, axis=2).argmin(axis=1)
    # 25 equal masses: binomial sd sqrt(0.04 * 0.96 / 50,000) = 0.0009.
    np.testing.assert_allclose(np.bincount(nearest, minlength=25) / len(points), 0.04, atol=0.004)
    residual = points - means[nearest]
    np.testing.assert_allclose(residual.std(axis=0), np.sqrt(0.3) / 5, rtol=0.02)
    assert sorted(set(means.ravel())) == [-2.0, -1.0, 0.0, 1.0, 2.0] and len(np.unique(means, axis=0)) == 25


def test_eight_gaussians_is_its_mixture_definition() -> None:
    mixture = MIXTURES["8gaussians"]
    np.testing.assert_allclose(np.linalg.norm(mixture.means, axis=1), 2.0)
    angles = np.arctan2(mixture.means[:, 1], mixture.means[:, 0]) % (2 * np.pi)
    np.testing.assert_allclose(angles, np.arange(8) * np.pi / 4, atol=1e-12)
    assert mixture.std == 0.2 and mixture.weights.tolist() == [1 / 8] * 8
    # The data set is the mixture's own sampler.
    np.testing.assert_array_equal(
        sample_2d("8gaussians", 100, seed=3), mixture.sample(np.random.default_rng(3), 100).astype(np.float32)
    )


def test_mixture_normalises_weights_and_is_read_only() -> None:
    mixture = Mixture(np.zeros((2, 2)), 1.0, np.array([1.0, 3.0]))
    assert mixture.weights.tolist() == [0.25, 0.75]
    with pytest.raises(ValueError, match="read-only"):
        MIXTURES["gmm25"].means[0, 0] = 5.0
