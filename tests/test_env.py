import json

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import rl_diffusion  # registers RLDiffusion/Denoise-v0
from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.diffusion import GaussianDiffusion
from rl_diffusion.env import DenoisingEnv, DenoisingVectorEnv
from rl_diffusion.errors import UserError
from rl_diffusion.models import build_model

T = 10
POINT = [1.0, -2.0]


def make_env(**kwargs) -> DenoisingEnv:
    """A sample-mode env (the action is x_{t-1}) unless told otherwise."""
    return DenoisingEnv(
        reward_kwargs={"point": POINT},
        diffusion=GaussianDiffusion("linear", T),
        data_shape=(2,),
        **{"action_mode": "sample", **kwargs},
    )


def make_vector_env(num_envs: int, **kwargs) -> DenoisingVectorEnv:
    return DenoisingVectorEnv(
        reward_kwargs={"point": POINT},
        num_envs=num_envs,
        diffusion=GaussianDiffusion("linear", T),
        data_shape=(2,),
        **{"action_mode": "sample", **kwargs},
    )


@pytest.fixture
def run_dir(tmp_path):
    """A tiny pretrain run directory: config.json and one checkpoint of an untrained MLP."""
    (tmp_path / "config.json").write_text(json.dumps({"kind": "pretrain"}))
    model_config = {
        "kind": "mlp",
        "data_dim": 2,
        "num_timesteps": T,
        "hidden_size": 16,
        "hidden_layers": 1,
        "emb_size": 8,
    }
    CheckpointManager(tmp_path).save(
        {
            "kind": "pretrain",
            "model_config": model_config,
            "diffusion_config": {"beta_schedule": "linear", "num_timesteps": T},
            "data": {"dataset": "dino", "shape": [2]},
            "model": build_model(model_config).state_dict(),
            "train_state": {},
        },
        step=1,
    )
    return tmp_path


@pytest.mark.parametrize("num_classes", [0, 3])
def test_gymnasium_and_sb3_env_checkers_pass(num_classes):
    check_env(make_env(num_classes=num_classes))
    sb3_check_env(make_env(num_classes=num_classes))


@pytest.mark.parametrize(
    "sampler, sampling_steps, expected_ts",
    [
        ("ddpm", None, list(range(T, 0, -1))),
        ("ddim", 4, [10, 7, 4, 1]),
    ],
)
def test_episode_has_one_step_per_timestep_and_rewards_only_x0(sampler, sampling_steps, expected_ts):
    env = make_env(sampler=sampler, sampling_steps=sampling_steps)
    obs, info = env.reset(seed=0)
    seen_t, seen_t_prev, rewards, terminations = [int(obs["t"][0])], [info["t_prev"]], [], []
    x0 = np.array([4.0, 2.0], dtype=np.float32)
    for k in range(len(expected_ts)):
        action = x0 if k == len(expected_ts) - 1 else np.full(2, 0.5 * k, dtype=np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        assert not truncated
        seen_t.append(int(obs["t"][0]))
        seen_t_prev.append(info.get("t_prev"))
        rewards.append(reward)
        terminations.append(terminated)
    assert seen_t == expected_ts + [0]
    assert seen_t_prev == expected_ts[1:] + [0, None]  # no t_prev once at x_0
    assert terminations == [False] * (len(expected_ts) - 1) + [True]
    assert rewards[:-1] == [0.0] * (len(expected_ts) - 1)
    # target_point at (1, -2): -||(4, 2) - (1, -2)|| = -||(3, 4)|| = -5
    assert rewards[-1] == pytest.approx(-5.0)
    np.testing.assert_array_equal(info["x0"], x0)
    np.testing.assert_array_equal(obs["x"], x0)


def test_seeded_resets_reproduce_x_T_and_different_seeds_differ():
    env = make_env(num_classes=5)
    first, _ = env.reset(seed=7)
    env.step(np.zeros(2, dtype=np.float32))
    again, _ = env.reset(seed=7)
    other, _ = env.reset(seed=8)
    np.testing.assert_array_equal(first["x"], again["x"])
    assert first["c"] == again["c"]
    assert not np.array_equal(first["x"], other["x"])

    vec = make_vector_env(4)
    a, _ = vec.reset(seed=7)
    b, _ = vec.reset(seed=7)
    np.testing.assert_array_equal(a["x"], b["x"])
    assert len({tuple(row) for row in a["x"]}) == 4  # the chains start apart


def test_out_of_bound_actions_are_clipped_and_counted():
    env = make_env(action_bound=100.0)
    env.reset(seed=0)
    obs, _, _, _, info = env.step(np.array([1e6, 0.5], dtype=np.float32))
    np.testing.assert_array_equal(obs["x"], [100.0, 0.5])
    assert info["clipped"] == 1 and env.clipped_actions == 1
    obs, _, _, _, info = env.step(np.array([-1e6, -1e6], dtype=np.float32))
    np.testing.assert_array_equal(obs["x"], [-100.0, -100.0])
    assert info["clipped"] == 2 and env.clipped_actions == 3
    _, _, _, _, info = env.step(np.array([100.0, -3.0], dtype=np.float32))  # on the bound is inside
    assert info["clipped"] == 0 and env.clipped_actions == 3


def test_vector_env_matches_single_envs_driven_with_the_same_actions():
    num_envs = 4
    vec = make_vector_env(num_envs, sampler="ddim", sampling_steps=5)
    singles = [make_env(sampler="ddim", sampling_steps=5) for _ in range(num_envs)]
    vec.reset(seed=0)
    for i, env in enumerate(singles):
        env.reset(seed=i)
    actions = np.random.default_rng(0).normal(0.0, 3.0, size=(5, num_envs, 2)).astype(np.float32)
    actions[2, 1, 0] = 500.0  # one clipped coordinate
    for step_actions in actions:
        obs, rewards, terminated, truncated, info = vec.step(step_actions)
        single = [env.step(a) for env, a in zip(singles, step_actions, strict=True)]
        np.testing.assert_array_equal(rewards, np.array([s[1] for s in single], dtype=np.float32))
        np.testing.assert_array_equal(terminated, [s[2] for s in single])
        np.testing.assert_array_equal(info["clipped"], [s[4]["clipped"] for s in single])
    assert terminated.all() and not truncated.any()
    expected = -np.linalg.norm(actions[-1] - np.array(POINT, dtype=np.float32), axis=1)
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)
    np.testing.assert_array_equal(info["x0"], np.stack([s[4]["x0"] for s in single]))
    assert int(vec.clipped_actions) == sum(env.clipped_actions for env in singles) == 1


def test_vector_env_autoresets_in_the_same_step():
    num_envs, K = 3, 4
    vec = make_vector_env(num_envs, sampler="ddim", sampling_steps=K)
    assert vec.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
    vec.reset(seed=1)
    for episode in range(2):
        for k in range(K):
            actions = np.full((num_envs, 2), float(episode * 10 + k), dtype=np.float32)
            obs, rewards, terminated, _, info = vec.step(actions)
            if k < K - 1:
                assert not terminated.any() and (rewards == 0).all() and "x0" not in info
        assert terminated.all()
        # The returned observation already starts the next episode; x_0 comes in the info.
        np.testing.assert_array_equal(obs["t"], np.full((num_envs, 1), T))
        np.testing.assert_array_equal(info["t_prev"], np.full(num_envs, 7))
        np.testing.assert_array_equal(info["x0"], actions)
        assert not np.array_equal(obs["x"], actions)
        assert info["_final_obs"].all()
        for i in range(num_envs):
            np.testing.assert_array_equal(info["final_obs"][i]["x"], actions[i])
            np.testing.assert_array_equal(info["final_obs"][i]["t"], [0])


def test_step_tensor_returns_rewards_once_and_refuses_to_pass_x0():
    vec = make_vector_env(2, sampler="ddim", sampling_steps=2)
    with pytest.raises(RuntimeError):  # never reset
        vec.step_tensor(torch.zeros(2, 2))
    vec.reset(seed=0)
    reward, done = vec.step_tensor(torch.zeros(2, 2))
    assert not done and torch.equal(reward, torch.zeros(2))
    reward, done = vec.step_tensor(torch.tensor([[1.0, -2.0], [1.0, 1.0]], requires_grad=True))
    assert done and not vec.x.requires_grad
    torch.testing.assert_close(reward, torch.tensor([0.0, -3.0]))
    assert vec.timestep == 0
    with pytest.raises(RuntimeError):
        vec.step_tensor(torch.zeros(2, 2))


def test_run_directory_and_make_and_make_vec(run_dir):
    assert rl_diffusion.ENV_ID in gymnasium.registry
    env = gymnasium.make(
        "RLDiffusion/Denoise-v0",
        run=str(run_dir),
        reward="target_point",
        reward_kwargs={"point": POINT},
        action_mode="sample",
    )
    assert env.spec.max_episode_steps is None
    obs, _ = env.reset(seed=0)
    assert obs["x"].shape == (2,) and int(obs["t"][0]) == T and "c" not in obs
    for _ in range(T - 1):
        assert env.step(np.zeros(2, dtype=np.float32))[1] == 0.0
    _, reward, terminated, _, _ = env.step(np.array([1.0, 2.0], dtype=np.float32))
    assert terminated and reward == pytest.approx(-4.0)

    # With no vectorization_mode, make_vec picks the registered vector_entry_point.
    vec = gymnasium.make_vec(
        "RLDiffusion/Denoise-v0", num_envs=8, run=run_dir, reward_kwargs={"point": POINT}, action_mode="sample"
    )
    assert isinstance(vec.unwrapped, DenoisingVectorEnv) and vec.num_envs == 8
    obs, _ = vec.reset(seed=0)
    assert obs["x"].shape == (8, 2) and vec.action_space.shape == (8, 2)


def test_the_default_action_mode_is_residual_with_the_run_network_inside(run_dir):
    env = gymnasium.make("RLDiffusion/Denoise-v0", run=str(run_dir), reward_kwargs={"point": POINT})
    assert env.unwrapped.chains.action_mode == "residual" and env.unwrapped.chains.eps_model is not None
    assert env.action_space == gymnasium.spaces.Box(-3.0, 3.0, (2,), np.float32)
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"x", "t", "x0_hat"}
    vec = gymnasium.make_vec(
        "RLDiffusion/Denoise-v0", num_envs=4, run=run_dir, reward_kwargs={"point": POINT}, action_mode="noise"
    )
    obs, _ = vec.reset(seed=0)
    assert vec.unwrapped.action_mode == "noise" and obs["x"].shape == (4, 2) and (obs["t"] == T).all()
    _, rewards, terminated, _, info = vec.step(obs["x"])
    assert terminated.all() and np.isfinite(rewards).all() and info["x0"].shape == (4, 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # neither a run nor a diffusion
        {"diffusion": GaussianDiffusion("linear", T)},  # no data shape
        {"diffusion": GaussianDiffusion("linear", T), "data_shape": (2,), "sampler": "ddpn"},
        {"diffusion": GaussianDiffusion("linear", T), "data_shape": (2,), "sampling_steps": 4},  # ddpm takes all T
        {"diffusion": GaussianDiffusion("linear", T), "data_shape": (2,), "reward": "no_such_reward"},
    ],
)
def test_bad_arguments_are_user_errors(kwargs):
    with pytest.raises(UserError):
        DenoisingEnv(**kwargs)


def test_a_directory_without_a_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a run directory"):
        DenoisingEnv(run=tmp_path)
