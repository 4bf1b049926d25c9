import numpy as np
import pytest

from pretrain.datasets import DATASETS_2D, data_spread, sample_2d
from rl_diffusion.errors import UserError


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
