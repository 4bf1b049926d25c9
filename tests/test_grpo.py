"""Flow-GRPO: group-relative advantages, the loss and its gradient against hand computations, the trained window,
labels in groups."""

import torch

from rl_diffusion.algos.grpo import FlowGRPO, group_advantages, window_start
from rl_diffusion.cli import main
from rl_diffusion.path_kl import policy_step, reference_scores
from tests.test_kl_objective import A, D, NoStep, batch_of, closed_form_setup


def test_group_advantages_standardise_within_each_group():
    # group 1: mean 2.5, std sqrt(1.25); group 2 all equal: advantages 0 (not 0 / 0); then clipped at 1
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    s = 1.25**0.5
    expected = torch.tensor([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(rewards, 4, 5.0), expected)
    torch.testing.assert_close(group_advantages(rewards, 4, 1.0), expected.clamp(-1, 1))


def test_the_window_starts_at_zero_without_a_shift_and_wraps_around_with_one():
    assert [window_start(e, 10, 4, 0) for e in range(3)] == [0, 0, 0]
    assert [window_start(e, 10, 4, 3) for e in range(5)] == [0, 3, 6, 2, 5]  # 7 possible starts: 0..6
    run = closed_form_setup(0.0, algo="flow-grpo", algo_args={"group_size": 4, "train_steps": 4, "window_shift": 3})
    algo = FlowGRPO(run)
    algo.epoch = 2  # steps 6..9 of each of 3 chains: rows k * 3 + b
    assert algo.training_rows(10, 3, torch.Generator()).tolist() == list(range(18, 30))


def chains(run, B: int = 8):
    with torch.no_grad():
        run.policy.theta.normal_(generator=torch.Generator().manual_seed(0))
        return run.diffusion.sample(run.policy, (B, D), generator=torch.Generator().manual_seed(1), record=True)


def steps(run, traj):
    """(log pi_theta(x_{k+1} | x_k), kl_k to the reference) of every step [K, B], written out here."""
    log_probs, kls = [], []
    for k, (t, t_prev) in enumerate(zip(traj.timesteps.tolist(), traj.prev_timesteps.tolist(), strict=True)):
        x, t_batch = traj.xs[k], torch.full((traj.xs.shape[1],), t)
        ours = run.diffusion.reverse_step(run.policy(x, t_batch), x, t_batch, t_prev=t_prev, x_prev=traj.xs[k + 1])
        ref = run.diffusion.reverse_step(run.reference(x, t_batch), x, t_batch, t_prev=t_prev, x_prev=traj.xs[k + 1])
        log_probs.append(ours.log_prob)
        kls.append((ours.mean - ref.mean).square().sum(1) / (2 * ours.sigma**2))
    return torch.stack(log_probs), torch.stack(kls)


def test_the_loss_is_the_clipped_surrogate_plus_beta_times_each_steps_kl():
    # at pi = pi_old each pair's surrogate is -A_b, whose mean over a group is 0: the loss is beta times the mean
    # step KL to the reference; its gradient is that of mean over pairs of (-A_b log pi + beta kl_k)
    beta, B = 0.3, 8
    run = closed_form_setup(beta, algo="flow-grpo", algo_args={"group_size": 4})
    traj = chains(run, B)
    rewards = traj.xs[-1] @ A
    algo = FlowGRPO(run)
    algo.optimizer = NoStep()
    stats = algo.update(batch_of(run, traj, rewards), torch.Generator().manual_seed(2))
    got = run.policy.theta.grad.clone()

    groups = rewards.reshape(2, 4)
    adv = ((groups - groups.mean(1, keepdim=True)) / groups.std(1, correction=0, keepdim=True)).flatten()
    run.policy.zero_grad()
    log_probs, kls = steps(run, traj)
    assert kls.mean() > 0.01 and stats["ppo/clipfrac"] == 0.0
    assert abs(stats["loss/policy"] - beta * kls.mean().item()) < 1e-5 * beta * kls.mean().item()
    (-adv * log_probs + beta * kls).mean().backward()
    torch.testing.assert_close(got, run.policy.theta.grad, rtol=1e-5, atol=1e-7)


def test_a_class_conditional_models_labels_come_in_blocks_of_the_group_size():
    run = closed_form_setup(0.0, algo="flow-grpo", chains=12, algo_args={"group_size": 4})
    run.policy.num_classes, run.data_shape = 10, (D,)  # the linear model ignores its label
    _, _, c = FlowGRPO(run).sample(torch.Generator().manual_seed(0))
    c = c.tolist()
    assert len(c) == 12 and all(len(set(c[i : i + 4])) == 1 for i in (0, 4, 8)) and len(set(c)) > 1


def test_ode_outside_the_window_steps_deterministically_and_the_path_kl_counts_the_window():
    """MixGRPO's chains: --eta in the window of trained steps (scored by the one reverse step), eta = 0 elsewhere
    (x_prev is the mean, no density); the path KL counts the window's steps only."""
    settings = {"group_size": 4, "train_steps": 3, "window_shift": 2, "ode_outside_window": True}
    run = closed_form_setup(0.1, algo="flow-grpo", chains=8, sampler="ddim", sampling_steps=10, algo_args=settings)
    run.data_shape = (D,)
    with torch.no_grad():  # a policy away from the reference, so that every step's KL is positive
        run.policy.theta.normal_(generator=torch.Generator().manual_seed(0))
    algo = FlowGRPO(run)
    algo.epoch = 3  # the window starts at 3 * 2 = 6 of the 8 possible starts: steps 6, 7, 8
    assert algo.step_etas() == [0.0] * 6 + [1.0] * 3 + [0.0]
    pairs, _, _ = algo.sample(torch.Generator().manual_seed(1))
    K, B = 10, 8
    window = torch.tensor([k in (6, 7, 8) for k in range(K)])
    assert pairs.stochastic.reshape(K, B).equal(window[:, None].expand(K, B))
    moved = (pairs.x_prev - pairs.mean_old).norm(dim=1).reshape(K, B)
    assert (moved[~window] == 0).all() and (moved[window] > 0).all()
    assert (pairs.log_prob_old.reshape(K, B)[~window] == 0).all()
    rows = algo.training_rows(K, B, torch.Generator())
    assert rows.tolist() == list(range(6 * B, 9 * B))
    with torch.no_grad():
        step = policy_step(run.diffusion, run.config, run.policy, pairs, rows)
    torch.testing.assert_close(step.log_prob, pairs.log_prob_old[rows])
    kl, log_ratio = reference_scores(run.diffusion, run.config, run.policy, run.reference, pairs, K)
    assert (kl[~window] == 0).all() and (kl[window] > 0).all() and (log_ratio[~window] == 0).all()


def test_ode_outside_the_window_needs_a_window_and_a_sampler_with_a_deterministic_eta_0(pretrained_moons, tmp_path):
    args = ["finetune", "--run", str(pretrained_moons), "--out", str(tmp_path / "x"), "--algo", "flow-grpo"]
    args += ["--reward", "target_point", "--ode-outside-window"]
    assert main([*args, "--sampler", "ddim"]) == 2
    assert main([*args, "--train-steps", "4"]) == 2  # the default ddpm sampler has no deterministic eta
    assert not (tmp_path / "x").exists()
