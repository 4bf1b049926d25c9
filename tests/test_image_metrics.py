"""Frechet distance and KID against closed forms; image_quality floors and label coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_diffusion.image_metrics import frechet_distance, image_quality, kernel_inception_distance
from rl_diffusion.models.digit_classifier import split_digits, train_digit_classifier


def _gaussian(n: int, dim: int, seed: int, mean: float | np.ndarray = 0.0, std: float | np.ndarray = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)) * std + mean


def test_frechet_distance_of_identical_sets_is_zero() -> None:
    a = _gaussian(500, 6, seed=0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # A shift moves only the mean term, exactly.
    assert frechet_distance(a, a + 0.5) == pytest.approx(6 * 0.25, rel=1e-9)


def test_frechet_distance_matches_gaussian_closed_forms() -> None:
    dim, n = 4, 40_000
    m = np.array([1.0, -2.0, 0.5, 0.0])
    # N(0, I) vs N(m, I): |m|^2 = 5.25, plus sampling noise of order dim / n.
    fd = frechet_distance(_gaussian(n, dim, seed=0), _gaussian(n, dim, seed=1, mean=m))
    assert fd == pytest.approx(5.25, abs=0.02)
    # Diagonal covariances: sum (s_a - s_b)^2 over the standard deviations.
    s_a, s_b = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    fd = frechet_distance(_gaussian(n, dim, seed=2, std=s_a), _gaussian(n, dim, seed=3, std=s_b))
    assert fd == pytest.approx(np.square(s_a - s_b).sum(), abs=0.05)  # 6.0
    # Torch input, correlated covariance, and the order of arguments does not matter.
    a = torch.from_numpy(_gaussian(2000, dim, seed=4) @ np.triu(np.ones((dim, dim))))
    b = torch.from_numpy(_gaussian(2000, dim, seed=5))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    a, b = _gaussian(1000, 8, seed=0), _gaussian(1000, 8, seed=1)
    same = kernel_inception_distance(a, b, subsets=20, subset_size=500)
    shifted = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=500)
    assert abs(same) < 0.005
    # x ~ N(0, I), y ~ N(mu 1, I) in d dimensions, q = mu^2: summing the cumulants of the x_i y_i
    # gives MMD^2 = (1 + q)^3 - 1 + (3q + 6q^2) / d + 6q / d^2 for this kernel, 143/128 at d = 8,
    # mu = 0.5. The estimate carries about 5% sampling noise at 1000 points.
    assert shifted == pytest.approx(143 / 128, rel=0.15)
    # Seeded subsets: the same inputs give the same number.
    assert kernel_inception_distance(a, b, subsets=20, subset_size=500) == same
    # One subset of everything with a cubic kernel: the U-statistic written out by hand.
    x, y = _gaussian(5, 3, seed=2), _gaussian(5, 3, seed=3, mean=1.0)
    k = lambda p, q: (p @ q.T / 3 + 1) ** 3  # noqa: E731
    off = ~np.eye(5, dtype=bool)
    by_hand = k(x, x)[off].mean() + k(y, y)[off].mean() - 2 * k(x, y).mean()
    assert kernel_inception_distance(x, y, subsets=3, subset_size=5) == pytest.approx(by_hand, rel=1e-12)


def test_image_quality_floors_beat_a_shifted_set() -> None:
    # 5 epochs (91% accurate, under a second) give features as telling as the full 15 for this check.
    classifier = train_digit_classifier(seed=0, epochs=5)
    train_x, _, held_x, _ = split_digits(seed=0)
    data, data_again = train_x[:700], train_x[700:1400]
    quality = image_quality(held_x, data, data_again, classifier, kid_subsets=10, kid_subset_size=300)
    shifted = image_quality(
        (held_x + 0.6).clamp(-1, 1), data, data_again, classifier, kid_subsets=10, kid_subset_size=300
    )
    assert quality["fd_floor"] < shifted["fd"] / 5 and quality["kid_floor"] < shifted["kid"] / 5
    assert quality["fd"] < shifted["fd"] / 5
    assert quality["fd_floor"] == shifted["fd_floor"] and quality["kid_floor"] == shifted["kid_floor"]
    assert len(quality["label_distribution"]) == 10 and sum(quality["label_distribution"]) == pytest.approx(1.0)
    assert quality["mode_coverage"] == 10


class PixelClassifier(torch.nn.Module):
    """A DigitCNN stand-in: features are the first 10 pixels, the head is the identity, so an
    image is classified as the index of its brightest pixel among those 10."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(10, 10, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]


def test_mode_coverage_counts_classes_with_half_their_share() -> None:
    # 100 images labelled 0 x 40, 1 x 30, 2 x 10, 3 x 5, 4 x 5 and 5..9 x 2 each. Half the uniform
    # share is 1 / 20 = 5 images: classes 0 to 4 reach it (3 and 4 exactly), 5 to 9 do not.
    counts = [40, 30, 10, 5, 5, 2, 2, 2, 2, 2]
    labels = torch.repeat_interleave(torch.arange(10), torch.tensor(counts))
    images = -torch.ones(100, 1, 8, 8)
    images.view(100, -1)[torch.arange(100), labels] = 1.0
    images += 0.01 * torch.rand(
        images.shape, generator=torch.Generator().manual_seed(0)
    )  # features with full-rank covariance
    quality = image_quality(images, images, images, PixelClassifier(), kid_subsets=2, kid_subset_size=50)
    assert quality["label_distribution"] == pytest.approx(
        [0.4, 0.3, 0.1, 0.05, 0.05, 0.02, 0.02, 0.02, 0.02, 0.02], abs=1e-12
    )
    assert quality["mode_coverage"] == 5
