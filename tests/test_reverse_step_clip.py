"""The reverse step's clipped x_0, its DDIM coefficients in float64, and the samplers it refuses."""

import math

import numpy as np
import pytest
import torch

from pretrain.data import load_training_data
from rl_diffusion.checkpoint import load_run
from rl_diffusion.diffusion import GaussianDiffusion
from rl_diffusion.errors import UserError

RANGE = ([-1.0, -0.5], [1.0, 2.0])


def batch(seed: int = 0, n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)


def predicted_x0(d: GaussianDiffusion, x_t, eps, t: int) -> np.ndarray:
    abar = d.np["abar"][t]
    return (x_t.double().numpy() - math.sqrt(1 - abar) * eps.double().numpy()) / math.sqrt(abar)


def clipped_x0(d: GaussianDiffusion, x_t, eps, t: int) -> np.ndarray:
    return np.clip(predicted_x0(d, x_t, eps, t), RANGE[0], RANGE[1])


@pytest.mark.parametrize("t", [50, 10, 2, 1])
def test_ddpm_mean_is_the_posterior_mean_at_the_clipped_x0(t):
    d = GaussianDiffusion("linear", 50, x0_range=RANGE)
    x_t, eps = batch()
    x0 = clipped_x0(d, x_t, eps, t)
    beta, abar, abar_prev = d.np["betas"][t], d.np["abar"][t], d.np["abar"][t - 1]
    # Ho et al. eq. 7
    expected = (
        math.sqrt(abar_prev) * beta / (1 - abar) * x0
        + math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * x_t.double().numpy()
    )
    out = d.reverse_step(eps, x_t, t)
    np.testing.assert_allclose(out.mean.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert 0 < (x0 != predicted_x0(d, x_t, eps, t)).mean() < 1  # some coordinates clipped, some not


@pytest.mark.parametrize("t, t_prev", [(50, 40), (12, 3), (3, 0)])
def test_ddim_mean_is_song_eq_12_at_the_clipped_x0(t, t_prev):
    d = GaussianDiffusion("cosine", 50, x0_range=RANGE)
    x_t, eps = batch(1)
    x0 = clipped_x0(d, x_t, eps, t)
    abar_t, abar_s, eta = d.np["abar"][t], d.np["abar"][t_prev], 0.7
    sigma = (
        eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        if t_prev
        else eta * d.np["reverse_sigma"][1]
    )
    eps_clipped = (x_t.double().numpy() - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
    expected = math.sqrt(abar_s) * x0 + math.sqrt(max(1 - abar_s - sigma**2, 0.0)) * eps_clipped
    out = d.reverse_step(eps, x_t, t, t_prev=t_prev, sampler="ddim", eta=eta)
    np.testing.assert_allclose(out.mean.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert out.sigma[0].item() == pytest.approx(sigma, rel=1e-6)


def test_nothing_clipped_gives_exactly_the_unclipped_step():
    wide, none = GaussianDiffusion("linear", 50, x0_range=([-1e6, -1e6], [1e6, 1e6])), GaussianDiffusion("linear", 50)
    x_t, eps = batch(2)
    for kwargs in ({}, {"sampler": "ddim", "t_prev": 20, "eta": 0.5}):
        assert torch.equal(
            wide.reverse_step(eps, x_t, 30, **kwargs).mean, none.reverse_step(eps, x_t, 30, **kwargs).mean
        )


def test_a_network_that_predicts_far_off_points_stays_in_range():
    abar = torch.tensor(GaussianDiffusion("linear", 50).np["abar"], dtype=torch.float32)

    class FarOff(torch.nn.Module):  # the noise prediction whose x_0 is (50, 50), far outside the range
        def forward(self, x, t, c=None):
            a = abar[t, None]
            return (x - a.sqrt() * 50) / (1 - a).sqrt()

    clipped, free = (
        GaussianDiffusion("linear", 50, x0_range=r)
        .sample(FarOff(), (2000, 2), generator=torch.Generator().manual_seed(0))
        .xs[-1]
        for r in (RANGE, None)
    )
    low, high = torch.tensor(RANGE[0]), torch.tensor(RANGE[1])
    sigma_1 = GaussianDiffusion("linear", 50).np["reverse_sigma"][1]
    assert ((clipped >= low - 6 * sigma_1) & (clipped <= high + 6 * sigma_1)).all()
    assert free.min() > 45


def test_ddim_sigma_is_exact_in_float64_at_T_1000():
    d = GaussianDiffusion("linear", 1000)
    x_t, eps = batch(3, 4)
    for t, s in [(1000, 980), (20, 1), (2, 1)]:
        abar_t, abar_s = d.np["abar"][t], d.np["abar"][s]
        sigma = math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        out = d.reverse_step(eps, x_t, t, t_prev=s, sampler="ddim", eta=1.0)
        assert out.sigma[0].item() == pytest.approx(sigma, rel=2e-7)  # float32 rounding of the float64 value


def test_the_range_travels_with_the_config_and_pretraining_records_the_data_range(pretrained_moons):
    d = GaussianDiffusion("linear", 10, x0_range=RANGE)
    assert GaussianDiffusion(**d.config).x0_range == d.x0_range
    run = load_run(pretrained_moons, torch.device("cpu"))
    low, high = (np.array(b) for b in run.diffusion.x0_range)
    pool = load_training_data("moons", seed=0).x.double().numpy()  # the pool the fixture trained on
    width = pool.max(0) - pool.min(0)
    np.testing.assert_allclose(low, pool.min(0) - 0.1 * width, rtol=1e-6)
    np.testing.assert_allclose(high, pool.max(0) + 0.1 * width, rtol=1e-6)
    # moons spans x' in [-2.4, 3.6] and y' in [-1.6, 2.9] before its noise (pretrain/datasets.py)
    assert low[0] < -2.4 - 0.6 and high[1] > 2.9 + 0.45


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sampler": "ddim", "eta": 1.5}, "--eta must be in [0, 1]"),
        ({"sampler": "ddim", "eta": -0.1}, "--eta must be in [0, 1]"),
        ({"sampler": "ddpn"}, "unknown sampler 'ddpn'"),
    ],
)
def test_refused_reverse_steps(kwargs, message):
    x_t, eps = batch(4, 4)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GaussianDiffusion("linear", 10).reverse_step(eps, x_t, 5, **kwargs)


def test_one_step_ddim_is_refused():
    with pytest.raises(UserError, match="between 2 and 10, got 1"):
        GaussianDiffusion("linear", 10).timesteps("ddim", 1)
    assert GaussianDiffusion("linear", 10).timesteps("ddim", 2) == [10, 1]
