"""The KL-regularised objective against a case whose optimum is known in closed form.

A DDPM over data N(m, s^2 I) with its exact noise predictor is a linear-Gaussian chain. With a
linear reward r = a . x_0 the optimum of E[r] - beta KL(path) shifts each reverse step's mean by
the constant u_t = sigma_t^2 (a / beta) C_{t-1}, where C_{t-1} is the slope of E[x_0 | x_{t-1}]
(the product of the later steps' slopes); its x_0-marginal is p_pre(x_0) exp(a . x_0 / beta) / Z.
The policy here is that chain plus a learnable shift theta_t of the noise prediction, so the
optimum is theta*_t = u_t / b_t with b_t the eps coefficient of the mean.
"""

import types

import numpy as np
import pytest
import torch

from rl_diffusion.algos import ddpo
from rl_diffusion.algos.base import Batch
from rl_diffusion.diffusion import GaussianDiffusion
from rl_diffusion.distributed import Ranks
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.path_kl import Pairs, policy_step, reference_scores

T, D, M, S = 10, 2, 0.0, 0.5
A = torch.tensor([0.0, 1.0])


class LinearGaussianEps(torch.nn.Module):
    """E[eps | x_t] for data N(M, S^2 I), plus a learnable per-timestep shift theta [T + 1, D]."""

    def __init__(self, diffusion: GaussianDiffusion):
        super().__init__()
        abar = torch.tensor(diffusion.np["abar"])
        var_t = abar * S**2 + 1 - abar
        self.register_buffer("slope", ((1 - abar).sqrt() / var_t).float())
        self.register_buffer("offset", (-(1 - abar).sqrt() * abar.sqrt() * M / var_t).float())
        self.theta = torch.nn.Parameter(torch.zeros(T + 1, D))

    def forward(self, x, t, c=None):
        return self.slope[t, None] * x + self.offset[t, None] + self.theta[t]


def step_coefficients(diffusion: GaussianDiffusion, sampling: dict) -> list[tuple[int, float, float, float]]:
    """(t, a_t, b_t, sigma_t) of each step of the chain: mean = a_t x_t + b_t eps, read off `reverse_step`."""
    steps = diffusion.timesteps(sampling.get("sampler", "ddpm"), sampling.get("sampling_steps"))
    out = []
    for t, t_prev in zip(steps, steps[1:] + [0], strict=True):

        def mean(x: float, eps: float, t: int = t, t_prev: int = t_prev) -> float:
            kwargs = {k: v for k, v in sampling.items() if k != "sampling_steps"}
            return diffusion.reverse_step(
                torch.full((1, 1), eps), torch.full((1, 1), x), t, t_prev=t_prev, **kwargs
            ).mean.item()

        step = diffusion.reverse_step(
            torch.zeros(1, 1),
            torch.zeros(1, 1),
            t,
            t_prev=t_prev,
            **{k: v for k, v in sampling.items() if k != "sampling_steps"},
        )
        out.append((t, mean(1.0, 0.0) - mean(0.0, 0.0), mean(0.0, 1.0) - mean(0.0, 0.0), step.sigma.item()))
    return out


def optimal_theta(diffusion: GaussianDiffusion, beta: float, sampling: dict | None = None) -> torch.Tensor:
    """theta*_t = sigma_t^2 (a / beta) C_{t_prev} / b_t at the chain's timesteps (other rows unused)."""
    abar = diffusion.np["abar"]
    slope = np.sqrt(1 - abar) / (abar * S**2 + 1 - abar)
    steps = step_coefficients(diffusion, sampling or {})
    theta = torch.zeros(T + 1, D, dtype=torch.float64)
    C = 1.0  # slope of E[x_0 | x_{t_prev}], built from the last step backwards
    for t, a, b, sigma in reversed(steps):
        theta[t] = sigma**2 * A.double() / beta * C / b
        C *= a + b * slope[t]  # x_{t_prev} = (a + b slope_t) x_t + ... + sigma_t z
    return theta.float()


def closed_form_setup(beta: float, **config) -> types.SimpleNamespace:
    diffusion = GaussianDiffusion("linear", T)
    cfg = FinetuneConfig(run="unused", kl_coef=beta, grad_clip=1e9, minibatch_size=1 << 20, **config)
    K = len(diffusion.timesteps(cfg.sampler, cfg.sampling_steps or None))
    policy, reference = LinearGaussianEps(diffusion), LinearGaussianEps(diffusion).requires_grad_(False)
    return types.SimpleNamespace(
        config=cfg,
        diffusion=diffusion,
        policy=policy,
        synced_policy=policy,
        reference=reference,
        ranks=Ranks(),
        device=torch.device("cpu"),
        steps_per_chain=K,
    )


def batch_of(run, traj, rewards: torch.Tensor, c: torch.Tensor | None = None) -> Batch:
    """The loop's Batch of sampled chains on one rank: their pairs, path KLs and path log-ratios."""
    pairs, K = Pairs.from_trajectory(traj), len(traj.timesteps)
    kl, log_ratio = reference_scores(run.diffusion, run.config, run.policy, run.reference, pairs, K)
    return Batch(pairs, traj.xs[-1], c, rewards, kl, K, log_ratio)


class NoStep:
    """An optimizer that keeps the gradient for the test to read."""

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        pass


def expected_update(run, group_size: int, chains: int, repeats: int, seed: int) -> torch.Tensor:
    """The mean over `repeats` batches of the DDPO-SF gradient on theta (common random numbers by seed)."""
    total = torch.zeros(T + 1, D)
    c = torch.arange(chains) // group_size
    generator = torch.Generator().manual_seed(seed)
    algo = ddpo.ScoreFunction(run)
    algo.optimizer = NoStep()
    for _ in range(repeats):
        with torch.no_grad():
            traj = run.diffusion.sample(
                run.policy,
                (chains, D),
                c=c,
                generator=generator,
                record=True,
                log_prob_reduction=run.config.log_prob_reduction,
                **run.config.sampling,
            )
        run.policy.theta.grad = None
        algo.update(batch_of(run, traj, traj.xs[-1] @ A, c), generator)
        total += run.policy.theta.grad
    return total / repeats


def fixed_point(run, optimum: torch.Tensor, group_size: int, chains: int = 2048, repeats: int = 6) -> float:
    """lambda at which the expected update along theta* vanishes, from the updates at lambda = 1 and 0.5."""
    h = {}
    for lam in (1.0, 0.5):
        with torch.no_grad():
            run.policy.theta.copy_(lam * optimum)
        h[lam] = (expected_update(run, group_size, chains, repeats, seed=0) * optimum).sum().item()
    return 1.0 - h[1.0] * 0.5 / (h[1.0] - h[0.5])


@pytest.mark.parametrize("group_size", [2, 4, 256])
def test_expected_update_vanishes_at_the_closed_form_optimum(group_size):
    beta = 0.5
    run = closed_form_setup(beta, adv_clip=1e9)
    lam = fixed_point(run, optimal_theta(run.diffusion, beta), group_size)
    assert lam == pytest.approx(1.0, abs=0.08)


def test_ddim_with_skipped_steps_aims_at_the_optimum_too():
    beta = 0.5
    run = closed_form_setup(beta, adv_clip=1e9, sampler="ddim", sampling_steps=4, eta=1.0)
    optimum = optimal_theta(run.diffusion, beta, run.config.sampling)
    assert fixed_point(run, optimum, group_size=256) == pytest.approx(1.0, abs=0.08)


def test_mean_log_prob_reduction_keeps_the_optimum_of_beta():
    # the log-prob averaged over D dimensions, the KL summed, would aim at the optimum for beta * D
    beta = 0.5
    run = closed_form_setup(beta, adv_clip=1e9, log_prob_reduction="mean")
    assert fixed_point(run, optimal_theta(run.diffusion, beta), group_size=256) == pytest.approx(1.0, abs=0.08)


def test_equal_returns_in_a_group_give_exactly_zero_advantages():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6, generator=g) * 1e3  # values whose mean is not exact in floating point
    returns = torch.stack([r[torch.arange(64) // 11]] * 3)  # groups of 11 equal values (the last of 9)
    adv, scale = ddpo.advantages(returns, torch.arange(64) // 11, adv_clip=5.0)
    assert torch.equal(adv, torch.zeros_like(adv))
    assert (scale > 0).all()


def test_leave_one_out_baseline_and_scale_by_hand():
    r = torch.tensor([1.0, 2.0, 4.0, 8.0, 3.0, 5.0, 6.0, 7.0, 9.0, 1.5])
    adv, scale = ddpo.advantages(r[None], None, adv_clip=100.0)
    for i in (0, 3, 9):
        others = torch.cat([r[:i], r[i + 1 :]]).double()
        expected_scale = others.var().sqrt()  # sample variance of the other 9 chains
        assert scale[i].item() == pytest.approx(expected_scale.item(), rel=1e-6)
        assert adv[0, i].item() == pytest.approx(((r[i] - others.mean()) / expected_scale).item(), rel=1e-6)


def test_small_groups_take_the_batch_scale_and_no_scale_collapses():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(32, generator=g)
    labels = torch.arange(32) % 10  # 3 or 4 chains per class: below MIN_GROUP_FOR_OWN_SCALE
    labels[0] = 10  # and one class with a single chain
    adv, scale = ddpo.advantages(r[None], labels, adv_clip=100.0)
    batch_scale = r.double().var(correction=0).sqrt().item()
    torch.testing.assert_close(scale, torch.full((32,), batch_scale, dtype=torch.float32))
    # the single chain is measured against the rest of the batch
    assert adv[0, 0].item() == pytest.approx((r[0] - r[1:].mean()).item() / batch_scale, rel=1e-5)
    # a large group with nearly equal rewards is held at the floor, not at its own tiny spread
    r = torch.cat([torch.randn(16, generator=g), 0.5 + 1e-6 * torch.randn(16, generator=g)])
    _, scale = ddpo.advantages(r[None], torch.arange(32) // 16, adv_clip=100.0)
    assert scale[16:].min().item() == pytest.approx(
        ddpo.SCALE_FLOOR * r.double().var(correction=0).sqrt().item(), rel=1e-5
    )


def test_returns_charge_each_step_the_kl_of_the_steps_after_it():
    run = closed_form_setup(beta=0.5, adv_clip=1e9)
    with torch.no_grad():
        run.policy.theta.copy_(optimal_theta(run.diffusion, 0.5))
        traj = run.diffusion.sample(run.policy, (64, D), generator=torch.Generator().manual_seed(0), record=True)
    batch = batch_of(run, traj, traj.xs[-1] @ A)
    (adv, _), kl, rewards = ddpo.batch_advantages(run, batch, 0.5), batch.kl, batch.rewards
    # kl_k = ||b_t theta_t||^2 / (2 sigma_t^2) for the constant shift, at every state
    d, t = run.diffusion.np, np.arange(T, 0, -1)
    theta = run.policy.theta.detach().double().numpy()
    expected_kl = (d["mean_coef_eps"][t, None] * theta[t]) ** 2 / (2 * d["reverse_sigma"][t, None] ** 2)
    np.testing.assert_allclose(kl[:, 0].numpy(), expected_kl.sum(1), rtol=1e-4)
    # the advantage of step k is that of r - beta * sum_{j > k} kl_j; kl does not vary over chains here
    kl_after = torch.tensor(np.cumsum(expected_kl.sum(1)[::-1])[::-1] - expected_kl.sum(1), dtype=torch.float32)
    returns = rewards[None, :] - 0.5 * kl_after[:, None]
    expected, _ = ddpo.advantages(returns, None, adv_clip=1e9)
    torch.testing.assert_close(adv, expected)


def test_direct_kl_term_is_the_gradient_of_beta_kl_over_the_scale():
    run = closed_form_setup(beta=0.7, adv_clip=1e9)
    with torch.no_grad():
        run.policy.theta.fill_(0.3)
        traj = run.diffusion.sample(run.policy, (8, D), generator=torch.Generator().manual_seed(0), record=True)
    pairs = Pairs.from_trajectory(traj)
    rows = torch.arange(len(pairs))
    ours = policy_step(run.diffusion, run.config, run.policy, pairs, rows)
    scale = torch.full((len(pairs),), 2.0)
    ddpo.kl_penalty(run, 0.7, ours.mean, pairs, rows, scale).sum().backward()
    # d/dtheta_t of beta ||b_t theta_t||^2 / (2 sigma_t^2) / scale, summed over the 8 chains
    d, t = run.diffusion.np, np.arange(1, T + 1)
    expected = 8 * 0.7 * d["mean_coef_eps"][t] ** 2 * 0.3 / d["reverse_sigma"][t] ** 2 / 2.0
    np.testing.assert_allclose(run.policy.theta.grad[1:, 0].numpy(), expected, rtol=1e-4)
