"""The env's action modes: sample, residual (a shift of the frozen pretrained step) and noise (x_T of a
deterministic chain)."""

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv

from rl_diffusion.diffusion import GaussianDiffusion
from rl_diffusion.env import DenoisingEnv, DenoisingVectorEnv
from rl_diffusion.errors import UserError
from rl_diffusion.models import MLPEps

T = 10
POINT = [1.0, -2.0]


class CountingEps(torch.nn.Module):
    """A small untrained eps network that counts its calls and the batch size of each."""

    def __init__(self, num_classes: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.net = (
            MLPEps(num_timesteps=T, hidden_size=16, hidden_layers=1, emb_size=8, num_classes=num_classes)
            .eval()
            .requires_grad_(False)
        )
        self.batch_sizes: list[int] = []

    def forward(self, x, t, c=None):
        self.batch_sizes.append(len(x))
        return self.net(x, t, c)


# x0_range clips the predicted x_0 of these untrained steps, so the clipped branch of reverse_step is exercised too
DIFFUSION = GaussianDiffusion("linear", T, x0_range=[[-1.5, -1.0], [1.5, 1.0]])


def make(action_mode: str, num_envs: int | None = None, **kwargs):
    common = dict(
        reward_kwargs={"point": POINT},
        diffusion=DIFFUSION,
        data_shape=(2,),
        action_mode=action_mode,
        eps_model=kwargs.pop("eps_model", CountingEps()),
        **kwargs,
    )
    return DenoisingEnv(**common) if num_envs is None else DenoisingVectorEnv(num_envs=num_envs, **common)


@pytest.mark.parametrize("action_mode", ["sample", "residual", "noise"])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_env_checkers_pass_in_every_mode(action_mode, num_classes):
    env = make(action_mode, num_classes=num_classes, eps_model=CountingEps(num_classes))
    check_env(env)
    sb3_check_env(env)


@pytest.mark.parametrize("sampler, sampling_steps, eta", [("ddpm", None, None), ("ddim", 4, 0.7)])
def test_zero_residual_reproduces_the_pretrained_sampler_exactly(sampler, sampling_steps, eta):
    eps = CountingEps()
    vec = make("residual", 6, sampler=sampler, sampling_steps=sampling_steps, eta=eta, eps_model=eps)
    vec.reset(seed=11)
    K = len(vec.timesteps)
    for _ in range(K):
        _, rewards, terminated, _, info = vec.step(np.zeros((6, 2), dtype=np.float32))
    assert terminated.all()
    expected = DIFFUSION.sample(
        eps,
        (6, 2),
        sampler=sampler,
        sampling_steps=sampling_steps,
        eta=1.0 if eta is None else eta,
        generator=torch.Generator().manual_seed(11),
    ).xs[-1]
    np.testing.assert_array_equal(info["x0"], expected.numpy())
    np.testing.assert_allclose(rewards, -np.linalg.norm(expected.numpy() - POINT, axis=1), rtol=1e-6)
    assert (info["kl"] == 0).all()
    single = make("residual", sampler=sampler, sampling_steps=sampling_steps, eta=eta, eps_model=eps)
    single.reset(seed=11)
    for _ in range(K):
        obs, _, _, _, _ = single.step(np.zeros(2, dtype=np.float32))
    np.testing.assert_array_equal(
        obs["x"],
        DIFFUSION.sample(
            eps,
            (1, 2),
            sampler=sampler,
            sampling_steps=sampling_steps,
            eta=1.0 if eta is None else eta,
            generator=torch.Generator().manual_seed(11),
        )
        .xs[-1][0]
        .numpy(),
    )


def test_noise_mode_with_the_offered_x_T_reproduces_deterministic_ddim():
    eps = CountingEps()
    vec = make("noise", 5, sampling_steps=4, eps_model=eps)
    obs, info = vec.reset(seed=3)
    assert (obs["t"] == T).all() and (info["t_prev"] == 0).all()
    eps.batch_sizes.clear()
    _, rewards, terminated, _, info = vec.step(obs["x"])
    assert terminated.all() and eps.batch_sizes == [5] * 4  # one call per DDIM step for all chains
    expected = DIFFUSION.sample(
        eps, (5, 2), sampler="ddim", sampling_steps=4, eta=0.0, generator=torch.Generator().manual_seed(3)
    ).xs[-1]
    np.testing.assert_array_equal(info["x0"], expected.numpy())
    # the x_0 of a chosen x_T is deterministic: the same action twice gives the same sample
    np.testing.assert_array_equal(
        vec.step(np.ones((5, 2), dtype=np.float32))[4]["x0"], vec.step(np.ones((5, 2), dtype=np.float32))[4]["x0"]
    )


def test_a_residual_moves_the_step_by_sigma_times_the_action_and_costs_its_closed_form_kl():
    zero, shifted = make("residual", 2, kl_coef=0.5), make("residual", 2, kl_coef=0.5)
    obs, _ = zero.reset(seed=5)
    shifted.reset(seed=5)
    action = np.array([[1.0, -2.0], [0.0, 0.5]], dtype=np.float32)
    x_zero, r_zero, _, _, info_zero = zero.step(np.zeros_like(action))
    x_shift, r_shift, _, _, info = shifted.step(action)
    sigma = DIFFUSION.np["reverse_sigma"][T]
    np.testing.assert_allclose(x_shift["x"] - x_zero["x"], sigma * action, rtol=1e-5, atol=1e-7)
    # kl_k = ||a||^2 / 2: (1 + 4) / 2 = 2.5 and 0.25 / 2 = 0.125 nats; reward -0.5 kl_k on a step before x_0
    np.testing.assert_array_equal(info["kl"], [2.5, 0.125])
    np.testing.assert_array_equal(r_shift, [-1.25, -0.0625])
    assert (r_zero == 0).all() and (info_zero["kl"] == 0).all()
    # x0_hat is the pretrained prediction of x_0 at (x_T, T), clipped to x0_range
    x = torch.from_numpy(obs["x"])
    t = torch.full((2,), T)
    expected = DIFFUSION.clip_x0(DIFFUSION.predict_x0(x, t, zero.eps_model(x, t)))
    np.testing.assert_allclose(obs["x0_hat"], expected.detach().numpy(), rtol=1e-6)


def test_the_last_step_reward_is_the_task_reward_minus_its_kl():
    env = make("residual", kl_coef=2.0, sampler="ddim", sampling_steps=2)
    env.reset(seed=0)
    env.step(np.zeros(2, dtype=np.float32))
    obs, reward, terminated, _, info = env.step(np.array([0.0, 1.0], dtype=np.float32))
    assert terminated and info["kl"] == 0.5
    assert reward == pytest.approx(-np.linalg.norm(obs["x"] - POINT) - 2.0 * 0.5, rel=1e-6)


def test_the_vector_env_calls_the_network_once_per_step_for_all_chains():
    eps = CountingEps()
    vec = make("residual", 8, eps_model=eps)
    vec.reset(seed=0)
    for _ in range(2 * T):
        vec.step(np.zeros((8, 2), dtype=np.float32))
    # x_T of the first episode, T - 1 more states before each x_0, the autoreset's x_T after each episode
    assert eps.batch_sizes == [8] * (1 + 2 * T)


def test_a_dummy_vec_env_of_single_residual_envs_matches_the_vector_env():
    singles = DummyVecEnv([lambda: make("residual") for _ in range(3)])
    singles.seed(0)
    obs = singles.reset()
    assert obs["x0_hat"].shape == (3, 2)
    for _ in range(T):
        obs, rewards, dones, infos = singles.step(np.full((3, 2), 0.3, dtype=np.float32))
    assert dones.all() and all(info["kl"] == pytest.approx(0.09) for info in infos)
    assert np.isfinite(rewards).all() and len({tuple(info["terminal_observation"]["x"]) for info in infos}) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"action_mode": "denoise"}, "unknown action_mode"),
        ({"action_mode": "sample", "kl_coef": 0.1}, "closed-form"),
        ({"action_mode": "noise", "kl_coef": 0.1}, "closed-form"),
        ({"action_mode": "residual", "kl_coef": -1.0}, "kl_coef must be >= 0"),
        ({"action_mode": "noise", "sampler": "ddpm"}, "deterministic ddim sampler"),
        ({"action_mode": "noise", "sampler": "ddim", "eta": 1.0}, "deterministic ddim sampler"),
        ({"action_mode": "residual", "sampler": "ddim", "eta": 0.0}, "sigma"),
        ({"action_mode": "residual", "eps_model": None}, "eps_model"),
        ({"action_mode": "residual", "action_bound": 0.0}, "action_bound"),
    ],
)
def test_bad_mode_combinations_are_user_errors(kwargs, message):
    kwargs = {"eps_model": CountingEps(), **kwargs}
    with pytest.raises(UserError, match=message):
        DenoisingEnv(diffusion=DIFFUSION, data_shape=(2,), **kwargs)
