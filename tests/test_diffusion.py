import math

import numpy as np
import pytest
import torch

from rl_diffusion.diffusion import GaussianDiffusion, gaussian_log_prob
from rl_diffusion.models.mlp import MLPEps


class ConstantEps(torch.nn.Module):
    """eps_theta = a * x_t + b * t / T: a network whose output a test can compute by hand."""

    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, x, t, c=None):
        return 0.3 * x + (t.float() / self.T).reshape(-1, *([1] * (x.dim() - 1)))


def test_q_sample_moments():
    d = GaussianDiffusion("linear", 100)
    x0 = torch.full((200_000, 2), 1.5)
    t = 40
    xt = d.q_sample(x0, torch.full((len(x0),), t), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    abar = d.np["abar"][t]
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * 1.5, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - abar, rel=1e-2)


def test_reverse_step_mean_is_ho_eq_11_and_log_prob_is_the_normal_density():
    d = GaussianDiffusion("cosine", 20)
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    for t in [20, 7, 2, 1]:
        out = d.reverse_step(eps, x_t, t, noise=torch.randn(x_t.shape, generator=g))
        beta, abar = d.np["betas"][t], d.np["abar"][t]
        mean = (x_t - beta / math.sqrt(1 - abar) * eps) / math.sqrt(1 - beta)
        torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-6)
        expected_var = d.np["posterior_variance"][max(t, 2)]  # the floor at t = 1
        assert out.sigma[0].item() == pytest.approx(math.sqrt(expected_var), rel=1e-6)
        ref = torch.distributions.Normal(out.mean, out.sigma[:, None]).log_prob(out.x_prev).sum(1)
        torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-4)
        assert torch.isfinite(out.log_prob).all()


def test_log_prob_mean_reduction_is_per_dimension():
    x, mean, sigma = torch.randn(5, 3, 4), torch.randn(5, 3, 4), torch.rand(5) + 0.1
    torch.testing.assert_close(gaussian_log_prob(x, mean, sigma, "mean") * 12, gaussian_log_prob(x, mean, sigma, "sum"))


def test_scoring_a_given_action_reproduces_the_sampled_log_prob():
    d = GaussianDiffusion("linear", 30)
    g = torch.Generator().manual_seed(2)
    x_t, eps = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    t = torch.randint(1, 31, (16,), generator=g)
    sampled = d.reverse_step(eps, x_t, t, noise=torch.randn(x_t.shape, generator=g))
    scored = d.reverse_step(eps, x_t, t, x_prev=sampled.x_prev)
    torch.testing.assert_close(scored.log_prob, sampled.log_prob)


def test_ddim_eta_1_with_all_steps_equals_ddpm():
    T = 40
    d = GaussianDiffusion("linear", T)
    model = ConstantEps(T)
    assert d.timesteps("ddim", T) == d.timesteps("ddpm")
    g = torch.Generator().manual_seed(3)
    x_t, eps = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    for t in range(T, 0, -1):
        a = d.reverse_step(eps, x_t, t, sampler="ddpm", x_prev=x_t * 0.9)
        b = d.reverse_step(eps, x_t, t, sampler="ddim", eta=1.0, x_prev=x_t * 0.9)
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.sigma, b.sigma, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a.log_prob, b.log_prob, rtol=1e-4, atol=1e-3)
    ddpm = d.sample(model, (32, 2), generator=torch.Generator().manual_seed(4))
    ddim = d.sample(model, (32, 2), sampler="ddim", eta=1.0, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ddpm.xs[-1], ddim.xs[-1], rtol=1e-3, atol=1e-4)


def test_ddim_eta_0_is_the_closed_form_flow_of_gaussian_data_whatever_the_step_noise():
    # Data x_0 ~ N(m, I): x_t ~ N(sqrt(abar_t) m, I) and the exact noise prediction is
    # eps = sqrt(1 - abar_t) z with z = x_t - sqrt(abar_t) m. With abar = cos^2(theta), Song et al.'s
    # eq. 12 at eta = 0 maps z_t to (cos th_s cos th_t + sin th_s sin th_t) z_t = cos(th_t - th_s) z_t,
    # so the chain ends at x_0 = m + prod_k cos(th_{t_k} - th_{s_k}) z_T.
    T, m = 100, torch.tensor([1.5, -0.5])
    d = GaussianDiffusion("linear", T)
    abar = torch.tensor(d.np["abar"], dtype=torch.float32)

    def eps_model(x, t, c=None):
        a = abar[t][:, None]
        return (1 - a).sqrt() * (x - a.sqrt() * m)

    steps = d.timesteps("ddim", 10)
    assert len(steps) == 10 and steps[0] == 100 and steps[-1] == 1
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))

    def chain(eta: float, noise_seed: int) -> torch.Tensor:
        """The reverse chain from x_T, its per-step noise drawn from a generator of its own."""
        g, x = torch.Generator().manual_seed(noise_seed), x_T
        for t, s in zip(steps, steps[1:] + [0], strict=True):
            x = d.reverse_step(
                eps_model(x, torch.full((8,), t)),
                x,
                t,
                t_prev=s,
                sampler="ddim",
                eta=eta,
                noise=torch.randn(x.shape, generator=g),
            ).x_prev
        return x

    theta = np.arccos(np.sqrt(d.np["abar"][steps + [0]]))
    shrink = np.prod(np.cos(theta[:-1] - theta[1:]))  # 0.82
    expected = m + shrink * (x_T - math.sqrt(d.np["abar"][T]) * m)
    quiet = chain(0.0, noise_seed=1)
    assert torch.equal(quiet, chain(0.0, noise_seed=2))
    torch.testing.assert_close(quiet, expected, rtol=1e-5, atol=1e-5)
    # eta = 1 from the same x_T: the step noise moves x_0 by about the data's spread
    assert (chain(1.0, noise_seed=1) - chain(1.0, noise_seed=2)).abs().mean().item() > 0.5
    # sample(): x_T is its generator's first draw; at eta = 0 nothing else is random and there is no log-prob
    traj = d.sample(
        eps_model,
        (8, 2),
        sampler="ddim",
        sampling_steps=10,
        eta=0.0,
        generator=torch.Generator().manual_seed(0),
        record=True,
    )
    assert traj.log_probs is None and traj.xs.shape == (11, 8, 2)
    torch.testing.assert_close(traj.xs[0], x_T, rtol=0, atol=0)
    torch.testing.assert_close(traj.xs[-1], quiet, rtol=0, atol=0)


def test_recorded_trajectory_log_probs_rescore_exactly():
    T = 25
    d = GaussianDiffusion("sigmoid", T)
    model = ConstantEps(T)
    traj = d.sample(model, (10, 2), generator=torch.Generator().manual_seed(5), record=True)
    assert traj.xs.shape == (T + 1, 10, 2) and traj.log_probs.shape == (T, 10)
    assert traj.timesteps.tolist() == list(range(T, 0, -1)) and traj.prev_timesteps.tolist() == list(
        range(T - 1, -1, -1)
    )
    for k in range(T):
        t = traj.timesteps[k].item()
        x_t = traj.xs[k]
        again = d.reverse_step(model(x_t, torch.full((10,), t)), x_t, t, x_prev=traj.xs[k + 1])
        torch.testing.assert_close(again.log_prob, traj.log_probs[k])


def test_training_loss_is_zero_for_the_true_noise_predictor_on_a_point_mass():
    # For data at x_0 = 0, eps = x_t / sqrt(1 - abar_t) exactly.
    d = GaussianDiffusion("linear", 50)
    coef = torch.tensor(d.np["sqrt_one_minus_abar"], dtype=torch.float32)

    class Oracle(torch.nn.Module):
        def forward(self, x, t, c=None):
            return x / coef[t][:, None]

    assert d.training_loss(Oracle(), torch.zeros(512, 2), generator=torch.Generator().manual_seed(0)).item() < 1e-10
    assert np.isclose(d.np["abar"][0], 1.0)


def test_sharded_sampling_and_loss_are_the_rows_of_the_whole_batch():
    # Data parallelism: ranks draw the whole batch's random numbers and keep their rows, so
    # two shards together are the one-process batch, and the mean of the shard losses (what DDP
    # averages) is the whole batch's loss, weighted or not.
    d = GaussianDiffusion("linear", 10)
    model = MLPEps(num_timesteps=10, hidden_size=16, hidden_layers=1, emb_size=8)
    whole = d.sample(model, (6, 2), generator=torch.Generator().manual_seed(3), record=True)
    halves = [
        d.sample(model, (6, 2), generator=torch.Generator().manual_seed(3), record=True, shard=slice(i, i + 3))
        for i in (0, 3)
    ]
    torch.testing.assert_close(torch.cat([h.xs for h in halves], 1), whole.xs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([h.log_probs for h in halves], 1), whole.log_probs, rtol=1e-5, atol=1e-5)
    x0, weights = torch.randn(8, 2), torch.softmax(torch.randn(8), 0)
    for w in (None, weights):
        full = d.training_loss(model, x0, generator=torch.Generator().manual_seed(4), weights=w)
        parts = [
            d.training_loss(model, x0, generator=torch.Generator().manual_seed(4), weights=w, shard=slice(i, i + 4))
            for i in (0, 4)
        ]
        assert (parts[0] + parts[1]).item() / 2 == pytest.approx(full.item(), rel=1e-5)
