"""ddpo-is with --kl-return path: the chain's soft return less a running log Z, so exploratory chains keep the optimum.

The closed-form case of tests/test_kl_objective.py (a linear-Gaussian DDPM, reward a . x_0, optimum theta*)
with chains drawn at sigma times an exploration scale: the path return's expected update still vanishes at
theta*, the step return's does not (why --explore-scale refuses it).
"""

import dataclasses
import json
import math

import pytest
import torch

from rl_diffusion.algos import ddpo
from rl_diffusion.algos.exploration import explore_scale
from rl_diffusion.cli import main
from rl_diffusion.path_kl import policy_step
from tests.test_kl_objective import A, D, NoStep, T, batch_of, closed_form_setup, optimal_theta
from tests.test_rtb import loop_batch, tilted_setup

BETA = 0.5


def ddpo_is(run, **settings) -> ddpo.ImportanceSampling:
    run.config = dataclasses.replace(run.config, algo="ddpo-is", algo_args=settings)
    algo = ddpo.ImportanceSampling(run)
    algo.optimizer = NoStep()
    return algo


def expected_update(run, algo, scale: float, chains: int, repeats: int) -> torch.Tensor:
    """The mean over `repeats` batches of the update's gradient on theta, chains drawn at sigma x scale."""
    total, generator = torch.zeros(T + 1, D), torch.Generator().manual_seed(0)
    for _ in range(repeats):
        with torch.no_grad():
            traj = run.diffusion.sample(
                run.policy, (chains, D), generator=generator, record=True, noise_scale=scale, **run.config.sampling
            )
        run.policy.theta.grad = None
        algo.update(batch_of(run, traj, traj.xs[-1] @ A), generator)
        total += run.policy.theta.grad
    return total / repeats


def fixed_point(kl_return: str, scale: float, chains: int = 2048, repeats: int = 4) -> float:
    """lambda at which the expected update along theta* vanishes, from the updates at lambda = 1 and 0.5."""
    run = closed_form_setup(BETA, adv_clip=1e9)
    optimum, h = optimal_theta(run.diffusion, BETA), {}
    for lam in (1.0, 0.5):
        algo = ddpo_is(run, kl_return=kl_return)  # log Z starts afresh; the exploration is applied here
        with torch.no_grad():
            run.policy.theta.copy_(lam * optimum)
        h[lam] = (expected_update(run, algo, scale, chains, repeats) * optimum).sum().item()
    return 1.0 - h[1.0] * 0.5 / (h[1.0] - h[0.5])


def test_the_path_return_aims_at_the_optimum_from_exploratory_chains():
    assert fixed_point("path", scale=1.0) == pytest.approx(1.0, abs=0.08)  # on-policy
    assert fixed_point("path", scale=2.0) == pytest.approx(1.0, abs=0.08)
    # the step return (KL-to-go and the direct KL term) from the same chains aims elsewhere
    assert abs(fixed_point("step", scale=2.0) - 1.0) > 0.3


def test_every_path_advantage_is_zero_at_the_exact_tilted_policy():
    """At p_theta = p_ref exp(r / beta) / Z every chain's soft return r / beta - log p_theta / p_ref is log Z."""
    run, log_z = tilted_setup(3.0, chains=64, minibatch_size=100)
    algo = ddpo_is(run, kl_return="path", explore_scale=3.0)
    pairs, x0, c = algo.sample(torch.Generator().manual_seed(0))
    assert x0.std(0).mean().item() == pytest.approx(3.0 * run.diffusion.np["reverse_sigma"][1], rel=0.25)
    batch = loop_batch(run, pairs, x0, c)
    adv, _ = algo.advantages(batch)
    assert adv.abs().max().item() < 1e-3
    assert algo.log_z.item() == pytest.approx(log_z, abs=1e-3)  # started at the batch's log-mean-exp: exact here
    step_adv, _ = ddpo.batch_advantages(run, batch, BETA)  # standardised: O(1) whatever the policy
    assert step_adv.abs().max().item() > 1


def test_path_advantages_and_the_running_log_z_by_hand():
    log_z = torch.full((2,), math.nan, dtype=torch.float64)
    # label 0 starts at log mean exp(0, log 3) = log 2; advantages -log 2 and log 3 - log 2, mean -0.1438
    soft = torch.tensor([0.0, math.log(3)], dtype=torch.float64)
    adv = ddpo.path_advantages(soft, log_z, torch.tensor([0, 0]), 5.0, 0.1)
    assert adv.tolist() == pytest.approx([-math.log(2), math.log(1.5)])
    assert log_z[0].item() == pytest.approx(math.log(2) + 0.1 * (math.log(0.75) / 2) / 5)
    assert log_z[1].isnan()  # no chain of label 1 yet
    # clipped at 1 nat; label 1 starts at its one chain's return (advantage 0); label 0 moves 0.1 x (1 - 1) / 2 = 0
    before = log_z[0].item()
    soft = torch.tensor([10.0, -10.0, 2.0], dtype=torch.float64)
    adv = ddpo.path_advantages(soft, log_z, torch.tensor([0, 0, 1]), 1.0, 0.1)
    assert adv.tolist() == pytest.approx([1.0, -1.0, 0.0])
    assert log_z.tolist() == pytest.approx([before, 2.0])
    # every chain above log Z: it rises by the whole step
    ddpo.path_advantages(torch.tensor([50.0, 60.0], dtype=torch.float64), log_z, torch.tensor([1, 1]), 1.0, 0.1)
    assert log_z[1].item() == pytest.approx(2.1)


def test_the_path_update_is_the_gradient_of_minus_the_advantage_times_the_chain_log_prob():
    run = closed_form_setup(0.7, adv_clip=1e9)
    algo = ddpo_is(run, kl_return="path")
    with torch.no_grad():
        run.policy.theta.copy_(0.3 * torch.randn(T + 1, D, generator=torch.Generator().manual_seed(1)))
        traj = run.diffusion.sample(run.policy, (6, D), generator=torch.Generator().manual_seed(2), record=True)
    batch = batch_of(run, traj, traj.xs[-1] @ A)
    log_pi = traj.log_probs.sum(0)  # [B] log p_theta(tau) of the policy that drew them
    log_ref = batch.log_ratio.sum(0) + log_pi
    soft = batch.rewards / 0.7 + log_ref - log_pi
    adv = soft - (torch.logsumexp(soft, 0) - math.log(6))  # the first batch: log Z at its log-mean-exp
    # one minibatch of every pair (ratio 1): the mean over K B pairs of -A log pi, and no direct KL term
    log_prob = policy_step(run.diffusion, run.config, run.policy, batch.pairs, torch.arange(T * 6)).log_prob
    (expected,) = torch.autograd.grad(-(adv.repeat(T) * log_prob).mean(), run.policy.theta)
    stats = algo.update(batch, torch.Generator())
    torch.testing.assert_close(run.policy.theta.grad, expected, rtol=1e-4, atol=1e-6)
    assert expected.abs().max() > 0.01
    assert stats["ppo/log_z"] == pytest.approx(algo.log_z.item())


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kl-return", "path", "--kl-coef", "1", "--log-z-step", "0"], "--log-z-step must be positive"),
        (["--explore-scale", "2"], "--explore-scale > 1 needs --kl-return path"),
        (["--kl-return", "path"], "--kl-return path needs --kl-coef > 0"),
        (["--kl-return", "chain", "--kl-coef", "1"], "unknown --kl-return 'chain'"),
        (["--kl-return", "path", "--kl-coef", "1", "--log-prob-reduction", "mean"], "--log-prob-reduction sum"),
        (["--kl-return", "path", "--kl-coef", "1", "--explore-scale", "0.5"], "--explore-scale must be >= 1"),
    ],
)
def test_bad_settings_are_refused(pretrained_moons, tmp_path, capsys, flags, message):
    out = tmp_path / "refused"
    assert main(["finetune", "--run", str(pretrained_moons), "--out", str(out), "--quiet", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_short_exploring_run_follows_the_schedule_and_raises_the_reward(pretrained_moons, tmp_path):
    out = tmp_path / "ddpo-path"
    flags = ["--reward", "target_point", "--reward-arg", "point=[1.5, 1.5]", "--chains", "64", "--epochs", "8"]
    flags += ["--kl-coef", "0.1", "--kl-return", "path", "--explore-scale", "1.5"]
    flags += ["--explore-epochs", "2", "--explore-decay-epochs", "4", "--no-final-eval"]
    assert main(["finetune", "--run", str(pretrained_moons), "--out", str(out), "--quiet", *flags]) == 0
    history = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)["train_state"][
        "history"
    ]
    schedule = [explore_scale(e, 1.5, 2, 4) for e in range(8)]
    assert [h["ppo/explore_scale"] for h in history] == pytest.approx(schedule)
    assert all(math.isfinite(h["ppo/log_z"]) for h in history)
    assert schedule == pytest.approx([1.5, 1.5, 1.5, 1.375, 1.25, 1.125, 1, 1])
    assert history[-1]["reward/mean"] > history[0]["reward/mean"] + 0.3, [h["reward/mean"] for h in history]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["kl_return"], saved["explore_scale"]) == ("path", 1.5)
