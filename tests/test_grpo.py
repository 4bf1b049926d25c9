"""Flow-GRPO: group-relative advantages, the loss and its gradient against hand computations, the trained window,
labels in groups."""

import torch

from rl_diffusion.algos.grpo import FlowGRPO, group_advantages, window_start
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
