"""The denoising MDP (docs/design.md, section 1) as Gymnasium environments, one chain or N in lockstep.

State (x_t, t, c), action x_{t_prev}, reward r(x_0, c) at the last step and 0 before; gamma = 1.
t runs down `GaussianDiffusion.timesteps(sampler, sampling_steps)` (T..1 for DDPM, K spaced
steps for DDIM) and the chain ends at x_0. The environments never call the epsilon network:
the agent (the diffusion policy) chooses x_{t_prev}; they only need the data shape, the
timestep sequence and the reward.

`DenoisingVectorEnv` holds the chains as torch tensors and steps all of them with one tensor
op; `DenoisingEnv` is a thin view of it with one chain and numpy in and out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import Tensor

from rewards import build_reward
from rl_diffusion.checkpoint import CheckpointManager, read_run_config
from rl_diffusion.diffusion import GaussianDiffusion, check_sampler
from rl_diffusion.errors import UserError

def _diffusion_and_shape(
    run: str | Path | None, diffusion: GaussianDiffusion | None, data_shape: tuple | None, num_classes: int
) -> tuple[GaussianDiffusion, tuple[int, ...], int]:
    """The process the env follows: from a run's newest checkpoint, or given directly."""
    if run is None:
        if diffusion is None or data_shape is None:
            raise UserError("the denoising env needs a run directory (run=...) or both diffusion= and data_shape=")
        return diffusion, tuple(int(n) for n in data_shape), num_classes
    if diffusion is not None or data_shape is not None:
        raise UserError("give the denoising env either run= or diffusion= with data_shape=, not both")
    read_run_config(run)  # a clear error for a directory that is not a run
    # The checkpoint alone, not load_run: the env never needs the network.
    ckpt = CheckpointManager(run).load_latest()
    try:
        return (
            GaussianDiffusion(**ckpt["diffusion_config"]),
            tuple(int(n) for n in ckpt["data"]["shape"]),
            int(ckpt["model_config"].get("num_classes") or 0),
        )
    except (KeyError, TypeError) as e:
        raise UserError(f"the checkpoint of {run} lacks {e}; give the --out of an rl-diffusion pretrain or finetune run") from None


class DenoisingVectorEnv(VectorEnv):
    """N denoising chains stepped together as one torch op; all chains share t (fixed-length episodes).

    Autoreset is SAME_STEP (`metadata["autoreset_mode"]`): every chain ends at the same step, and
    that step returns the NEW episode's x_T as the observation, terminated = True for all, the
    rewards r(x_0, c), and the finished samples in the info as
        "x0":         float32 [N, *data_shape], the final x_0 of every chain;
        "final_obs":  gymnasium's SAME_STEP convention, an object array of per-chain observation
                      dicts (x = x_0, t = [0], c), with the all-True mask "_final_obs".
    Every step's info also has "clipped" (int [N], action coordinates clipped this step) and,
    for the returned state, "t_prev" (int [N], where the next action lands).

    Torch-level use (no numpy round-trips, e.g. a stable-baselines3 adapter): `reset_tensor()`,
    then `step_tensor(action)` until it returns done = True; it does not autoreset. The state is
    `self.x` (float32 [N, *data_shape] on `device`), `self.c` (long [N] or None) and `self.t`.

    Args:
        run: a pretrain or finetune run directory; the diffusion schedule, data shape and number
            of classes are read from its newest checkpoint. Leave None to pass `diffusion` and
            `data_shape` instead.
        reward: a reward name, 'package.module:factory' path or entry point (see `rewards`).
        reward_kwargs: keyword arguments of the reward factory.
        sampler: "ddpm" (all T steps) or "ddim" (`sampling_steps` spaced steps).
        sampling_steps: K for "ddim"; None means all T.
        eta: DDIM stochasticity. The transition ignores it (the action is the agent's); it is
            kept so the policy acting here knows which reverse step it takes.
        num_envs: N, the number of chains.
        device: where `self.x`, actions and rewards live.
        diffusion: the process, when there is no run directory.
        data_shape: shape of one sample, e.g. (2,), when there is no run directory.
        num_classes: labels c drawn uniformly at reset; 0 for unconditional. Read from the run
            when `run` is given.
        action_bound: actions are clipped to [-action_bound, action_bound] per coordinate, in
            data units. Far outside the data (about +-5) so clipping flags a broken policy
            rather than shaping a working one; clipped coordinates are counted.
        render_mode: must be None; there is nothing to render.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        run: str | Path | None = None,
        reward: str = "target_point",
        reward_kwargs: dict | None = None,
        sampler: str = "ddpm",
        sampling_steps: int | None = None,
        eta: float = 1.0,
        *,
        num_envs: int,
        device: str | torch.device = "cpu",
        diffusion: GaussianDiffusion | None = None,
        data_shape: tuple | None = None,
        num_classes: int = 0,
        action_bound: float = 100.0,
        render_mode: str | None = None,
    ):
        if render_mode is not None:
            raise UserError(f"the denoising env has no render modes, got render_mode={render_mode!r}")
        check_sampler(sampler, eta)
        if num_envs < 1:
            raise UserError(f"num_envs must be at least 1, got {num_envs}")
        if not action_bound > 0:
            raise UserError(f"action_bound must be > 0, got {action_bound}")
        self.diffusion, self.data_shape, self.num_classes = _diffusion_and_shape(run, diffusion, data_shape, num_classes)
        self.sampler, self.eta = sampler, eta
        self.timesteps = self.diffusion.timesteps(sampler, sampling_steps)  # K decreasing t's, T first
        self.prev_timesteps = self.timesteps[1:] + [0]  # where step k lands
        self.reward = build_reward(reward, reward_kwargs)
        self.action_bound = float(action_bound)
        self.num_envs = num_envs
        self.device = torch.device(device)

        obs = {
            "x": spaces.Box(-np.inf, np.inf, self.data_shape, np.float32),
            "t": spaces.Box(0, self.diffusion.num_timesteps, (1,), np.int64),
        }
        if self.num_classes > 0:
            obs["c"] = spaces.Discrete(self.num_classes)
        self.single_observation_space = spaces.Dict(obs)
        self.single_action_space = spaces.Box(-self.action_bound, self.action_bound, self.data_shape, np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

        # Until the first reset the chains count as finished, so stepping them is refused.
        self.x = torch.zeros(num_envs, *self.data_shape, device=self.device)
        self.c: Tensor | None = None
        self.t = len(self.timesteps)  # step index k in 0..K (0: x_T, K: x_0), not the diffusion time
        self.last_clipped = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        # Summed on the device so that stepping never waits for it; int(...) to read.
        self.clipped_actions = torch.zeros((), dtype=torch.long, device=self.device)

    @property
    def timestep(self) -> int:
        """The diffusion time t of the current state (T at x_T, 0 at x_0)."""
        return self.timesteps[self.t] if self.t < len(self.timesteps) else 0

    # Torch level

    def reset_tensor(self, rng: np.random.Generator | None = None) -> None:
        """Start every chain at x_T ~ N(0, I) (with c ~ U{0..num_classes-1}) drawn from rng.

        rng defaults to `self.np_random`, so a seeded `reset` reproduces x_T and c.
        """
        rng = self.np_random if rng is None else rng
        x = rng.standard_normal((self.num_envs, *self.data_shape), dtype=np.float32)
        self.x = torch.from_numpy(x).to(self.device)
        if self.num_classes > 0:
            self.c = torch.from_numpy(rng.integers(self.num_classes, size=self.num_envs)).to(self.device)
        self.t = 0

    def step_tensor(self, action: Tensor) -> tuple[Tensor | None, bool]:
        """Move every chain to x_{t_prev} = action, clipped to +-action_bound.

        action: [N, *data_shape], any float dtype and device; it is detached, so the state never
        holds the policy's graph. Returns (rewards float32 [N] on `device`, True) after the last
        step, else (None, False). No autoreset: after done, `self.x` holds x_0 until
        `reset_tensor()`.
        """
        if self.t >= len(self.timesteps):
            raise RuntimeError("the chains have reached x_0 (or were never reset); call reset() or reset_tensor() first")
        action = action.detach().to(device=self.device, dtype=torch.float32)
        if action.shape != self.x.shape:
            raise ValueError(f"action must have shape {tuple(self.x.shape)} ([num_envs, *data_shape]), got {tuple(action.shape)}")
        self.last_clipped = (action.abs() > self.action_bound).flatten(1).sum(1)
        self.clipped_actions += self.last_clipped.sum()
        self.x = action.clamp(-self.action_bound, self.action_bound)
        self.t += 1
        if self.t < len(self.timesteps):
            return None, False
        with torch.no_grad():
            return self.reward(self.x, self.c), True

    def observation(self) -> dict[str, np.ndarray]:
        """The batched observation of the current state, as numpy copies (safe to modify)."""
        obs = {
            "x": self.x.to("cpu", copy=True).numpy(),
            "t": np.full((self.num_envs, 1), self.timestep, dtype=np.int64),
        }
        if self.c is not None:
            obs["c"] = self.c.to("cpu", copy=True).numpy()
        return obs

    def _state_info(self) -> dict[str, np.ndarray]:
        return {"t_prev": np.full(self.num_envs, self.prev_timesteps[self.t], dtype=np.int64)}

    # Gymnasium vector API

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self.reset_tensor()
        return self.observation(), self._state_info()

    def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        reward, done = self.step_tensor(torch.as_tensor(actions))
        info: dict[str, Any] = {"clipped": self.last_clipped.cpu().numpy()}
        if done:
            final = self.observation()
            final_obs = np.empty(self.num_envs, dtype=object)
            final_obs[:] = [{key: value[i] for key, value in final.items()} for i in range(self.num_envs)]
            info.update(x0=final["x"], final_obs=final_obs, _final_obs=np.ones(self.num_envs, dtype=bool))
            self.reset_tensor()
        info.update(self._state_info())
        rewards = reward.cpu().numpy() if done else np.zeros(self.num_envs, dtype=np.float32)
        return self.observation(), rewards, np.full(self.num_envs, done), np.zeros(self.num_envs, dtype=bool), info


class DenoisingEnv(gymnasium.Env):
    """One denoising chain: a numpy view of a one-chain `DenoisingVectorEnv` on the CPU.

    reset() draws x_T ~ N(0, I) (and c) from `self.np_random`; info["t_prev"] is where the first
    action lands. step(action) makes the clipped action the new x and moves t on; the step that
    reaches x_0 returns reward r(x_0, c), terminated = True and info["x0"]; every other step
    returns reward 0.0 and info["t_prev"]. Never truncated. info["clipped"] counts the action
    coordinates clipped this step, `clipped_actions` all of them so far.

    Arguments as for `DenoisingVectorEnv` (without num_envs and device).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        run: str | Path | None = None,
        reward: str = "target_point",
        reward_kwargs: dict | None = None,
        sampler: str = "ddpm",
        sampling_steps: int | None = None,
        eta: float = 1.0,
        *,
        diffusion: GaussianDiffusion | None = None,
        data_shape: tuple | None = None,
        num_classes: int = 0,
        action_bound: float = 100.0,
        render_mode: str | None = None,
    ):
        self.chains = DenoisingVectorEnv(
            run, reward, reward_kwargs, sampler, sampling_steps, eta, num_envs=1,
            diffusion=diffusion, data_shape=data_shape, num_classes=num_classes,
            action_bound=action_bound, render_mode=render_mode,
        )
        self.observation_space = self.chains.single_observation_space
        self.action_space = self.chains.single_action_space

    @property
    def clipped_actions(self) -> int:
        """Action coordinates clipped since the env was made."""
        return int(self.chains.clipped_actions)

    def _observation(self) -> dict[str, np.ndarray]:
        return {key: value[0] for key, value in self.chains.observation().items()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self.chains.reset_tensor(self.np_random)
        return self._observation(), {"t_prev": self.chains.prev_timesteps[0]}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        reward, done = self.chains.step_tensor(torch.as_tensor(action).unsqueeze(0))
        obs = self._observation()
        info: dict[str, Any] = {"clipped": int(self.chains.last_clipped[0])}
        if done:
            info["x0"] = obs["x"]
            return obs, float(reward[0]), True, False, info
        info["t_prev"] = self.chains.prev_timesteps[self.chains.t]
        return obs, 0.0, False, False, info
