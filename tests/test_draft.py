"""DRaFT: the replayed chain, its pathwise gradient against finite differences, the closed-form optimum."""

import dataclasses
import json
import types

import pytest
import torch

from rl_diffusion import memory
from rl_diffusion.algos.draft import DRaFT
from rl_diffusion.cli import main
from tests.test_kl_objective import A, D, NoStep, T, batch_of, closed_form_setup, optimal_theta


class TinyEps(torch.nn.Module):
    """A small nonlinear noise predictor, so that mu_theta - mu_ref depends on the state."""

    def __init__(self, seed: int, hidden: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_in = torch.nn.Parameter(torch.randn(hidden, D, generator=g) * 0.7)
        self.time = torch.nn.Parameter(torch.randn(T + 1, hidden, generator=g) * 0.3)
        self.w_out = torch.nn.Parameter(torch.randn(D, hidden, generator=g) * 0.3)

    def forward(self, x, t, c=None):
        return torch.tanh(x @ self.w_in.T + self.time[t]) @ self.w_out.T


def smooth_reward(x0, c=None):
    return torch.sin(x0[:, 0]) - (x0[:, 1] - 1.0) ** 2


def tiny_setup(beta: float, draft_steps: int) -> types.SimpleNamespace:
    """The closed-form Setup with a nonlinear policy and reference (float64) and a smooth reward."""
    run = closed_form_setup(beta, algo="draft", algo_args={"draft_steps": draft_steps})
    run.config = dataclasses.replace(run.config, minibatch_size=7 * T)
    run.policy = run.synced_policy = TinyEps(0).double()
    run.reference = TinyEps(1).double().requires_grad_(False)
    run.reward = smooth_reward
    return run


def objective(run, xs: torch.Tensor, noises: torch.Tensor, start: int) -> torch.Tensor:
    """J = mean over chains of r(x_0) - beta sum_k kl_k, written out independently of the module: states
    xs[k] (recorded) before step `start`, reparameterised with the fixed noises from it on."""
    x, kl = xs[start], 0.0
    for k, t in enumerate(range(T, 0, -1)):
        state = xs[k] if k < start else x
        ours = run.diffusion.reverse_step(run.policy(state, t), state, t, noise=noises[k])
        ref = run.diffusion.reverse_step(run.reference(state, t), state, t, x_prev=ours.x_prev)
        kl = kl + ((ours.mean - ref.mean) ** 2).sum(1) / (2 * ours.sigma**2)
        if k >= start:
            x = ours.x_prev
    return (run.reward(x) - run.config.kl_coef * kl).mean()


@pytest.mark.parametrize("draft_steps", [0, 1, 4])
def test_gradient_equals_finite_differences_of_the_objective(draft_steps):
    # float64 throughout; K = 0 (all steps) is the exact pathwise gradient, K = 1 and 4 that of the truncated J
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        run = tiny_setup(beta=0.3, draft_steps=draft_steps)
        chains = 12
        with torch.no_grad():
            traj = run.diffusion.sample(
                run.policy, (chains, D), generator=torch.Generator().manual_seed(3), record=True
            )
        g = torch.Generator().manual_seed(3)  # the same draws as sample: x_T, then one noise per step
        noises = torch.stack([torch.randn(chains, D, generator=g) for _ in range(T + 1)])[1:]
        algo = DRaFT(run)
        algo.optimizer = NoStep()
        stats = algo.update(batch_of(run, traj, run.reward(traj.xs[-1])), torch.Generator())
        grads = [-p.grad for p in run.policy.parameters()]  # the loss is -J
        start = T - (draft_steps or T)
        with torch.no_grad():
            assert stats["loss/policy"] == pytest.approx(-objective(run, traj.xs, noises, start).item(), rel=1e-10)
            params = list(run.policy.parameters())
            directions = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(3)]
            for v in directions:
                h = 1e-5
                for p, d in zip(params, v, strict=True):
                    p += h * d
                up = objective(run, traj.xs, noises, start)
                for p, d in zip(params, v, strict=True):
                    p -= 2 * h * d
                down = objective(run, traj.xs, noises, start)
                for p, d in zip(params, v, strict=True):
                    p += h * d
                finite_difference = (up - down) / (2 * h)
                pathwise = sum((gr * d).sum() for gr, d in zip(grads, v, strict=True))
                assert pathwise.item() == pytest.approx(finite_difference.item(), rel=1e-6, abs=1e-9)
    finally:
        torch.set_default_dtype(default)


def test_the_gradient_does_not_depend_on_how_the_batch_is_split():
    # --memory-mib sets the groups the chains are replayed in and whether each step is checkpointed; the
    # accumulated gradient is the same up to rounding (float64)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        grads, plans, budgets = [], [], [1e6]  # MiB: all chains at once
        while budgets:
            run = tiny_setup(beta=0.3, draft_steps=0)
            run.config = dataclasses.replace(run.config, memory_mib=budgets.pop(0))
            with torch.no_grad():
                traj = run.diffusion.sample(
                    run.policy, (12, D), generator=torch.Generator().manual_seed(3), record=True
                )
            algo = DRaFT(run)
            algo.optimizer, algo.in_use_mib = NoStep(), 0.0  # the budget is the chains' alone
            stats = algo.update(batch_of(run, traj, run.reward(traj.xs[-1])), torch.Generator())
            plans.append((stats["draft/replays"], stats["draft/checkpointed"]))
            grads.append(torch.cat([p.grad.flatten() for p in run.policy.parameters()]))
            if len(grads) == 1:  # then a budget that holds one chain of T steps but not two, and one that holds none
                chain = T * algo.step_bytes / memory.MIB
                budgets = [1.5 * chain, 0.5 * chain]
        assert plans[:2] == [(1.0, 0.0), (12.0, 0.0)] and plans[2][1] == 1.0, plans
        for other in grads[1:]:
            torch.testing.assert_close(other, grads[0], rtol=1e-12, atol=1e-14)
    finally:
        torch.set_default_dtype(default)


def test_the_plan_counts_what_a_whole_replay_keeps_for_backward():
    # each replayed step keeps the policy's activations and, its state depending on theta, the reference's: the
    # estimate per chain and step, times the steps and chains, is what the replay of every chain keeps
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        run = tiny_setup(beta=0.3, draft_steps=0)
        with torch.no_grad():
            traj = run.diffusion.sample(run.policy, (12, D), generator=torch.Generator().manual_seed(3), record=True)
        batch = batch_of(run, traj, run.reward(traj.xs[-1]))
        algo = DRaFT(run)
        algo.in_use_mib = 0.0
        (chains,), checkpointed = algo.plan(batch)
        assert len(chains) == 12 and not checkpointed
        kept = memory.saved_bytes(lambda: algo.replay(batch, chains, checkpointed=False))
        # at most: the first step's state is the recorded one, so its reference keeps nothing
        assert kept <= T * 12 * algo.step_bytes <= 1.1 * kept
    finally:
        torch.set_default_dtype(default)


def test_last_step_only_sends_the_reward_gradient_to_t_equals_1():
    # linear-Gaussian chain, r = A . x_0, beta = 0, K = 1: x_0 = mu_theta(x_1, 1) + sigma z, so d r / d theta_t
    # is b_1 A at t = 1 and 0 elsewhere, b_1 the eps coefficient of the last step's mean
    run = closed_form_setup(0.0, algo="draft", algo_args={"draft_steps": 1})
    run.reward = lambda x0, c=None: x0 @ A
    with torch.no_grad():
        run.policy.theta.normal_(generator=torch.Generator().manual_seed(0))
        traj = run.diffusion.sample(run.policy, (16, D), generator=torch.Generator().manual_seed(1), record=True)
    algo = DRaFT(run)
    algo.optimizer = NoStep()
    algo.update(batch_of(run, traj, traj.xs[-1] @ A), torch.Generator())
    b1 = run.diffusion.np["mean_coef_eps"][1]
    expected = torch.zeros(T + 1, D)
    expected[1] = -b1 * A
    torch.testing.assert_close(run.policy.theta.grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("draft_steps", [0, 5])
def test_replay_reproduces_the_sampled_chain_and_its_path_kl(draft_steps):
    run = closed_form_setup(0.5, algo="draft", algo_args={"draft_steps": draft_steps})
    with torch.no_grad():
        run.policy.theta.normal_(generator=torch.Generator().manual_seed(0))
        traj = run.diffusion.sample(run.policy, (32, D), generator=torch.Generator().manual_seed(1), record=True)
    batch = batch_of(run, traj, traj.xs[-1] @ A)
    x0, kl = DRaFT(run).replay(batch, torch.arange(32), checkpointed=False)
    torch.testing.assert_close(x0.detach(), batch.x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(kl.detach(), batch.kl.sum(0), rtol=1e-5, atol=1e-6)
    assert batch.kl.sum().item() > 1  # the policy is far from the reference: a KL to compare


def test_replay_reproduces_x0_of_the_pretrained_network(pretrained_moons, tmp_path):
    from tests.test_ddpo import make_setup

    run = make_setup(pretrained_moons, tmp_path, algo="draft", algo_args={"draft_steps": 0})
    algo = DRaFT(run)
    pairs, x0, _ = algo.sample(torch.Generator().manual_seed(0))
    batch = types.SimpleNamespace(pairs=pairs, K=20)
    replayed, kl = algo.replay(batch, torch.arange(32), checkpointed=True)
    torch.testing.assert_close(replayed.detach(), x0, rtol=0, atol=1e-5)
    assert kl.abs().max().item() < 1e-8  # the policy is the pretrained model


def test_gradient_ascent_converges_to_the_kl_regularised_optimum():
    # the linear-Gaussian chain: with K = all the pathwise gradient of E[A . x_0] - beta KL is exact, and
    # here even noise-free, so AdamW reaches theta*
    beta = 0.5
    run = closed_form_setup(beta, algo="draft", algo_args={"draft_steps": 0}, lr=0.05)
    run.reward = lambda x0, c=None: x0 @ A
    algo = DRaFT(run)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        with torch.no_grad():
            traj = run.diffusion.sample(run.policy, (8, D), generator=g, record=True)
        algo.update(batch_of(run, traj, traj.xs[-1] @ A), g)
    optimum = optimal_theta(run.diffusion, beta)[1:]
    error = (run.policy.theta.detach()[1:] - optimum).abs().max().item()
    assert error < 1e-3 * optimum.abs().max().item(), (error, optimum.abs().max().item())


def test_short_run_raises_mean_reward(pretrained_moons, tmp_path):
    out = tmp_path / "draft"
    args = ["finetune", "--run", str(pretrained_moons), "--out", str(out), "--algo", "draft"]
    args += ["--reward", "target_point", "--reward-arg", "point=[1.5, 1.5]", "--chains", "32", "--epochs", "5"]
    args += ["--lr", "3e-3", "--kl-coef", "0.01", "--draft-steps", "0", "--eval-samples", "1000", "--quiet"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 0.3, metrics
    ckpt = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)
    history = ckpt["train_state"]["history"]
    assert len(history) == 5 and history[-1]["reward/mean"] > history[0]["reward/mean"]
    # the replayed reward is the sampled one (before the update of the same epoch)
    assert history[0]["draft/reward"] == pytest.approx(history[0]["reward/mean"], abs=1e-4)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--draft-steps", "-1"], "--draft-steps must be >= 0"),
        (["--draft-steps", "21"], "--draft-steps 21 exceeds the 20 steps of the chain"),
        (["--reward", "tests.reward_plugin_example:factory"], "does not declare itself differentiable"),
    ],
)
def test_bad_settings_are_one_error_line(pretrained_moons, tmp_path, capsys, flags, message):
    args = ["finetune", "--run", str(pretrained_moons), "--out", str(tmp_path / "r"), "--algo", "draft", "--quiet"]
    assert main([*args, "--epochs", "1", "--chains", "8", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "r").exists()  # refused before anything is written
