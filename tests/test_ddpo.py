import dataclasses
import json

import numpy as np
import pytest
import torch

from rl_diffusion import ddpo
from rl_diffusion.cli import main
from rl_diffusion.diffusion import GaussianDiffusion
from rl_diffusion.evaluation import evaluate_finetuned, tilted_target
from rl_diffusion.finetune import FinetuneConfig, setup


def make_setup(pretrained, tmp_path, **overrides):
    cfg = FinetuneConfig(run=str(pretrained), reward="target_point", reward_args={"point": [1.5, 1.5]}, chains=32, **overrides)
    return setup(cfg, tmp_path / "ft", overwrite=True)


def test_ratio_is_exactly_one_before_the_first_update(pretrained_moons, tmp_path):
    s = make_setup(pretrained_moons, tmp_path, minibatch_size=100)
    pairs, x0, _ = ddpo.sample_batch(s, torch.Generator().manual_seed(0))
    assert len(pairs) == 32 * 20 and x0.shape == (32, 2)
    idx = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1))[:100]
    with torch.no_grad():
        new = ddpo.policy_step(s.diffusion, s.config, s.policy, pairs, idx).log_prob
    assert torch.equal(torch.exp(new - pairs.log_prob_old[idx]), torch.ones(100))


def test_path_kl_is_zero_unchanged_and_matches_a_hand_computation(pretrained_moons, tmp_path):
    s = make_setup(pretrained_moons, tmp_path)
    pairs, _, _ = ddpo.sample_batch(s, torch.Generator().manual_seed(0))
    assert ddpo.path_kls(s.diffusion, s.config, s.policy, s.reference, pairs, 20).abs().max().item() == 0.0
    # the policy means recorded while sampling are the ones a fresh policy call gives
    with torch.no_grad():
        called = ddpo.policy_step(s.diffusion, s.config, s.policy, pairs, torch.arange(len(pairs))).mean
    torch.testing.assert_close(pairs.mean_old, called, rtol=0, atol=1e-6)
    pairs = dataclasses.replace(pairs, mean_old=None)  # so path_kls calls the policy below

    class Shifted(torch.nn.Module):  # eps_theta = eps_ref + delta
        def forward(self, x, t, c=None):
            return s.reference(x, t, c) + torch.tensor([0.1, -0.2])

    kl = ddpo.path_kls(s.diffusion, s.config, Shifted(), s.reference, pairs, 20)
    # mu = x_t / sqrt(alpha_t) - beta_t / (sqrt(1 - abar_t) sqrt(alpha_t)) eps, so the means differ by coef_t * delta
    d = s.diffusion.np
    t = np.arange(20, 0, -1)
    coef, sigma = d["mean_coef_eps"][t], d["reverse_sigma"][t]
    expected = (coef**2 * (0.1**2 + 0.2**2) / (2 * sigma**2)).astype(np.float32)
    np.testing.assert_allclose(kl[:, 0].numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose(kl.sum(0).numpy(), expected.sum(), rtol=1e-4)


def test_clipped_objective_equals_a_hand_computed_value():
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5])
    log_ratio = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.9]))
    loss, approx_kl, clipped = ddpo.ppo_terms(adv, log_ratio, torch.zeros(4), clip_range=0.2)
    # per pair max(-A r, -A clip(r)): 1*: max(-1.5, -1.2) = -1.2; -1*: max(1.5, 1.2) = 1.5;
    # 2*: max(-1.0, -1.6) = -1.0; -0.5*: max(0.45, 0.45) = 0.45
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -1.0, 0.45]))
    assert loss.mean().item() == pytest.approx((-1.2 + 1.5 - 1.0 + 0.45) / 4)
    r = np.array([1.5, 1.5, 0.5, 0.9])
    np.testing.assert_allclose(approx_kl.numpy(), (r - 1) - np.log(r), rtol=1e-6)
    assert clipped.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_rwr_weights_are_a_softmax_summing_to_one():
    rewards = torch.tensor([0.0, 1.0, 2.0])
    w = ddpo.rwr_weights(rewards, temperature=0.5)
    assert w.sum().item() == pytest.approx(1.0)
    e = np.exp(np.array([0.0, 2.0, 4.0]))
    np.testing.assert_allclose(w.numpy(), e / e.sum(), rtol=1e-6)


def test_weighted_training_loss_with_uniform_weights_is_the_mean_loss():
    d = GaussianDiffusion("linear", 10)
    model = lambda x, t, c=None: 0.5 * x  # noqa: E731
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    plain = d.training_loss(model, x0, generator=torch.Generator().manual_seed(1))
    weighted = d.training_loss(model, x0, generator=torch.Generator().manual_seed(1), weights=torch.full((64,), 1 / 64))
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-6)


def test_advantages_standardise_rewards_without_kl(pretrained_moons, tmp_path):
    s = make_setup(pretrained_moons, tmp_path)
    pairs, x0, _ = ddpo.sample_batch(s, torch.Generator().manual_seed(0))
    rewards = s.reward(x0)
    adv, kl, scale = ddpo.advantages(s, pairs, rewards, None, 20)
    expected = (rewards - rewards.mean()) / rewards.std(correction=0)
    assert adv.shape == (20, 32)
    torch.testing.assert_close(adv[7], expected.clamp(-5, 5), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scale, torch.full((32,), rewards.std(correction=0).item()), rtol=1e-5, atol=0)

    # class labels: each class is standardised on its own statistics
    c = torch.arange(32) % 2
    adv, _, scale = ddpo.advantages(s, pairs, rewards, c, 20)
    for k in (0, 1):
        r = rewards[c == k]
        torch.testing.assert_close(adv[3, c == k], ((r - r.mean()) / r.std(correction=0)).clamp(-5, 5), rtol=1e-4, atol=1e-5)
        assert scale[c == k][0].item() == pytest.approx(r.std(correction=0).item(), rel=1e-5)


@pytest.mark.parametrize("algo", ["ddpo-is", "ddpo-sf", "rwr"])
def test_short_run_raises_mean_reward(pretrained_moons, tmp_path, algo):
    out = tmp_path / algo
    lr = {"ddpo-is": "3e-4", "ddpo-sf": "1e-3", "rwr": "1e-3"}[algo]
    args = ["finetune", "--run", str(pretrained_moons), "--out", str(out), "--algo", algo, "--reward", "target_point",
            "--reward-arg", "point=[1.5, 1.5]", "--chains", "64", "--epochs", "8", "--lr", lr, "--minibatch-size", "256",
            "--rwr-temperature", "0.3", "--quiet"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 0.3, metrics
    history = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)["train_state"]["history"]
    assert len(history) == 8 and history[-1]["reward/mean"] > history[0]["reward/mean"]


def test_kl_regularised_run_moves_towards_the_tilted_optimum(pretrained_moons, tmp_path):
    out = tmp_path / "kl"
    args = ["finetune", "--run", str(pretrained_moons), "--out", str(out), "--algo", "ddpo-is", "--reward", "target_point",
            "--reward-arg", "point=[1.5, 1.5]", "--kl-coef", "0.5", "--chains", "128", "--epochs", "15", "--lr", "3e-4",
            "--minibatch-size", "512", "--quiet"]
    assert main(args) == 0
    m = evaluate_finetuned(out, num_samples=2000)
    assert m["tilted_sw2"] < 0.7 * m["tilted_sw2_pretrained"], m
    assert m["kl_to_pretrained"] > 0


def test_tilted_target_resamples_by_exp_reward_over_beta():
    pool = np.array([[0.0, 0.0], [1.0, 0.0]])
    samples, ess = tilted_target(pool, np.array([0.0, np.log(3.0)]), kl_coef=1.0, num_samples=40_000, seed=0)
    assert (samples[:, 0] == 1.0).mean() == pytest.approx(0.75, abs=0.01)  # weights 1 : 3
    assert ess == pytest.approx(1 / (0.25**2 + 0.75**2))
