"""stable-baselines3 PPO on the denoising MDP: exact log-probs, the VecEnv adapter, a tiny real run."""

import functools
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_checker import check_env
from stable_baselines3.common.logger import Logger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_diffusion.algos.sb3 import DenoisingVecEnvAdapter, DiffusionPolicy, make_ppo, train
from rl_diffusion.checkpoint import CheckpointManager, load_run
from rl_diffusion.cli import main
from rl_diffusion.diffusion import GaussianDiffusion
from rl_diffusion.env import DenoisingEnv, DenoisingVectorEnv
from rl_diffusion.errors import UserError
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.models import MLPEps
from rl_diffusion.run import Setup, setup

TARGET = [1.5, 1.5]  # in the gap between the two moons: off the data


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These runs are tiny: on 2 shared cores, more torch threads only contend (10 s vs 2 min to pretrain)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny moons DDPM (T = 20) trained with the real CLI in about 10 s."""
    out = tmp_path_factory.mktemp("pretrained")
    # --ema-decay 0: after only 300 steps an EMA still carries much of the untrained network
    assert (
        main(
            [
                "pretrain",
                "--dataset",
                "moons",
                "--out",
                str(out),
                "--steps",
                "300",
                "--num-timesteps",
                "20",
                "--hidden-size",
                "64",
                "--ema-decay",
                "0",
                "--eval-every",
                "300",
                "--eval-samples",
                "500",
                "--no-final-eval",
                "--quiet",
            ]
        )
        == 0
    )
    return out


def make_setup(pretrained: Path, out: Path, resume: bool = False, **overrides) -> Setup:
    fields = dict(
        run=str(pretrained),
        algo="sb3-ppo",
        reward="target_point",
        reward_args={"point": TARGET},
        chains=16,
        epochs=1,
        seed=0,
    )
    return setup(FinetuneConfig(**{**fields, **overrides}), out, resume=resume)


@pytest.mark.filterwarnings("ignore:.*symmetric and normalized.*", "ignore:.*infinity.*")
@pytest.mark.parametrize("action_mode", ["sample", "residual", "noise"])
def test_sb3_check_env_passes_on_the_env_of_a_pretrained_run(pretrained, action_mode):
    check_env(DenoisingEnv(run=pretrained, reward_kwargs={"point": TARGET}, action_mode=action_mode))


@pytest.mark.parametrize("sampler, sampling_steps", [("ddpm", 0), ("ddim", 5)])
def test_policy_log_prob_is_the_reverse_step_log_prob_at_every_t(pretrained, tmp_path, sampler, sampling_steps):
    run = make_setup(pretrained, tmp_path, sampler=sampler, sampling_steps=sampling_steps, eta=0.7)
    model = make_ppo(run)
    policy, env = model.policy, model.env.env
    assert env.timesteps[-1] == 1 and len(env.timesteps) == (5 if sampler == "ddim" else 20)
    per_t = 6
    t = torch.tensor(env.timesteps).repeat_interleave(per_t)
    t_prev = torch.tensor(env.prev_timesteps).repeat_interleave(per_t)
    g = torch.Generator().manual_seed(0)
    x, actions = 2 * torch.randn(len(t), 2, generator=g), 2 * torch.randn(len(t), 2, generator=g)
    with torch.no_grad():
        expected = run.diffusion.reverse_step(
            run.policy(x, t), x, t, t_prev=t_prev, sampler=sampler, eta=0.7, x_prev=actions
        )
        # t as SB3 may hand it over: float [N, 1] (some buffers) or int64 [N, 1] (fresh from the env)
        for t_obs in (t.float()[:, None], t[:, None]):
            _, log_prob, entropy = policy.evaluate_actions({"x": x, "t": t_obs}, actions)
            torch.testing.assert_close(log_prob, expected.log_prob)
        sampled, _, sampled_log_prob = policy({"x": x, "t": t[:, None]})
        rescored = run.diffusion.reverse_step(
            run.policy(x, t), x, t, t_prev=t_prev, sampler=sampler, eta=0.7, x_prev=sampled
        )
    torch.testing.assert_close(sampled_log_prob, rescored.log_prob)
    # fixed-sigma Gaussian entropy, against torch.distributions
    normal = torch.distributions.Normal(expected.mean, expected.sigma[:, None].expand_as(expected.mean))
    torch.testing.assert_close(entropy, normal.entropy().sum(1))


def test_a_conditional_policy_reads_the_label_from_env_or_buffer_observations():
    diffusion, eps_model = (
        GaussianDiffusion("linear", 10),
        MLPEps(num_timesteps=10, hidden_size=16, emb_size=8, num_classes=3),
    )
    vec = DenoisingVectorEnv(num_envs=4, action_mode="sample", diffusion=diffusion, data_shape=(2,), num_classes=3)
    policy = DiffusionPolicy(
        vec.single_observation_space,
        vec.single_action_space,
        lambda _: 1e-3,
        eps_model=eps_model,
        diffusion=diffusion,
        timesteps=vec.timesteps,
    )
    vec.reset(seed=0)
    obs = {key: torch.as_tensor(value) for key, value in vec.observation().items()}  # c: int64 [N]
    buffered = {"x": obs["x"], "t": obs["t"].float(), "c": obs["c"].float()[:, None]}  # c: float [N, 1]
    actions = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = diffusion.reverse_step(
            eps_model(obs["x"], obs["t"][:, 0], obs["c"]), obs["x"], 10, x_prev=actions
        ).log_prob
        for o in (obs, buffered):
            values, log_prob, _ = policy.evaluate_actions(o, actions)
            torch.testing.assert_close(log_prob, expected)
            assert values.shape == (4, 1)
    assert policy.features_dim == 2 + 1 + 3  # critic input: x, t / T, one-hot c


def test_the_actor_is_the_pretrained_network_unchanged_with_no_learned_std(pretrained, tmp_path):
    run = make_setup(pretrained, tmp_path, lr=3e-4)
    policy = make_ppo(run).policy
    assert policy.eps_model is run.policy
    for name, weight in load_run(pretrained).model.state_dict().items():
        assert torch.equal(policy.eps_model.state_dict()[name], weight), name  # no orthogonal re-init
    names = [name for name, _ in policy.named_parameters()]
    assert all(name.startswith(("eps_model.", "value_net.")) for name in names) and "log_std" not in names
    optimized = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in policy.parameters()}
    assert policy.optimizer.param_groups[0]["lr"] == 3e-4


def test_ppo_ratio_is_exactly_one_before_the_first_update(pretrained, tmp_path):
    run = make_setup(pretrained, tmp_path, chains=32, minibatch_size=128)
    model = make_ppo(run)
    _, callback = model._setup_learn(model.n_steps * run.config.chains)  # seeds and resets the env as learn() does
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    model.policy.set_training_mode(True)
    with torch.no_grad():
        ratio = torch.cat(
            [
                torch.exp(model.policy.evaluate_actions(batch.observations, batch.actions)[1] - batch.old_log_prob)
                for batch in model.rollout_buffer.get(model.batch_size)
            ]
        )
    assert len(ratio) == 20 * 32
    assert (ratio - 1).abs().max() < 1e-5
    assert torch.equal(ratio, torch.ones_like(ratio))


def bounded_env(monkeypatch, action_bound: float) -> list[torch.Tensor]:
    """make_ppo's env with +-action_bound; returns the list that collects the state x after every env step."""
    executed = []
    step_tensor = DenoisingVectorEnv.step_tensor

    def record(self, action):
        out = step_tensor(self, action)
        executed.append(self.x.clone())
        return out

    monkeypatch.setattr(
        "rl_diffusion.algos.sb3.DenoisingVectorEnv", functools.partial(DenoisingVectorEnv, action_bound=action_bound)
    )
    monkeypatch.setattr(DenoisingVectorEnv, "step_tensor", record)
    return executed


def test_the_rollout_buffer_holds_the_executed_actions_and_their_log_probs(pretrained, tmp_path, monkeypatch):
    executed = bounded_env(monkeypatch, action_bound=0.5)  # x_T ~ N(0, I): most chains start outside the box
    run = make_setup(pretrained, tmp_path, chains=16, sampler="ddim", sampling_steps=5, eta=0.8)
    model = make_ppo(run)
    _, callback = model._setup_learn(model.n_steps * 16)
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    buffer = model.rollout_buffer
    actions = torch.as_tensor(buffer.actions)  # [steps, chains, 2]
    torch.testing.assert_close(actions, torch.stack(executed), rtol=0, atol=0)
    on_bound = (actions.abs() == 0.5).float().mean().item()
    assert on_bound > 0.25  # the clamp was exercised (measured: 0.54)
    x, t = (
        torch.as_tensor(buffer.observations["x"]).flatten(0, 1),
        torch.as_tensor(buffer.observations["t"]).flatten().long(),
    )
    with torch.no_grad():
        expected = run.diffusion.reverse_step(
            run.policy(x, t),
            x,
            t,
            t_prev=model.policy.prev_timestep[t],
            sampler="ddim",
            eta=0.8,
            x_prev=actions.flatten(0, 1),
        )
    torch.testing.assert_close(torch.as_tensor(buffer.log_probs).flatten(), expected.log_prob)


def test_clipped_fraction_counts_the_coordinates_the_policy_clamped(pretrained, tmp_path, monkeypatch):
    monkeypatch.setattr("rl_diffusion.algos.sb3.finish_run", lambda run: run.writer.close() or {})
    executed = bounded_env(monkeypatch, action_bound=0.5)
    run = make_setup(pretrained, tmp_path / "run", chains=16, sampler="ddim", sampling_steps=5)
    train(run, progress=False)
    on_bound = (torch.stack(executed).abs() == 0.5).float().mean().item()
    assert on_bound > 0.25  # measured: 0.58
    assert run.history[0]["env/clipped_fraction"] == pytest.approx(on_bound, rel=1e-6)


class DropoutEps(torch.nn.Module):
    """An eps network with a Dropout layer: in train mode two calls on one input differ."""

    def __init__(self):
        super().__init__()
        self.net = MLPEps(num_timesteps=10, hidden_size=32, hidden_layers=1, emb_size=8)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x, t, c=None):
        return self.dropout(self.net(x, t, c))


def test_the_eps_network_stays_in_eval_mode_so_a_dropout_network_starts_at_ratio_one():
    diffusion = GaussianDiffusion("linear", 10)
    vec = DenoisingVectorEnv(num_envs=8, action_mode="sample", diffusion=diffusion, data_shape=(2,))
    eps_model = DropoutEps()
    # one minibatch of the whole rollout and one pass: the update's ratios are all taken before its step
    model = PPO(
        DiffusionPolicy,
        DenoisingVecEnvAdapter(vec),
        n_steps=10,
        batch_size=80,
        n_epochs=1,
        clip_range=1e-4,
        seed=0,
        policy_kwargs=dict(eps_model=eps_model, diffusion=diffusion, timesteps=vec.timesteps),
    )
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.learn(80)
    assert model.logger.name_to_value["train/clip_fraction"] == 0.0  # every |ratio - 1| <= 1e-4
    assert model.logger.name_to_value["train/approx_kl"] < 1e-8
    assert model.policy.value_net.training and not any(m.training for m in eps_model.modules())


def test_adapter_steps_all_chains_in_one_call_and_ends_every_chain_at_x0():
    point, K, N = np.array([1.0, -2.0], dtype=np.float32), 4, 3
    vec = DenoisingVectorEnv(
        reward_kwargs={"point": point.tolist()},
        sampler="ddim",
        sampling_steps=K,
        num_envs=N,
        action_mode="sample",
        diffusion=GaussianDiffusion("linear", 10),
        data_shape=(2,),
    )
    calls = []
    step_tensor = vec.step_tensor
    vec.step_tensor = lambda action: calls.append(tuple(action.shape)) or step_tensor(action)
    adapter = DenoisingVecEnvAdapter(vec)
    adapter.seed(3)
    first = adapter.reset()
    adapter.seed(3)
    np.testing.assert_array_equal(adapter.reset()["x"], first["x"])  # seeded x_T
    assert first["x"].shape == (N, 2) and (first["t"] == 10).all()
    rng = np.random.default_rng(0)
    done_at = []
    for step in range(1, 2 * K + 1):
        actions = rng.normal(0, 2, size=(N, 2)).astype(np.float32)
        obs, rewards, dones, infos = adapter.step(actions)
        assert dones.shape == (N,) and (dones.all() or not dones.any())
        if not dones.any():
            assert (rewards == 0).all() and infos == [{}] * N
            continue
        done_at.append(step)
        np.testing.assert_allclose(rewards, -np.linalg.norm(actions - point, axis=1), rtol=1e-6)
        np.testing.assert_array_equal(adapter.x0.numpy(), actions)
        np.testing.assert_array_equal(adapter.rewards.numpy(), rewards)
        for i, info in enumerate(infos):
            np.testing.assert_array_equal(info["terminal_observation"]["x"], actions[i])
            np.testing.assert_array_equal(info["terminal_observation"]["t"], [0])
        assert (obs["t"] == 10).all() and not np.isin(obs["x"], actions).any()  # autoreset: a new x_T
    assert done_at == [K, 2 * K]
    assert calls == [(N, 2)] * (2 * K)  # one batched env step per SB3 step
    assert adapter.get_attr("timesteps", indices=[0, 2]) == [[10, 7, 4, 1]] * 2


@pytest.fixture(scope="module")
def ppo_run(pretrained, tmp_path_factory) -> tuple[Path, Setup, dict]:
    """Six epochs of SB3 PPO towards TARGET with 64 chains (about 4 s on one thread)."""
    out = tmp_path_factory.mktemp("ppo") / "run"
    run = make_setup(pretrained, out, chains=64, epochs=6, lr=3e-4, minibatch_size=256, checkpoint_every=2)
    return out, run, train(run, progress=False)


def test_ppo_moves_samples_towards_the_target(ppo_run):
    _, run, metrics = ppo_run
    rewards = [h["reward/mean"] for h in run.history]
    assert len(rewards) == 6
    # measured (seed 0): -2.41 at epoch 1, -1.23 at epoch 6; seeds 1 and 2 gain 1.13 and 1.17
    assert rewards[-1] - rewards[0] > 0.8
    # measured on 5000 fresh samples (seed 0): -0.99 after, -2.48 before
    assert metrics["reward_mean"] - metrics["reward_mean_pretrained"] > 1.0
    assert metrics["kl_to_pretrained"] > 0
    assert all(h["env/clipped_fraction"] == 0.0 for h in run.history)
    assert "loss/policy" not in run.history[0] and "ppo/approx_kl" in run.history[1]  # losses of the previous update


def test_ppo_run_directory_logs_checkpoints_and_evaluates(ppo_run, capsys):
    out, run, _ = ppo_run
    events = EventAccumulator(str(out))
    events.Reload()
    tags = events.Tags()
    assert {
        "reward/mean",
        "loss/policy",
        "loss/value",
        "ppo/approx_kl",
        "ppo/clipfrac",
        "kl/to_pretrained",
        "env/clipped_fraction",
        "perf/steps_per_sec",
    } <= set(tags["scalars"])
    assert "samples" in tags["images"]
    assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx([h["reward/mean"] for h in run.history])
    # no SB3 files of its own next to the shared ones
    assert {p.name for p in out.iterdir() if not p.name.startswith("events.out.tfevents")} == {
        "checkpoints",
        "config.json",
        "figures",
        "metrics.json",
    }
    assert [p.name for p in CheckpointManager(out).paths()] == [
        "step_00000002.pt",
        "step_00000004.pt",
        "step_00000006.pt",
    ]
    final = load_run(out).model.state_dict()
    assert all(torch.equal(final[name], w) for name, w in run.policy.state_dict().items())
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--num-samples", "500"]) == 0
    assert '"algo": "sb3-ppo"' in capsys.readouterr().out


def test_refused_options_are_user_errors(pretrained, tmp_path):
    with pytest.raises(UserError, match="--timestep-fraction"):
        train(make_setup(pretrained, tmp_path, timestep_fraction=0.5), progress=False)


def test_a_stopped_run_resumes_to_the_same_weights(pretrained, tmp_path, monkeypatch):
    monkeypatch.setattr(
        "rl_diffusion.algos.sb3.finish_run", lambda run: run.writer.close() or {}
    )  # metrics and figures: 3 s, not tested here
    config = dict(chains=16, epochs=3, lr=1e-3, minibatch_size=64, checkpoint_every=1)
    straight = make_setup(pretrained, tmp_path / "straight", **config)
    train(straight, progress=False)

    calls = []
    step_tensor = DenoisingVectorEnv.step_tensor

    def interrupt_in_epoch_2(self, action):
        calls.append(1)
        if len(calls) == 25:  # step 5 of the second chain
            os.kill(os.getpid(), signal.SIGINT)
        return step_tensor(self, action)

    monkeypatch.setattr(DenoisingVectorEnv, "step_tensor", interrupt_in_epoch_2)
    stopped = make_setup(pretrained, tmp_path / "stopped", **config)
    with pytest.raises(UserError, match="after epoch 1; checkpoint saved, continue with --resume"):
        train(stopped, progress=False)
    assert [p.name for p in CheckpointManager(tmp_path / "stopped").paths()] == ["step_00000001.pt"]
    monkeypatch.setattr(DenoisingVectorEnv, "step_tensor", step_tensor)

    resumed = make_setup(pretrained, tmp_path / "stopped", resume=True, **config)
    train(resumed, resume=True, progress=False)
    assert [h["reward/mean"] for h in resumed.history] == [h["reward/mean"] for h in straight.history]
    expected = straight.policy.state_dict()
    assert all(torch.equal(w, expected[name]) for name, w in resumed.policy.state_dict().items())


def test_kl_coef_lowers_each_step_reward_by_the_log_ratio_to_the_pretrained_step(pretrained, tmp_path):
    from tqdm import tqdm

    from rl_diffusion.algos.sb3 import EpochCallback

    beta = 0.5
    run = make_setup(pretrained, tmp_path, chains=8, sampler="ddim", sampling_steps=5, kl_coef=beta)
    with torch.no_grad():  # a policy away from the pretrained one, so that the penalty is not 0
        for p in run.policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model = make_ppo(run)
    stop = type("NoSignal", (), {"received": None})()
    _, callback = model._setup_learn(model.n_steps * 8, callback=EpochCallback(run, 0, 0, stop, tqdm(disable=True)))
    assert model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    buffer = model.rollout_buffer
    x, t = (
        torch.as_tensor(buffer.observations["x"]).flatten(0, 1),
        torch.as_tensor(buffer.observations["t"]).flatten().long(),
    )
    step = dict(
        x_prev=torch.as_tensor(buffer.actions).flatten(0, 1),
        t_prev=model.policy.prev_timestep[t],
        sampler="ddim",
        eta=1.0,
    )
    with torch.no_grad():
        log_ratio = (
            run.diffusion.reverse_step(run.policy(x, t), x, t, **step).log_prob
            - run.diffusion.reverse_step(run.reference(x, t), x, t, **step).log_prob
        ).reshape(5, 8)
    task = torch.zeros(5, 8)
    task[-1] = model.env.rewards
    rewards = torch.as_tensor(buffer.rewards)
    torch.testing.assert_close(rewards, task - beta * log_ratio, rtol=0, atol=1e-4)
    assert log_ratio.abs().mean() > 0.05  # the check has teeth: the penalty is not negligible
    # gamma = lambda = 1: every step's return is the sum of its rewards from there on
    torch.testing.assert_close(torch.as_tensor(buffer.returns), rewards.flip(0).cumsum(0).flip(0), rtol=0, atol=1e-5)
    run.writer.close()


def test_sb3_ppo_with_kl_coef_runs_and_its_evaluation_reports_the_path_kl(pretrained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("rl_diffusion.algos.sb3.finish_run", lambda run: run.writer.close() or {})
    monkeypatch.setattr("rl_diffusion.evaluation.TILTED_POOL", 2000)  # the default 2 x 50,000 pool samples take 5 s
    out = tmp_path / "kl"
    run = make_setup(pretrained, out, chains=32, epochs=3, lr=3e-4, minibatch_size=256, kl_coef=0.3)
    train(run, progress=False)
    assert all(h["kl/to_pretrained"] > 0 for h in run.history[1:])
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--num-samples", "500"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # measured: path KL 1.2 nats, mean reward -2.34 -> -1.57 (5000 samples)
    assert metrics["algo"] == "sb3-ppo" and 0.6 < metrics["kl_to_pretrained"] < 2.4  # measured: 1.2
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 0.3
    assert metrics["kl_coef"] == 0.3 and "tilted_sw2" in metrics
