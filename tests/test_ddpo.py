import dataclasses
import json

import numpy as np
import pytest
import torch

from rl_diffusion.algos import ddpo, rwr
from rl_diffusion.algos.base import Algorithm, Batch
from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.cli import main
from rl_diffusion.diffusion import GaussianDiffusion
from rl_diffusion.evaluation import tilted_target
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.path_kl import path_kls, policy_step
from rl_diffusion.run import setup


def make_setup(pretrained, tmp_path, **overrides):
    cfg = FinetuneConfig(
        run=str(pretrained), reward="target_point", reward_args={"point": [1.5, 1.5]}, chains=32, **overrides
    )
    return setup(cfg, tmp_path / "ft", overwrite=True)


def test_ratio_is_exactly_one_before_the_first_update(pretrained_moons, tmp_path):
    run = make_setup(pretrained_moons, tmp_path, minibatch_size=100)
    assert not run.policy.training  # sampling and rescoring see one network (no dropout noise between them)
    pairs, x0, _ = Algorithm(run).sample(torch.Generator().manual_seed(0))
    assert len(pairs) == 32 * 20 and x0.shape == (32, 2)
    idx = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1))[:100]
    with torch.no_grad():
        new = policy_step(run.diffusion, run.config, run.policy, pairs, idx).log_prob
    assert torch.equal(torch.exp(new - pairs.log_prob_old[idx]), torch.ones(100))


def test_path_kl_is_zero_unchanged_and_matches_a_hand_computation(pretrained_moons, tmp_path):
    run = make_setup(pretrained_moons, tmp_path)
    pairs, _, _ = Algorithm(run).sample(torch.Generator().manual_seed(0))
    assert path_kls(run.diffusion, run.config, run.policy, run.reference, pairs, 20).abs().max().item() == 0.0
    # the policy means recorded while sampling are the ones a fresh policy call gives
    with torch.no_grad():
        called = policy_step(run.diffusion, run.config, run.policy, pairs, torch.arange(len(pairs))).mean
    torch.testing.assert_close(pairs.mean_old, called, rtol=0, atol=1e-6)
    pairs = dataclasses.replace(pairs, mean_old=None)  # so path_kls calls the policy below
    run.diffusion.x0_range = None  # the closed form below is that of the unclipped mean

    class Shifted(torch.nn.Module):  # eps_theta = eps_ref + delta
        def forward(self, x, t, c=None):
            return run.reference(x, t, c) + torch.tensor([0.1, -0.2])

    kl = path_kls(run.diffusion, run.config, Shifted(), run.reference, pairs, 20)
    # mu = x_t / sqrt(alpha_t) - beta_t / (sqrt(1 - abar_t) sqrt(alpha_t)) eps, so the means differ by coef_t * delta
    d = run.diffusion.np
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
    w = rwr.rwr_weights(rewards, temperature=0.5)
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
    # non-uniform weights: sum_b w_b ||eps_b - eps_theta||^2 / D, from the same t and eps drawn by hand
    w = torch.rand(64, generator=torch.Generator().manual_seed(2))
    w /= w.sum()
    x_t, t, noise = d.noised(x0, torch.Generator().manual_seed(1), slice(None))
    by_hand = (w * ((0.5 * x_t - noise) ** 2).mean(1)).sum()
    weighted = d.training_loss(model, x0, generator=torch.Generator().manual_seed(1), weights=w)
    assert weighted.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)  # the weights matter


def test_batch_advantages_without_kl_are_those_of_the_rewards_at_every_step(pretrained_moons, tmp_path):
    # the baseline and scale themselves are checked by hand in test_kl_objective.py; here, the batch's wiring
    run = make_setup(pretrained_moons, tmp_path)
    pairs, x0, _ = Algorithm(run).sample(torch.Generator().manual_seed(0))
    rewards = run.reward(x0)
    kl = path_kls(run.diffusion, run.config, run.policy, run.reference, pairs, 20)
    for c in (None, torch.arange(32) % 2):
        adv, scale = ddpo.batch_advantages(run, Batch(pairs, x0, c, rewards, kl, 20), 0.0)
        assert adv.shape == kl.shape == (20, 32) and kl.abs().max().item() == 0.0
        expected, expected_scale = ddpo.advantages(rewards[None], c, run.config.adv_clip)
        torch.testing.assert_close(adv, expected.expand(20, -1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
        # within a group, a higher reward has a higher advantage
        group = torch.zeros(32, dtype=torch.long) if c is None else c
        for k in group.unique():
            r, a = rewards[group == k], adv[0, group == k]
            assert torch.equal(r.argsort(), a.argsort())


@pytest.mark.parametrize("algo", ["ddpo-is", "ddpo-sf", "rwr"])
def test_short_run_raises_mean_reward(pretrained_moons, tmp_path, algo):
    out = tmp_path / algo
    lr = {"ddpo-is": "3e-4", "ddpo-sf": "1e-3", "rwr": "1e-3"}[algo]
    args = [
        "finetune",
        "--run",
        str(pretrained_moons),
        "--out",
        str(out),
        "--algo",
        algo,
        "--reward",
        "target_point",
        "--reward-arg",
        "point=[1.5, 1.5]",
        "--chains",
        "64",
        "--epochs",
        "8",
        "--lr",
        lr,
        "--minibatch-size",
        "256",
        "--rwr-temperature",
        "0.3",
        "--eval-samples",
        "1000",
        "--quiet",
    ]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 0.3, metrics
    history = torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)["train_state"][
        "history"
    ]
    assert len(history) == 8 and history[-1]["reward/mean"] > history[0]["reward/mean"]


def finetune_ddim(pretrained, out, point: list[float], *args: str) -> list[dict]:
    """`rl-diffusion finetune` with ddpo-is towards `point` (64 chains, 8 epochs, DDIM with 5 steps);
    its per-epoch history."""
    assert (
        main(
            [
                "finetune",
                "--run",
                str(pretrained),
                "--out",
                str(out),
                "--algo",
                "ddpo-is",
                "--reward",
                "target_point",
                "--reward-arg",
                f"point={point}",
                "--sampler",
                "ddim",
                "--sampling-steps",
                "5",
                "--chains",
                "64",
                "--epochs",
                "8",
                "--lr",
                "1e-3",
                "--quiet",
                *args,
            ]
        )
        == 0
    )
    return torch.load(sorted((out / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)["train_state"]["history"]


def test_ddim_run_rescores_its_log_probs_exactly_and_raises_the_reward(pretrained_moons, tmp_path):
    # the default minibatch (1024) holds all 64 x 5 pairs: one gradient step per epoch, every ratio taken before it
    history = finetune_ddim(pretrained_moons, tmp_path / "ddim", [1.5, 1.5])
    assert len(history) == 8
    # ratio = 1 exactly: approx_kl = mean((r - 1) - log r) is 0 and nothing is clipped
    assert max(h["ppo/approx_kl"] for h in history) < 1e-10 and max(h["ppo/clipfrac"] for h in history) == 0.0
    metrics = json.loads((tmp_path / "ddim" / "metrics.json").read_text())
    # measured (seed 0): -1.92 -> -0.73 on 5000 DDIM samples; -1.94 -> -0.83 over the epochs
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 0.5, metrics
    assert history[-1]["reward/mean"] > history[0]["reward/mean"] + 0.5
    assert metrics["kl_to_pretrained"] > 0


def test_kl_term_holds_the_policy_near_the_pretrained_model(pretrained_moons, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "rl_diffusion.algos.loop.finish_run", lambda run: run.writer.close() or {}
    )  # 5 s of evaluation, not tested here
    far = [-3.0, -2.3]  # 2.1 from the nearest data point, 5 from the average one
    free = finetune_ddim(pretrained_moons, tmp_path / "free", far, "--kl-coef", "0")
    held = finetune_ddim(pretrained_moons, tmp_path / "held", far, "--kl-coef", "1")

    def last(history: list[dict], key: str) -> float:
        return float(np.mean([h[key] for h in history[-2:]]))

    start = free[0]["reward/mean"]  # the pretrained model's batch: identical in both runs
    assert held[0]["reward/mean"] == start
    # measured (seed 0): reward -5.1 -> -1.0 (free) and -3.9 (held); path KL 89 (free) and 1.6 (held)
    assert last(free, "reward/mean") > start + 2.5  # the unregularised samples pile up towards the point
    assert start + 0.3 < last(held, "reward/mean") < last(free, "reward/mean") - 1.5
    assert last(free, "kl/to_pretrained") > 20
    assert last(held, "kl/to_pretrained") < last(free, "kl/to_pretrained") / 10


def test_tilted_target_resamples_by_exp_reward_over_beta():
    pool = np.array([[0.0, 0.0], [1.0, 0.0]])
    samples, ess = tilted_target(pool, np.array([0.0, np.log(3.0)]), kl_coef=1.0, num_samples=40_000, seed=0)
    assert (samples[:, 0] == 1.0).mean() == pytest.approx(0.75, abs=0.01)  # weights 1 : 3
    assert ess == pytest.approx(1 / (0.25**2 + 0.75**2))
    # beta = 0.5: weights exp(r / beta) = 1 : 9, not exp(r * beta) = 1 : sqrt(3)
    samples, ess = tilted_target(pool, np.array([0.0, np.log(3.0)]), kl_coef=0.5, num_samples=40_000, seed=0)
    assert (samples[:, 0] == 1.0).mean() == pytest.approx(0.9, abs=0.01)
    assert ess == pytest.approx(1 / (0.1**2 + 0.9**2))


def test_final_evaluation_draws_eval_samples_or_is_skipped(pretrained_moons, tmp_path):
    base = ["finetune", "--run", str(pretrained_moons), "--reward", "target_point", "--chains", "32"]
    base += ["--epochs", "2", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "evaluated"), "--eval-samples", "300"]) == 0
    metrics = json.loads((tmp_path / "evaluated" / "metrics.json").read_text())
    assert metrics["num_samples"] == 300 and metrics["reward_queries"] == 64 and "kl_to_pretrained" in metrics
    assert main([*base, "--out", str(tmp_path / "skipped"), "--no-final-eval"]) == 0
    skipped = json.loads((tmp_path / "skipped" / "metrics.json").read_text())
    assert skipped["final_evaluation"].startswith("skipped") and skipped["reward_queries"] == 64
    assert "kl_to_pretrained" not in skipped and "num_samples" not in skipped
    assert (tmp_path / "skipped" / "figures" / "finetune.png").exists()
    history = CheckpointManager(tmp_path / "skipped").load_latest()["train_state"]["history"]
    assert skipped["reward_mean"] == history[-1]["reward/mean"]
