"""Adjoint matching against the linear-Gaussian chain of test_kl_objective, where the lean adjoint and the
optimal control are known in closed form, and a short run of the real CLI."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rl_diffusion.algos import adjoint
from rl_diffusion.cli import main
from tests.test_kl_objective import A, D, NoStep, S, batch_of, closed_form_setup, optimal_theta, step_coefficients


class LinearReward:
    """r = A . x_0, with its constant gradient A."""

    def gradient(self, x0, c=None):
        return x0 @ A, A.expand_as(x0).clone()


def setup_with_reward(beta: float, **config):
    run = closed_form_setup(beta, **config)
    run.reward = LinearReward()
    return run


def closed_form_adjoint(run, beta: float) -> list[tuple[int, float, torch.Tensor]]:
    """(t, sigma_t, a_{k+1}) of each step k: a_{k+1} = (A / beta) C_{t_prev}, C the product of the later steps'
    slopes a_t + b_t slope_t of the reference's mean (its Jacobian)."""
    abar = run.diffusion.np["abar"]
    slope = np.sqrt(1 - abar) / (abar * S**2 + 1 - abar)
    out, C = [], 1.0
    for t, a, b, sigma in reversed(step_coefficients(run.diffusion, run.config.sampling)):
        out.append((t, sigma, A / beta * C))
        C *= a + b * slope[t]
    return out[::-1]


def sample(run, chains: int, seed: int):
    with torch.no_grad():
        traj = run.diffusion.sample(
            run.policy, (chains, D), generator=torch.Generator().manual_seed(seed), record=True, **run.config.sampling
        )
    return batch_of(run, traj, traj.xs[-1] @ A)


@pytest.mark.parametrize("sampling", [{}, {"sampler": "ddim", "sampling_steps": 4, "eta": 1.0}])
def test_lean_adjoint_equals_its_closed_form_at_every_step(sampling):
    beta = 0.5
    run = setup_with_reward(beta, **sampling)
    with torch.no_grad():
        run.policy.theta.normal_(generator=torch.Generator().manual_seed(0))  # chains off the optimum: a does not care
    batch = sample(run, 16, seed=1)
    K = batch.K
    _, sigma, a = adjoint.lean_adjoint(run, batch.pairs, K, A.expand(16, D) / beta)
    for k, (t, sigma_t, a_t) in enumerate(closed_form_adjoint(run, beta)):
        rows = slice(k * 16, (k + 1) * 16)
        assert batch.pairs.t[rows].eq(t).all()
        torch.testing.assert_close(a[rows], a_t.expand(16, D), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sigma[rows], torch.full((16,), sigma_t), rtol=1e-6, atol=0)


def test_loss_and_target_norm_equal_their_closed_form_off_the_optimum():
    # mu_theta - mu_ref = b_t theta_t: at theta = lam theta*, u_k - sigma_k a_{k+1} = (lam - 1) sigma_k a_{k+1}
    beta, lam = 0.5, 0.3
    run = setup_with_reward(beta)
    with torch.no_grad():
        run.policy.theta.copy_(lam * optimal_theta(run.diffusion, beta))
    algo = adjoint.AdjointMatching(run)
    algo.optimizer = NoStep()
    stats = algo.update(sample(run, 32, seed=0), torch.Generator().manual_seed(0))
    norms = torch.stack([(sigma * a).norm() for _, sigma, a in closed_form_adjoint(run, beta)])
    assert stats["adjoint/target_norm"] == pytest.approx(norms.mean().item(), rel=1e-5)
    assert stats["loss/policy"] == pytest.approx(((1 - lam) ** 2 * norms.square()).mean().item(), rel=1e-4)


def test_gradient_vanishes_at_the_closed_form_optimum():
    beta = 0.5
    run = setup_with_reward(beta)
    with torch.no_grad():
        run.policy.theta.copy_(optimal_theta(run.diffusion, beta))
    algo = adjoint.AdjointMatching(run)
    algo.optimizer = NoStep()
    stats = algo.update(sample(run, 64, seed=0), torch.Generator().manual_seed(0))
    assert stats["loss/policy"] < 1e-8
    assert run.policy.theta.grad.abs().max().item() < 1e-4


@pytest.mark.parametrize("sampling", [{}, {"sampler": "ddim", "sampling_steps": 4, "eta": 1.0}])
def test_training_from_zero_converges_to_the_closed_form_optimum(sampling):
    beta = 0.5
    run = setup_with_reward(beta, lr=0.02, **sampling)
    run.config = dataclasses.replace(run.config, minibatch_size=64)  # shuffled minibatches of the 32 chains' pairs
    algo = adjoint.AdjointMatching(run)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(300):
        algo.update(sample(run, 32, seed=epoch), generator)
    optimum = optimal_theta(run.diffusion, beta, run.config.sampling)
    steps = [t for t, *_ in step_coefficients(run.diffusion, run.config.sampling)]
    theta = run.policy.theta.detach()[steps]
    assert (theta - optimum[steps]).norm().item() < 0.03 * optimum[steps].norm().item()


def test_a_non_finite_gradient_leaves_its_chain_out():
    beta = 0.5
    run = setup_with_reward(beta)
    batch = sample(run, 8, seed=0)

    class NanForFirst(LinearReward):
        def gradient(self, x0, c=None):
            r, g = super().gradient(x0, c)
            return r.index_fill(0, torch.tensor([0]), torch.nan), g.index_fill(0, torch.tensor([0]), torch.nan)

    algo = adjoint.AdjointMatching(run)
    algo.optimizer = NoStep()
    loss_all = algo.update(batch, torch.Generator().manual_seed(0))["loss/policy"]
    run.reward = NanForFirst()
    stats = algo.update(batch, torch.Generator().manual_seed(0))
    # every chain has the same loss here (constant control and target), so dropping one scales it by 7/8
    assert stats["loss/policy"] == pytest.approx(loss_all * 7 / 8, rel=1e-5)
    assert np.isfinite(stats["adjoint/target_norm"])
    assert torch.isfinite(run.policy.theta.grad).all()


def test_short_run_raises_mean_reward(pretrained_moons, tmp_path):
    out = tmp_path / "adjoint"
    args = ["finetune", "--run", str(pretrained_moons), "--out", str(out), "--algo", "adjoint"]
    args += ["--reward", "target_point", "--reward-arg", "point=[1.5, 1.5]", "--kl-coef", "0.3"]
    args += ["--chains", "64", "--epochs", "8", "--lr", "1e-3", "--minibatch-size", "256", "--quiet"]
    args += ["--eval-samples", "1000"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 0.3, metrics
    history = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)["train_state"][
        "history"
    ]
    assert len(history) == 8 and history[-1]["reward/mean"] > history[0]["reward/mean"]
    assert all(h["adjoint/target_norm"] > 0 for h in history)


def test_zero_kl_coef_is_refused_and_not_the_default(pretrained_moons, tmp_path, capsys):
    from rl_diffusion.finetune import config_for

    for algo in ("adjoint", "rtb"):  # both aim at r / beta: beta = 1 by default, where the CLI's is 0
        assert config_for({"run": str(pretrained_moons), "algo": algo}).kl_coef == 1.0
    args = ["finetune", "--run", str(pretrained_moons), "--out", str(tmp_path / "x"), "--algo", "adjoint"]
    assert main([*args, "--kl-coef", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--kl-coef > 0" in err[0]
    assert not (tmp_path / "x").exists()


def test_non_differentiable_reward_and_memory_are_refused(pretrained_moons, tmp_path, capsys):
    base = ["finetune", "--run", str(pretrained_moons), "--out", str(tmp_path / "x"), "--algo", "adjoint"]
    assert main([*base, "--kl-coef", "1", "--sampler", "ddim", "--eta", "0.5"]) == 2
    assert "memoryless" in capsys.readouterr().err


def test_targets_that_ask_more_than_any_tilt_holds_are_refused(pretrained_moons, tmp_path, capsys):
    """At a small beta the first targets ask for more KL per chain than (max r - mean r) / beta, the most any
    tilt of the reward holds: one error line naming the gradient, nothing trained; --no-check-targets runs it,
    and its logged numbers are the ones the check compared."""
    args = ["finetune", "--run", str(pretrained_moons), "--algo", "adjoint", "--reward", "target_point"]
    args += ["--reward-arg", "point=[1.5, 1.5]", "--chains", "32", "--epochs", "1", "--no-final-eval", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "refused"), "--kl-coef", "0.003"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --algo adjoint"), err
    assert "nats per chain" in err[0] and "gradient" in err[0] and "--no-check-targets" in err[0]
    assert not list((tmp_path / "refused" / "checkpoints").glob("step_*.pt"))

    def logged(out: Path, *flags: str) -> dict:
        assert main([*args, "--out", str(out), *flags]) == 0
        return torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)["train_state"][
            "history"
        ][0]

    steep = logged(tmp_path / "unchecked", "--kl-coef", "0.003", "--no-check-targets")
    assert steep["adjoint/target_kl_median"] > steep["adjoint/tilt_kl_bound"] > 0
    mild = logged(tmp_path / "checked", "--kl-coef", "0.3")
    assert 0 < mild["adjoint/target_kl_median"] < mild["adjoint/tilt_kl_bound"]
