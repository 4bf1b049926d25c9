"""RTB (relative trajectory balance): its loss at the known optimum, its surrogate gradient, its fixed point."""

import dataclasses
import json
import math

import pytest
import torch

from rl_diffusion.algos.base import Batch, lr_factor
from rl_diffusion.algos.exploration import explore_scale
from rl_diffusion.algos.rtb import RelativeTrajectoryBalance, initial_log_z, relative_tb_delta
from rl_diffusion.cli import main
from rl_diffusion.path_kl import policy_step, reference_scores
from tests.test_kl_objective import A, D, NoStep, T, batch_of, closed_form_setup, optimal_theta

BETA = 0.5
M = torch.tensor([0.3, -0.2])


class ConstantMean(torch.nn.Module):
    """The noise prediction whose DDPM reverse step has the mean means[t] whatever x_t: a memoryless chain."""

    def __init__(self, diffusion, means: torch.Tensor):
        super().__init__()
        d = diffusion.np
        self.register_buffer("a", torch.tensor(d["mean_coef_x"], dtype=torch.float32))
        self.register_buffer("b", torch.tensor(d["mean_coef_eps"], dtype=torch.float32))
        self.means = torch.nn.Parameter(means.clone())

    def forward(self, x, t, c=None):
        return (self.means[t] - self.a[t, None] * x) / self.b[t, None]


def rtb_setup(beta: float, settings: dict, **config):
    """tests.test_kl_objective's closed-form Setup (DDPM, T = 10, D = 2) with these rtb settings and
    FinetuneConfig fields."""
    run = closed_form_setup(beta)
    run.config = dataclasses.replace(run.config, algo="rtb", algo_args=settings, **config)
    run.data_shape = (D,)
    return run


def tilted_setup(explore_scale: float, **config):
    """A reference whose every step has a constant mean (x_1's is M), and the policy that tilts its last
    step by sigma_1^2 A / beta: p_theta(tau) = p_ref(tau) exp(A . x_0 / beta) / Z exactly, with
    log Z = A . M / beta + sigma_1^2 |A|^2 / (2 beta^2) (the earlier steps cancel in the ratio)."""
    run = rtb_setup(BETA, {"replay_size": 0, "explore_scale": explore_scale}, **config)
    means = torch.zeros(T + 1, D)
    means[1] = M
    sigma2 = run.diffusion.np["reverse_sigma"][1] ** 2
    run.reference = ConstantMean(run.diffusion, means).requires_grad_(False)
    tilted = means.clone()
    tilted[1] += sigma2 * A / BETA
    run.policy = run.synced_policy = ConstantMean(run.diffusion, tilted)
    log_z = (A @ M).item() / BETA + sigma2 * (A @ A).item() / (2 * BETA**2)
    return run, log_z


def loop_batch(run, pairs, x0, c) -> Batch:
    """The loop's Batch of the chains `sample` drew, rewarded A . x_0: with their path KLs and log-ratios."""
    kl, log_ratio = reference_scores(run.diffusion, run.config, run.policy, run.reference, pairs, run.steps_per_chain)
    return Batch(pairs, x0, c, x0 @ A, kl, run.steps_per_chain, log_ratio)


def deltas(algo, batch) -> torch.Tensor:
    pairs, rewards, _ = algo.training_chains(batch, torch.Generator())
    N = len(rewards)
    log_ratio = algo.chain_log_probs(algo.run.policy, pairs, N) - algo.chain_log_probs(algo.run.reference, pairs, N)
    return relative_tb_delta(algo.log_z.detach(), log_ratio, rewards, algo.run.config.kl_coef)


def test_the_residual_is_log_z_plus_the_path_log_ratio_minus_r_over_beta_by_hand():
    # delta = log Z + sum_k log pi_theta / pi_ref - r / beta: 0.5 + 1 - 1 / 0.5 and 0.5 - 2 - 3 / 0.5
    delta = relative_tb_delta(torch.tensor(0.5), torch.tensor([1.0, -2.0]), torch.tensor([1.0, 3.0]), beta=0.5)
    assert delta.tolist() == pytest.approx([-0.5, -7.5])


@pytest.mark.parametrize("explore_scale", [1.0, 3.0])
def test_the_exact_tilted_policy_and_log_z_balance_every_chain(explore_scale):
    run, log_z = tilted_setup(explore_scale, chains=64, minibatch_size=100)
    algo = RelativeTrajectoryBalance(run)
    with torch.no_grad():
        algo.log_z.fill_(log_z)
    pairs, x0, c = algo.sample(torch.Generator().manual_seed(0))
    batch = loop_batch(run, pairs, x0, c)
    delta = deltas(algo, batch)
    assert delta.abs().max().item() < 2e-4, delta
    spread = x0.std(0).mean().item()
    expected_spread = explore_scale * run.diffusion.np["reverse_sigma"][1]
    assert spread == pytest.approx(expected_spread, rel=0.25)  # the chains were drawn at sigma * S
    with torch.no_grad():
        algo.log_z.fill_(log_z + 0.7)  # a wrong log Z: delta is its error on every chain, the loss its square
    delta = deltas(algo, batch)
    torch.testing.assert_close(delta, torch.full_like(delta, 0.7), atol=2e-4, rtol=0)
    assert delta.square().mean().item() == pytest.approx(0.49, abs=3e-4)


def sampled_batch(run, chains: int, seed: int) -> Batch:
    with torch.no_grad():
        traj = run.diffusion.sample(
            run.policy, (chains, D), generator=torch.Generator().manual_seed(seed), record=True, **run.config.sampling
        )
    return batch_of(run, traj, traj.xs[-1] @ A)


def huber(delta: torch.Tensor, clip: float) -> torch.Tensor:
    """delta^2 within [-clip, clip], then on in a straight line (2 clip |delta| - clip^2); clip 0: delta^2."""
    if clip == 0:
        return delta.square()
    return torch.where(delta.abs() <= clip, delta.square(), 2 * clip * delta.abs() - clip**2)


@pytest.mark.parametrize("replay, clip", [(True, 0.0), (False, 0.0), (False, 1.5)])
def test_surrogate_gradient_is_the_gradient_of_the_mean_squared_delta(replay, clip):
    # with replay the update rescores every chain; without, its log-ratio is the loop's (batch.log_ratio);
    # --delta-clip makes the loss Huber's
    settings = {"replay_size": 8 if replay else 0, "replay_fraction": 0.5, "delta_clip": clip}
    run = rtb_setup(0.7, settings, minibatch_size=7)
    with torch.no_grad():
        run.policy.theta.copy_(0.3 * torch.randn(T + 1, D, generator=torch.Generator().manual_seed(1)))
    algo = RelativeTrajectoryBalance(run)
    algo.optimizer, algo.log_z_ready = NoStep(), True
    with torch.no_grad():
        algo.log_z.fill_(0.4)
    algo.training_chains(sampled_batch(run, 8, seed=2), torch.Generator())  # fills the buffer with 8 chains
    buffer, batch = algo.buffer, sampled_batch(run, 6, seed=3)
    # autograd of mean delta^2 over the same chains: the 6 fresh ones and, with replay, 6 drawn from the buffer
    pairs, rewards, replayed = algo.training_chains(batch, torch.Generator().manual_seed(4))
    N = len(rewards)
    assert (replayed, N) == ((6, 12) if replay else (0, 6))
    log_pi = policy_step(run.diffusion, run.config, run.policy, pairs, torch.arange(len(pairs))).log_prob
    log_ref = policy_step(run.diffusion, run.config, run.reference, pairs, torch.arange(len(pairs))).log_prob
    delta = algo.log_z + (log_pi - log_ref).reshape(T, N).sum(0) - rewards / 0.7
    if clip:
        assert (delta.abs() > clip).any() and (delta.abs() < clip).any(), delta  # both sides of the threshold
    loss = huber(delta, clip).mean()
    theta_grad, log_z_grad = torch.autograd.grad(loss, [run.policy.theta, algo.log_z])
    algo.buffer = None if buffer is None else dict(buffer)
    stats = algo.update(batch, torch.Generator().manual_seed(4))
    assert stats["loss/policy"] == pytest.approx(delta.square().mean().item(), rel=1e-5)  # logged: mean delta^2
    assert stats["rtb/replayed"] == replayed
    torch.testing.assert_close(run.policy.theta.grad, theta_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(algo.log_z.grad, log_z_grad, rtol=1e-5, atol=1e-6)
    assert theta_grad.abs().max() > 0.1  # a gradient worth comparing


def test_training_from_theta_zero_moves_towards_the_closed_form_optimum():
    run = rtb_setup(BETA, {"log_z_lr": 0.05, "replay_size": 256, "explore_scale": 1.5}, lr=0.05, chains=128)
    optimum = optimal_theta(run.diffusion, BETA)[1:]
    algo = RelativeTrajectoryBalance(run)
    generator = torch.Generator().manual_seed(0)

    def distance() -> float:
        return ((run.policy.theta[1:] - optimum).norm() / optimum.norm()).item()

    assert distance() == pytest.approx(1.0)
    for _ in range(60):
        pairs, x0, c = algo.sample(generator)
        algo.update(loop_batch(run, pairs, x0, c), generator)
    assert distance() < 0.25  # measured: 0.038 after 60 epochs
    # log Z -> log E_pre exp(A . x_0 / beta) = v |A|^2 / (2 beta^2), v the variance of the pretrained chain's x_0
    # (0.19 on this 10-step chain, not S^2): measured 0.376 against 0.385
    with torch.no_grad():
        x0 = run.diffusion.sample(run.reference, (20000, D), generator=torch.Generator().manual_seed(1)).xs[-1]
    assert algo.log_z.item() == pytest.approx((x0 @ A).var().item() / (2 * BETA**2), abs=0.05)


def finetune(pretrained, out, *flags: str) -> list[str]:
    return ["finetune", "--run", str(pretrained), "--out", str(out), "--algo", "rtb", "--quiet", *flags]


def test_short_run_raises_mean_reward(pretrained_moons, tmp_path):
    out = tmp_path / "rtb"
    flags = ["--reward", "target_point", "--reward-arg", "point=[1.5, 1.5]", "--chains", "64", "--epochs", "8"]
    flags += ["--kl-coef", "0.1", "--lr", "3e-3", "--minibatch-size", "1024", "--explore-scale", "1.5"]
    flags += ["--replay-size", "64", "--explore-epochs", "2", "--explore-decay-epochs", "4"]
    # the squared balance: at beta = 0.1 nearly every chain's |delta| is above a Huber threshold of 10 nats (the
    # default is 3), where each pulls as one at it, and 8 epochs did not raise the reward (measured at 10: -2.39
    # from -2.34)
    flags += ["--delta-clip", "0", "--lr-decay", "0.4"]
    assert main(finetune(pretrained_moons, out, *flags)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    history = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)["train_state"][
        "history"
    ]
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 0.3, metrics
    assert len(history) == 8 and history[-1]["reward/mean"] > history[0]["reward/mean"]
    assert history[-1]["rtb/replayed"] == 64 and history[0]["rtb/replayed"] == 0
    assert [h["rtb/explore_scale"] for h in history] == pytest.approx([1.5, 1.5, 1.5, 1.375, 1.25, 1.125, 1, 1])
    # --lr-decay 0.4: constant for 5 epochs, then (8 - epoch) / 3.2 of 3e-3
    assert [h["train/lr"] for h in history] == pytest.approx([3e-3] * 5 + [3e-3 * f for f in (0.9375, 0.625, 0.3125)])


def test_the_learning_rate_falls_over_the_last_fraction_of_the_run():
    assert [lr_factor(e, 10, 0.4) for e in range(10)] == pytest.approx([1] * 6 + [1, 0.75, 0.5, 0.25])
    assert [lr_factor(e, 10, 0.0) for e in range(10)] == [1.0] * 10  # 0: constant
    assert [lr_factor(e, 4, 1.0) for e in range(4)] == pytest.approx([1, 0.75, 0.5, 0.25])  # the whole run


def test_initial_log_z_is_the_log_mean_exp_of_the_weights():
    beta = 0.5
    rewards = torch.tensor([0.0, 0.5 * math.log(3.0)])  # r / beta = 0, log 3
    assert initial_log_z(torch.zeros(2), rewards, beta).item() == pytest.approx(math.log(2.0))
    # a chain the policy favours over the reference by log 2 counts half: log((1 + 3 / 2) / 2)
    log_ratio = torch.tensor([0.0, math.log(2.0)])
    assert initial_log_z(log_ratio, rewards, beta).item() == pytest.approx(math.log(1.25))


def test_the_first_update_starts_log_z_at_log_e_pre_exp_r_over_beta():
    """On the pretrained chain, log Z = log E_pre exp(A . x_0 / beta) = v |A|^2 / (2 beta^2) (v the variance of
    its x_0): the first batch's estimate lands there, where the mean of r / beta (0 here) would not."""
    run = rtb_setup(BETA, {"explore_scale": 1.0}, chains=4096, minibatch_size=1 << 16)  # on-policy chains
    algo = RelativeTrajectoryBalance(run)
    algo.optimizer = NoStep()
    generator = torch.Generator().manual_seed(0)
    pairs, x0, c = algo.sample(generator)
    algo.update(loop_batch(run, pairs, x0, c), generator)
    v = (x0 @ A).var().item()
    assert algo.log_z.item() == pytest.approx(v / (2 * BETA**2), abs=0.03)  # 0.385 on this chain


def test_the_exploration_schedule_holds_then_decays_to_on_policy():
    assert [explore_scale(e, 3.0, 2, 4) for e in range(8)] == [3, 3, 3, 2.5, 2, 1.5, 1, 1]
    assert [explore_scale(e, 3.0, 2, 0) for e in range(4)] == [3, 3, 1, 1]  # no decay: on-policy at once
    assert {explore_scale(e, 3.0, 0, 4) for e in range(50)} == {3.0}  # no hold: the whole run


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kl-coef", "0"], "--kl-coef > 0"),
        (["--kl-coef", "1", "--log-z-lr", "0"], "--log-z-lr must be positive"),
        (["--kl-coef", "1", "--replay-fraction", "1"], "--replay-fraction must be in [0, 1)"),
        (["--kl-coef", "1", "--replay-fraction", "-0.1"], "--replay-fraction must be in [0, 1)"),
        (["--kl-coef", "1", "--replay-size", "-1"], "--replay-size must be >= 0"),
        (["--kl-coef", "1", "--explore-scale", "0.5"], "--explore-scale must be >= 1"),
        (["--kl-coef", "1", "--delta-clip", "-1"], "--delta-clip must be >= 0"),
        (["--kl-coef", "1", "--log-prob-reduction", "mean"], "--log-prob-reduction sum"),
        (["--kl-coef", "1", "--sampler", "ddim", "--eta", "0.5"], "memoryless"),
    ],
)
def test_bad_settings_are_refused(tmp_path, capsys, flags, message):
    assert main(finetune(tmp_path / "missing", tmp_path / "out", *flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()
