"""IW-distill (importance-weighted denoising): its weights, effective sample size and tempering against closed
forms, the exact path weights at a known optimum, and tiny end-to-end runs."""

import dataclasses
import json
import math

import pytest
import torch

from rl_diffusion.algos.iw_distill import effective_sample_size, self_normalised, tempered_lambda
from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.cli import main
from rl_diffusion.finetune import FinetuneConfig, config_for
from rl_diffusion.path_kl import Pairs, reference_scores
from tests.test_kl_objective import A, D, batch_of, closed_form_setup, optimal_theta


def test_self_normalised_weights_and_effective_sample_size_match_closed_forms():
    w = self_normalised(torch.tensor([0.0, math.log(3.0)]), None)
    assert w.tolist() == pytest.approx([0.25, 0.75])
    assert effective_sample_size(w) == pytest.approx(1 / (0.25**2 + 0.75**2))  # 1.6
    assert effective_sample_size(self_normalised(torch.zeros(8), None)) == pytest.approx(8)
    # with labels each class keeps its share of the pool: the optimum of a conditional model tilts within a class
    w = self_normalised(torch.tensor([0.0, math.log(3.0), 5.0, 5.0]), torch.tensor([0, 0, 1, 1]))
    assert w.tolist() == pytest.approx([1 / 8, 3 / 8, 1 / 4, 1 / 4])


def test_tempered_lambda_keeps_the_target_effective_sample_size():
    rewards = torch.linspace(-3, 3, 1000)
    log_ratio = torch.zeros(1000, dtype=torch.float64)

    def ess(lam: float) -> float:
        return effective_sample_size(self_normalised(lam * rewards.double(), None)) / 1000

    lam = tempered_lambda(rewards, log_ratio, None, 0.0, 10.0, 0.5)
    assert 0 < lam < 10 and ess(10.0) < 0.5
    assert ess(lam) == pytest.approx(0.5, abs=1e-9)  # bisection lands on the target
    assert tempered_lambda(rewards, log_ratio, None, 0.0, 0.1, 0.5) == 0.1  # the full tilt keeps enough: no stage
    assert tempered_lambda(rewards, log_ratio, None, 5.0, 10.0, 0.5) == 5.0  # already short: stay, do not go back


def test_path_weights_of_the_exact_optimum_are_uniform():
    """At the policy whose path measure is P_pre exp(r / beta) / Z (tests.test_kl_objective's closed form), the
    weights exp(r / beta) P_pre / P_theta of its own chains are all Z: effective sample size N. beta != 1, so a
    tilt by r * beta instead of r / beta would not be uniform."""
    beta = 0.5
    run = closed_form_setup(beta)
    with torch.no_grad():
        run.policy.theta.copy_(optimal_theta(run.diffusion, beta))
        traj = run.diffusion.sample(run.policy, (4096, D), generator=torch.Generator().manual_seed(0), record=True)
    pairs = Pairs.from_trajectory(traj)
    kl, log_ratio = reference_scores(run.diffusion, run.config, run.policy, run.reference, pairs, len(traj.timesteps))
    rewards = traj.xs[-1] @ A
    log_w = rewards.double() / beta + log_ratio.sum(0).double()
    assert log_w.std() < 0.01 and (rewards.double() * beta + log_ratio.sum(0).double()).std() > 0.5  # float32 steps
    assert log_ratio.sum(0).mean() == pytest.approx(-kl.sum(0).mean().item(), rel=0.05)  # E_theta log ratio = -KL
    assert effective_sample_size(self_normalised(log_w, None)) == pytest.approx(4096, rel=1e-4)


class PlusOne:
    """An optimizer whose every step adds 1 to the parameter."""

    def __init__(self, parameter: torch.Tensor):
        self.parameter = parameter

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        with torch.no_grad():
            self.parameter += 1.0


def test_the_stage_model_is_the_moving_average_of_the_steps_weights():
    # an optimizer that moves theta by +1 per step: with decay 1/2 the average after 3 steps is
    # w0 + (1/2)(1/2)(1/2 * 1 + 1/2 * 2) ... = w0 + 2.125 (1/2 (w0 + 1.25) + 1/2 (w0 + 3)); decay 0 keeps w0 + 3
    from rl_diffusion.algos.iw_distill import ImportanceWeightedDistillation

    for decay, moved in ((0.5, 2.125), (0.0, 3.0)):
        run = closed_form_setup(1.0, algo="iw-distill", algo_args={"distill_steps": 3, "distill_ema": decay})
        run.config = dataclasses.replace(run.config, minibatch_size=8)
        with torch.no_grad():
            traj = run.diffusion.sample(run.policy, (16, D), generator=torch.Generator().manual_seed(0), record=True)
        batch = batch_of(run, traj, traj.xs[-1] @ A)
        batch.log_ratio = torch.zeros_like(batch.kl)
        algo = ImportanceWeightedDistillation(run)
        start = run.policy.theta.detach().clone()

        algo.optimizer = PlusOne(run.policy.theta)
        algo.update(batch, torch.Generator().manual_seed(1))
        torch.testing.assert_close(run.policy.theta.detach(), start + moved)


def test_the_minibatches_are_drawn_in_proportion_to_the_weights():
    # the update fits the weighted loss by resampling: rewards (0, ..., 0, 50, 0) at beta 1 put the weight
    # 1 - 15 e^-50 on chain 14, so every row of every minibatch is its x_0; with equal rewards the 16 chains
    # share each minibatch of 4,000 rows about equally (1/16 each, +- 4 binomial standard deviations)
    from rl_diffusion.algos.iw_distill import ImportanceWeightedDistillation

    for rewards in (torch.zeros(16).index_fill_(0, torch.tensor([14]), 50.0), torch.zeros(16)):
        run = closed_form_setup(1.0, algo="iw-distill", algo_args={"distill_steps": 2, "ess_target": 1e-6})
        run.config = dataclasses.replace(run.config, minibatch_size=4000)
        with torch.no_grad():
            traj = run.diffusion.sample(run.policy, (16, D), generator=torch.Generator().manual_seed(0), record=True)
        batch = batch_of(run, traj, rewards)
        batch.log_ratio = torch.zeros_like(batch.kl)
        fitted, loss = [], run.diffusion.training_loss

        def recording_loss(model, x0, *args, fitted=fitted, loss=loss, **kwargs):
            fitted.append(x0)
            return loss(model, x0, *args, **kwargs)

        run.diffusion.training_loss = recording_loss
        ImportanceWeightedDistillation(run).update(batch, torch.Generator().manual_seed(1))
        rows = torch.cat(fitted)
        counts = (rows[:, None, :] == batch.x0[None]).all(-1).sum(0).double()  # [16] rows equal to each chain's x_0
        assert counts.sum() == len(rows) == 8000
        if rewards.max() > 0:
            assert counts[14] == 8000
        else:
            share = counts / len(rows)
            assert (share - 1 / 16).abs().max() < 4 * math.sqrt((1 / 16) * (15 / 16) / len(rows))


def test_iw_distill_has_its_own_defaults_under_the_flags():
    config = config_for({"algo": "iw-distill", "run": "missing"})
    assert (config.epochs, config.kl_coef, config.lr, config.minibatch_size) == (3, 1.0, 5e-4, 512)
    assert config_for({"algo": "iw-distill", "run": "missing", "epochs": 7}).epochs == 7  # a flag wins
    assert config_for({"algo": "ddpo-is", "run": "missing"}).epochs == FinetuneConfig.epochs


def run_iw_distill(pretrained, out, *extra) -> dict:
    args = ["finetune", "--run", str(pretrained), "--out", str(out), "--algo", "iw-distill", "--quiet"]
    args += ["--reward", "target_point", "--reward-arg", "point=[1.5,1.5]", "--pool-size", "256"]
    args += ["--distill-steps", "30", "--minibatch-size", "128", *extra]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def test_iw_distill_tempers_towards_beta_and_counts_its_pools(pretrained_moons, tmp_path, capsys):
    metrics = run_iw_distill(pretrained_moons, tmp_path / "r", "--kl-coef", "0.05", "--ess-target", "0.5")
    history = CheckpointManager(tmp_path / "r").load_latest()["train_state"]["history"]
    lambdas = [h["iw/lambda"] for h in history]
    assert 0 < lambdas[0] < 20 and lambdas == sorted(lambdas)  # stages: a tilt at beta_1 > beta first
    assert [h["iw/ess_fraction"] for h in history][0] == pytest.approx(0.5, abs=1e-6)
    assert metrics["reward_queries"] == 3 * 256  # every pool scored
    assert history[-1]["reward/mean"] > history[0]["reward/mean"]  # the pools move towards the reward
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"]
    assert "warning: iw-distill" not in capsys.readouterr().err


def test_iw_distill_warns_when_its_weights_degenerate(pretrained_moons, tmp_path, capsys):
    run_iw_distill(pretrained_moons, tmp_path / "r", "--kl-coef", "0.0005", "--ess-target", "0.001", "--epochs", "1")
    err = capsys.readouterr().err
    assert err.count("warning: iw-distill's weights keep") == 1 and "--pool-size" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kl-coef", "0"], "needs --kl-coef > 0"),
        (["--ess-target", "0"], "--ess-target must be"),
        (["--pool-size", "1"], "--pool-size must be"),
        (["--distill-ema", "1"], "--distill-ema must be in [0, 1)"),
        (["--kl-target", "3"], "--kl-target adapts none"),
    ],
)
def test_iw_distill_refuses_settings_it_cannot_use(pretrained_moons, tmp_path, capsys, flags, message):
    args = ["finetune", "--run", str(pretrained_moons), "--out", str(tmp_path / "r"), "--algo", "iw-distill", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and not (tmp_path / "r").exists()
