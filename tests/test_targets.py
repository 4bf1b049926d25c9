"""Exact samples of the KL-regularised optimum p_data exp(r / beta) / Z, and evaluate's blocks built on them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pretrain.datasets import MIXTURES, Mixture, sample_2d
from rewards import Reward, build_reward
from rewards.builtin_2d import GMM25_POSTERIOR
from rl_diffusion import evaluation
from rl_diffusion.cli import main
from rl_diffusion.errors import UserError
from rl_diffusion.metrics import mode_masses
from rl_diffusion.targets import MODE_RADIUS_STDS, RejectionTooCostly, dataset_modes, exact_target, tilt_linear


def test_linear_tilt_of_one_gaussian_shifts_its_mean_by_s2_a_over_beta() -> None:
    tilted = tilt_linear(Mixture(np.array([[0.5, -1.0]]), 0.3, np.ones(1)), np.array([2.0, -1.0]), kl_coef=0.5)
    # mu + s^2 a / beta = (0.5, -1) + 0.09 * (4, -2)
    np.testing.assert_allclose(tilted.means, [[0.86, -1.18]], atol=1e-12)
    assert tilted.std == 0.3 and tilted.weights.tolist() == [1.0]


def test_linear_tilt_weights_by_hand_and_by_importance_weights() -> None:
    # exp(a . mu / beta) with a = (ln 3, 0), beta = 1: weights 1 : 3.
    two = Mixture(np.array([[0.0, 0.0], [1.0, 0.0]]), 0.1, np.ones(2))
    np.testing.assert_allclose(tilt_linear(two, np.array([math.log(3.0), 0.0]), 1.0).weights, [0.25, 0.75], atol=1e-12)
    # 8gaussians, a = (1, 0.5), beta = 0.7: the same masses from self-normalised weights exp(a . x / beta) of data.
    a, beta = np.array([1.0, 0.5]), 0.7
    mixture = MIXTURES["8gaussians"]
    x = sample_2d("8gaussians", 400_000, seed=0).astype(np.float64)
    w = np.exp(x @ a / beta)
    nearest = np.linalg.norm(x[:, None] - mixture.means, axis=2).argmin(axis=1)
    masses = np.bincount(nearest, weights=w, minlength=8) / w.sum()
    np.testing.assert_allclose(tilt_linear(mixture, a, beta).weights, masses, atol=0.006)


def test_exact_target_of_a_linear_reward_on_gmm25_is_the_tilted_mixture() -> None:
    target = exact_target("gmm25", "linear", {}, kl_coef=0.2, num_samples=40_000, seed=0)
    prior = MIXTURES["gmm25"]
    assert target.description.startswith("closed form")
    # Default a = (0, 1): every mean moves up by s^2 / beta = 0.06; rows weigh exp(y / 0.2), normalised.
    np.testing.assert_allclose(target.modes.means, prior.means + [0.0, 0.3 / 25 / 0.2], atol=1e-12)
    row = np.exp(np.arange(-2, 3) / 0.2) / np.exp(np.arange(-2, 3) / 0.2).sum() / 5
    np.testing.assert_allclose(target.modes.masses, np.tile(row, 5), rtol=1e-12)
    assert target.modes.radius == pytest.approx(MODE_RADIUS_STDS * math.sqrt(0.3) / 5)
    assert target.samples.shape == (40_000, 2) and target.samples.dtype == np.float32
    np.testing.assert_allclose(target.samples.mean(axis=0), target.modes.masses @ target.modes.means, atol=0.01)


def test_gmm_posterior_at_beta_one_is_the_nine_mode_posterior() -> None:
    n = 20_000
    target = exact_target("gmm25", "gmm_posterior", {}, kl_coef=1.0, num_samples=n, seed=0)
    assert target.samples.shape == (n, 2) and "rejection sampling" in target.description
    np.testing.assert_array_equal(target.modes.masses, GMM25_POSTERIOR.weights)
    masses, outside = mode_masses(target.samples, target.modes.means, target.modes.radius)
    posterior = GMM25_POSTERIOR.weights
    assert np.all(masses[posterior == 0] == 0) and (posterior > 0).sum() == 9
    np.testing.assert_allclose(masses, posterior, atol=4 * np.sqrt(posterior * (1 - posterior) / n).max())
    assert outside < 0.002  # 1 - exp(-8) of each Gaussian lies within 4 stds


def test_gmm_posterior_with_other_modes_is_that_posterior() -> None:
    """Seven corner and edge modes with unequal weights: the exact target's masses are those weights, sampled."""
    modes = [[-10, -10, 1], [10, 10, 6], [-10, 10, 2], [10, -10, 3], [0, 10, 1], [-10, 0, 4], [5, 5, 2]]
    n = 20_000
    target = exact_target("gmm25", "gmm_posterior", {"modes": modes}, kl_coef=1.0, num_samples=n, seed=0)
    weights = {(x / 5, y / 5): w / 19 for x, y, w in modes}
    expected = np.array([weights.get(tuple(m), 0.0) for m in target.modes.means])
    np.testing.assert_allclose(target.modes.masses, expected)
    masses, _ = mode_masses(target.samples, target.modes.means, target.modes.radius)
    np.testing.assert_allclose(masses, expected, atol=4 * np.sqrt(expected * (1 - expected) / n).max())
    with pytest.raises(UserError, match="points of the grid"):
        build_reward("gmm_posterior", {"modes": [[1, 2, 3]]})


def test_checkerboard_times_bump_mean_matches_quadrature() -> None:
    kwargs, beta = {"center": [0.3, 1.2], "width": 0.7, "scale": 2.0}, 0.8
    target = exact_target("checkerboard", "gaussian_bump", kwargs, kl_coef=beta, num_samples=40_000, seed=0)
    assert target.modes is None
    # Midpoint rule on [-2, 2]^2: density uniform on the squares with floor(x) + floor(y) even.
    u = (np.arange(800) + 0.5) / 200 - 2
    x, y = np.meshgrid(u, u, indexing="ij")
    board = (np.floor(x) + np.floor(y)) % 2 == 0
    weight = board * np.exp(2.0 * np.exp(-((x - 0.3) ** 2 + (y - 1.2) ** 2) / (2 * 0.7**2)) / beta)
    mean = [(x * weight).sum() / weight.sum(), (y * weight).sum() / weight.sum()]
    np.testing.assert_allclose(target.samples.mean(axis=0), mean, atol=0.015)
    assert np.all((np.floor(target.samples[:, 0]) + np.floor(target.samples[:, 1])) % 2 == 0)


def test_estimated_mode_masses_match_per_component_quadrature() -> None:
    kwargs, beta = {"center": [2.0, 0.0], "width": 1.0, "scale": 1.0}, 0.5
    target = exact_target("8gaussians", "gaussian_bump", kwargs, kl_coef=beta, num_samples=100, seed=0)
    assert "mode masses from 100,000 more exact draws" in target.description
    # w_k E_{N(mu_k, s^2 I)} exp(r / beta) on a grid of +-6 stds around each mean.
    mixture = MIXTURES["8gaussians"]
    u = np.linspace(-6, 6, 241) * mixture.std
    dx, dy = np.meshgrid(u, u, indexing="ij")
    gauss = np.exp(-(dx**2 + dy**2) / (2 * mixture.std**2))
    mass = [
        (gauss * np.exp(np.exp(-((m[0] + dx - 2) ** 2 + (m[1] + dy) ** 2) / 2) / beta)).sum() for m in mixture.means
    ]
    np.testing.assert_allclose(target.modes.masses, np.array(mass) / sum(mass), atol=0.006)


def test_exact_target_absent_or_too_costly() -> None:
    assert exact_target("moons", "linear", {}, kl_coef=1.0, num_samples=10, seed=0) is None  # unbounded, not a mixture
    assert exact_target("gmm25", "gmm_posterior", {}, kl_coef=0.0, num_samples=10, seed=0) is None
    with pytest.raises(RejectionTooCostly, match="accepted 0 of 100000 proposals; 1000 samples would need more than"):
        exact_target("checkerboard", "gaussian_bump", {"center": [5.0, 5.0], "width": 0.1}, 0.1, 1000, seed=0)


def test_dataset_modes() -> None:
    modes = dataset_modes("gmm25")
    assert modes.means.shape == (25, 2) and modes.radius == pytest.approx(4 * math.sqrt(0.3) / 5)
    np.testing.assert_allclose(modes.masses, np.full(25, 0.04))
    assert sorted(set(modes.means[:, 0])) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert dataset_modes("8gaussians").radius == pytest.approx(0.8) and dataset_modes("moons") is None


def test_tilted_block_drops_nonfinite_pool_rewards_and_flags_a_small_ess() -> None:
    def fn(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        # 0 at x = 0, ln 3 at x = 1, nan beyond 1.5
        return torch.where(x0[:, 0] > 1.5, torch.nan, math.log(3.0) * x0[:, 0])

    reward = Reward("nan_beyond", fn, skip_nonfinite=True)
    pool = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=np.float32)
    points = sample_2d("moons", 50, seed=0)
    m = evaluation._tilted_metrics([pool, pool], reward, 1.0, points, points, seed=0)
    assert m["tilted_nonfinite_dropped"] == 2
    assert m["tilted_ess"] == pytest.approx(1 / (0.25**2 + 0.75**2))
    assert m["tilted_reward_mean"] == pytest.approx(0.75 * math.log(3.0), abs=0.25)
    assert m["tilted_reliable"] is False and "below 1,000" in m["tilted_note"]


def test_evaluate_reports_the_exact_target_of_a_bounded_reward(pretrained_moons, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(evaluation, "evaluate_finetuned", lambda *args, **kwargs: {})  # skip finish's own evaluation
    out = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--run",
                str(pretrained_moons),
                "--out",
                str(out),
                "--reward",
                "target_point",
                "--reward-arg",
                "point=[1.5, 1.5]",
                "--kl-coef",
                "0.5",
                "--sampler",
                "ddim",
                "--eta",
                "0.5",
                "--sampling-steps",
                "10",
                "--chains",
                "16",
                "--epochs",
                "1",
                "--minibatch-size",
                "16",
                "--quiet",
            ]
        )
        == 0
    )
    monkeypatch.undo()
    monkeypatch.setattr(evaluation, "TILTED_POOL", 10_000)  # ESS about 1,500
    m = evaluation.evaluate_finetuned(out, num_samples=500)
    json.dumps(m)
    assert m["memoryless"] is False and "not reachable" in m["note"]
    assert m["target_method"] == "rejection sampling from moons, acceptance exp((r - 0) / 0.5)"
    # E[r] under p_data exp(r / beta) / Z, by self-normalised weights on a large data draw.
    x = torch.from_numpy(sample_2d("moons", 200_000, seed=7))
    r = build_reward("target_point", {"point": [1.5, 1.5]})(x).double()
    w = torch.exp(r / 0.5)
    assert m["target_reward_mean"] == pytest.approx(((w * r).sum() / w.sum()).item(), abs=0.06)
    for block in ("target", "tilted", "pretrained_data"):
        assert (
            0 < m[f"{block}_mmd_floor"] < m[f"{block}_mmd" if block == "pretrained_data" else f"{block}_mmd_pretrained"]
        )
        assert 0 < m[f"{block}_sw2_floor"]
    assert m["target_sw2_floor"] < 0.5 * m["target_sw2_pretrained"]
    assert m["far_radius"] == pytest.approx(1.5 * np.linalg.norm(sample_2d("moons", 500, 12345), axis=1).max())
    assert m["far_fraction"] <= 0.01 and m["tilted_reliable"] and m["tilted_nonfinite_dropped"] == 0
