"""AWM: the advantage-weighted denoising loss by hand, its zero gradient at equal rewards, short runs
(stochastic and deterministic chains) that raise the reward, and its refused settings."""

import json

import pytest
import torch

from rl_diffusion.algos.awm import AdvantageWeightedMatching, chain_returns, nft_loss, optimality
from rl_diffusion.algos.base import Batch
from rl_diffusion.cli import main
from rl_diffusion.path_kl import Pairs
from tests.test_cli_errors import assert_one_line_error
from tests.test_kl_objective import D, NoStep, T, batch_of, closed_form_setup


def sample_batch(run, chains: int, seed: int, c=None):
    with torch.no_grad():
        return run.diffusion.sample(
            run.policy, (chains, D), c=c, generator=torch.Generator().manual_seed(seed), record=True
        )


def awm_loss(diffusion, model, x0, c, adv, generator):
    """(1 / B) sum_b A_b ||eps_theta(x_t, t, c_b) - eps||^2 / D: the plain advantage-weighted denoising loss."""
    return diffusion.training_loss(model, x0, c, generator=generator, weights=adv / len(x0))


def test_nft_loss_equals_a_hand_computation():
    eps, eps_old, noise = torch.tensor([[0.5, -1.0]]), torch.tensor([[0.2, 0.1]]), torch.tensor([[1.0, 0.0]])
    w = torch.tensor([0.25])
    # 0.25 * ((-0.5)^2 + (-1)^2) / 2 + 0.75 * ((0.4 - 0.5 - 1)^2 + (0.2 + 1 - 0)^2) / 2
    expected = 0.25 * (0.25 + 1.0) / 2 + 0.75 * (1.21 + 1.44) / 2
    assert nft_loss(eps, eps_old, noise, w).item() == pytest.approx(expected, rel=1e-6)
    assert optimality(torch.tensor([-5.0, 0.0, 2.5]), 5.0).tolist() == [0.0, 0.5, 0.75]


def update_gradient(run, batch, seed: int) -> tuple[dict, torch.Tensor]:
    algo = AdvantageWeightedMatching(run)
    algo.optimizer = NoStep()
    stats = algo.update(batch, torch.Generator().manual_seed(seed))
    grad = run.policy.theta.grad.clone()
    run.policy.theta.grad = None
    return stats, grad


def test_first_step_is_the_advantage_weighted_gradient_over_adv_clip():
    """Two chains with rewards 1 and 0: leave-one-out advantages +-2. At theta = theta_old the bounded loss's
    gradient is that of (1 / B) sum_b A_b ||eps_theta - eps||^2 / D, divided by adv_clip, on the same draws."""
    run = closed_form_setup(0.0)
    with torch.no_grad():
        run.policy.theta.copy_(torch.linspace(-1, 1, (T + 1) * D).reshape(T + 1, D))
    traj = sample_batch(run, 2, seed=0)
    stats, got = update_gradient(run, batch_of(run, traj, torch.tensor([1.0, 0.0])), seed=3)
    assert stats["awm/adv_abs"] == pytest.approx(2.0)
    awm_loss(
        run.diffusion, run.policy, traj.xs[-1], None, torch.tensor([2.0, -2.0]), torch.Generator().manual_seed(3)
    ).backward()
    torch.testing.assert_close(got, run.policy.theta.grad / run.config.adv_clip)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("labelled", [False, True])
def test_equal_rewards_give_a_zero_gradient(labelled):
    run = closed_form_setup(0.0, inner_epochs=3)
    with torch.no_grad():
        run.policy.theta.normal_(generator=torch.Generator().manual_seed(1))  # a policy with a non-zero denoising loss
    c = torch.arange(16) % 2 if labelled else None
    traj = sample_batch(run, 16, seed=0, c=c)
    stats, grad = update_gradient(run, batch_of(run, traj, torch.full((16,), 0.7), c), seed=0)
    assert stats["awm/adv_abs"] == 0 and stats["loss/policy"] > 0  # w = 1/2 everywhere: balanced, not zero
    assert torch.count_nonzero(grad) == 0


def test_path_kl_enters_the_return():
    """With beta > 0 and equal rewards, the chain with the larger path KL gets the negative advantage."""
    kl = torch.tensor([[0.1, 0.5], [0.2, 0.0]])  # [K, B]: path KLs 0.3 and 0.5
    torch.testing.assert_close(chain_returns(torch.ones(2), kl, 2.0), torch.tensor([0.4, 0.0]))
    torch.testing.assert_close(chain_returns(torch.ones(2), kl, 0.0), torch.ones(2))
    run = closed_form_setup(2.0)
    with torch.no_grad():
        run.policy.theta.fill_(0.3)
    traj = sample_batch(run, 2, seed=0)
    batch = Batch(Pairs.from_trajectory(traj), traj.xs[-1], None, torch.ones(2), kl, run.steps_per_chain)
    stats, got = update_gradient(run, batch, seed=0)
    weights = torch.tensor([2.0, -2.0])  # returns 0.4 and 0: +-2
    awm_loss(run.diffusion, run.policy, traj.xs[-1], None, weights, torch.Generator().manual_seed(0)).backward()
    assert stats["awm/adv_abs"] == pytest.approx(2.0)
    torch.testing.assert_close(got, run.policy.theta.grad / run.config.adv_clip)


def test_a_sample_the_advantages_reject_is_left_a_bounded_distance():
    """w = 0 on one sample: minimising over eps_theta lands on the reflection 2 eps_old - eps, not at infinity."""
    eps_old, noise = torch.tensor([[0.2, 0.1]]), torch.tensor([[1.0, 0.0]])
    eps = eps_old.clone().requires_grad_(True)
    opt = torch.optim.SGD([eps], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        nft_loss(eps, eps_old, noise, torch.zeros(1)).sum().backward()
        opt.step()
    torch.testing.assert_close(eps.detach(), 2 * eps_old - noise)


def finetune(pretrained, out, *extra: str) -> tuple[dict, list[dict]]:
    args = ["finetune", "--run", str(pretrained), "--out", str(out), "--algo", "awm", "--reward", "target_point"]
    args += ["--reward-arg", "point=[1.5, 1.5]", "--chains", "64", "--epochs", "8", "--lr", "1e-3"]
    args += ["--minibatch-size", "256", "--eval-samples", "1000", "--quiet", *extra]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    checkpoint = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    return metrics, torch.load(checkpoint, weights_only=False)["train_state"]["history"]


@pytest.mark.parametrize(
    "extra",
    [
        [],  # DDPM: 5 steps per epoch (20 x 64 pairs / 256)
        ["--sampler", "ddim", "--sampling-steps", "5", "--eta", "0", "--inner-epochs", "4"],  # deterministic chain
    ],
    ids=["ddpm", "ddim-eta0"],
)
def test_short_run_raises_mean_reward(pretrained_moons, tmp_path, extra):
    metrics, history = finetune(pretrained_moons, tmp_path / "awm", *extra)
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 0.3, metrics
    assert len(history) == 8 and history[-1]["reward/mean"] > history[0]["reward/mean"]
    assert all(h["awm/adv_abs"] > 0 for h in history)
    # the path KL is defined on the stochastic chain only
    assert ("kl/to_pretrained" in history[0]) == (extra == [])


def test_deterministic_chain_refuses_a_kl_coef(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["finetune", "--run", "r", "--out", "X", "--algo", "awm", "--sampler", "ddim", "--eta", "0"]
    code = main([*args, "--kl-coef", "0.1"])
    assert_one_line_error(code, capsys.readouterr().err.strip().splitlines(), "--eta must be > 0", "--kl-coef")
    assert list(tmp_path.iterdir()) == []


def test_nft_at_its_defaults_raises_mean_reward(pretrained_moons, tmp_path):
    # its x_0-space loss weights the noisier timesteps more than awm's: it climbs by 0.30 where awm climbs more
    metrics, history = finetune(pretrained_moons, tmp_path / "nft", "--algo", "nft")
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 0.2, metrics
    assert len(history) == 8 and history[-1]["reward/mean"] > history[0]["reward/mean"]
