"""AWM: the advantage-weighted denoising loss by hand, its zero gradient at equal rewards, short runs
(stochastic and deterministic chains) that raise the reward, and its refused settings."""

import json

import numpy as np
import pytest
import torch

from rl_diffusion.algos.awm import AdvantageWeightedMatching, chain_returns
from rl_diffusion.algos.base import Batch
from rl_diffusion.cli import main
from rl_diffusion.path_kl import Pairs
from tests.test_cli_errors import assert_one_line_error
from tests.test_kl_objective import D, NoStep, S, T, batch_of, closed_form_setup


def sample_batch(s, chains: int, seed: int, c=None):
    with torch.no_grad():
        return s.diffusion.sample(
            s.policy, (chains, D), c=c, generator=torch.Generator().manual_seed(seed), record=True
        )


def awm_loss(diffusion, model, x0, c, adv, generator):
    """(1 / B) sum_b A_b ||eps_theta(x_t, t, c_b) - eps||^2 / D, as the update computes it."""
    return diffusion.training_loss(model, x0, c, generator=generator, weights=adv / len(x0))


def test_loss_and_gradient_equal_a_hand_computation():
    """Two samples, advantages +1 and -1, the linear-Gaussian eps network with a known shift theta:
    L = (1/2) (||e_1||^2 - ||e_2||^2) / D, e_b = slope_t x_t + theta_t - eps, and dL/dtheta_t = A_b e_b / (B D)."""
    s = closed_form_setup(0.0)
    with torch.no_grad():
        s.policy.theta.copy_(torch.linspace(-1, 1, (T + 1) * D).reshape(T + 1, D))
    x0 = torch.tensor([[0.3, -0.7], [1.2, 0.4]])
    adv = torch.tensor([1.0, -1.0])
    loss = awm_loss(s.diffusion, s.policy, x0, None, adv, torch.Generator().manual_seed(5))
    loss.backward()

    # the same draws as the loss makes: t first, then eps, for the whole batch
    g = torch.Generator().manual_seed(5)
    t = torch.randint(1, T + 1, (2,), generator=g).numpy()
    eps = torch.randn((2, D), generator=g).double().numpy()
    abar = s.diffusion.np["abar"]
    theta = s.policy.theta.detach().double().numpy()
    expected, grad = 0.0, np.zeros((T + 1, D))
    for b in range(2):
        a = abar[t[b]]
        x_t = np.sqrt(a) * x0[b].double().numpy() + np.sqrt(1 - a) * eps[b]
        e = np.sqrt(1 - a) / (a * S**2 + 1 - a) * x_t + theta[t[b]] - eps[b]  # data mean M = 0: no offset
        expected += adv[b].item() * (e**2).sum() / D / 2
        grad[t[b]] += adv[b].item() * 2 * e / D / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert expected != 0
    np.testing.assert_allclose(s.policy.theta.grad.numpy(), grad, rtol=1e-5, atol=1e-7)


def test_update_weights_the_loss_by_leave_one_out_advantages():
    """Two chains with rewards 1 and 0: leave-one-out advantages +-2 (difference over the batch's spread 0.5);
    the update's one gradient is that of the loss with those weights, on the same draws."""
    s = closed_form_setup(0.0)
    traj = sample_batch(s, 2, seed=0)
    algo = AdvantageWeightedMatching(s)
    algo.optimizer = NoStep()
    stats = algo.update(batch_of(s, traj, torch.tensor([1.0, 0.0])), torch.Generator().manual_seed(3))
    assert stats["awm/adv_abs"] == pytest.approx(2.0)
    got = s.policy.theta.grad.clone()
    s.policy.theta.grad = None
    loss = awm_loss(
        s.diffusion, s.policy, traj.xs[-1], None, torch.tensor([2.0, -2.0]), torch.Generator().manual_seed(3)
    )
    loss.backward()
    assert stats["loss/policy"] == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(got, s.policy.theta.grad)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("labelled", [False, True])
def test_equal_rewards_give_a_zero_gradient(labelled):
    s = closed_form_setup(0.0, inner_epochs=3)
    with torch.no_grad():
        s.policy.theta.normal_(generator=torch.Generator().manual_seed(1))  # a policy with a non-zero denoising loss
    c = torch.arange(16) % 2 if labelled else None
    traj = sample_batch(s, 16, seed=0, c=c)
    algo = AdvantageWeightedMatching(s)
    algo.optimizer = NoStep()
    stats = algo.update(batch_of(s, traj, torch.full((16,), 0.7), c), torch.Generator().manual_seed(0))
    assert stats["awm/adv_abs"] == 0 and stats["loss/policy"] == 0
    assert s.policy.theta.grad is not None and torch.count_nonzero(s.policy.theta.grad) == 0


def test_path_kl_enters_the_return():
    """With beta > 0 and equal rewards, the chain with the larger path KL gets the negative advantage."""
    kl = torch.tensor([[0.1, 0.5], [0.2, 0.0]])  # [K, B]: path KLs 0.3 and 0.5
    torch.testing.assert_close(chain_returns(torch.ones(2), kl, 2.0), torch.tensor([0.4, 0.0]))
    torch.testing.assert_close(chain_returns(torch.ones(2), kl, 0.0), torch.ones(2))
    s = closed_form_setup(2.0)
    traj = sample_batch(s, 2, seed=0)
    algo = AdvantageWeightedMatching(s)
    algo.optimizer = NoStep()
    batch = Batch(Pairs.from_trajectory(traj), traj.xs[-1], None, torch.ones(2), kl, s.steps_per_chain)
    stats = algo.update(batch, torch.Generator().manual_seed(0))
    got = s.policy.theta.grad.clone()
    s.policy.theta.grad = None
    weights = torch.tensor([2.0, -2.0])  # returns 0.4 and 0: +-2
    awm_loss(s.diffusion, s.policy, traj.xs[-1], None, weights, torch.Generator().manual_seed(0)).backward()
    assert stats["awm/adv_abs"] == pytest.approx(2.0)
    torch.testing.assert_close(got, s.policy.theta.grad)


def finetune(pretrained, out, *extra: str) -> tuple[dict, list[dict]]:
    args = ["finetune", "--run", str(pretrained), "--out", str(out), "--algo", "awm", "--reward", "target_point"]
    args += ["--reward-arg", "point=[1.5, 1.5]", "--chains", "64", "--epochs", "8", "--lr", "1e-3"]
    args += ["--minibatch-size", "256", "--quiet", *extra]
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
