"""The denoising MDP (docs/design.md, section 1) as Gymnasium environments, one chain or N in lockstep.

t runs down `GaussianDiffusion.timesteps(sampler, sampling_steps)` (T..1 for DDPM, K spaced steps for DDIM)
and the chain ends at x_0 with the reward r(x_0, c); gamma = 1. Every step goes through
`GaussianDiffusion.reverse_step`. Three action modes (`ACTION_MODES`; their observations, KL and seeding:
docs/design.md, section 1):

  sample    the action is x_{t_prev}: the agent is a diffusion policy (algos/sb3.py); the env calls no network.
  residual  x_{t_prev} = mu_pre(x_t, t, c) + sigma_t (a + z), z ~ N(0, I) drawn by the env (a in sigma units):
            a = 0 is exactly the pretrained sampler, and `kl_coef` charges each step kl_k = ||a||^2 / 2.
  noise     one step per episode: the action is x_T, and the env runs DDIM with eta = 0 to x_0.

`DenoisingVectorEnv` holds the chains as torch tensors and steps all of them with one tensor op;
`DenoisingEnv` is a thin view of it with one chain and numpy in and out.
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
from torch import Tensor, nn

from rewards import build_reward
from rl_diffusion.checkpoint import CheckpointManager, load_run, read_run_config
from rl_diffusion.diffusion import DenoisingProcess
from rl_diffusion.errors import UserError
from rl_diffusion.processes import check_sampler, is_deterministic, process_from_config

ACTION_MODES = ("sample", "residual", "noise")
# Default half-width of the action box per mode: sample in data units (far outside the data, so
# clipping flags a broken policy rather than shaping a working one), residual in sigma units,
# noise in N(0, I) units (x_T beyond 3 is rare under the pretrained model).
ACTION_BOUNDS = {"sample": 100.0, "residual": 3.0, "noise": 3.0}


def _process(
    run: str | Path | None,
    diffusion: DenoisingProcess | None,
    data_shape: tuple | None,
    num_classes: int,
    eps_model: nn.Module | None,
    needs_network: bool,
    device: torch.device,
) -> tuple[DenoisingProcess, tuple[int, ...], int, nn.Module | None]:
    """(diffusion, data shape, number of classes, eps network or None): from a run's newest checkpoint, or given
    directly."""
    if run is None:
        if diffusion is None or data_shape is None:
            raise UserError("the denoising env needs a run directory (run=...) or both diffusion= and data_shape=")
        if needs_network and eps_model is None:
            raise UserError("the residual and noise action modes run the pretrained network: give run= or eps_model=")
        return diffusion, tuple(int(n) for n in data_shape), num_classes, eps_model if needs_network else None
    if diffusion is not None or data_shape is not None or eps_model is not None:
        raise UserError("give the denoising env either run= or diffusion= with data_shape= (and eps_model=), not both")
    read_run_config(run)  # a clear error for a directory that is not a run
    if needs_network:
        loaded = load_run(Path(run), device)
        ckpt, model = loaded.checkpoint, loaded.model.requires_grad_(False)
    else:
        ckpt, model = CheckpointManager(run).load_latest(), None
    try:
        return (
            process_from_config(ckpt["diffusion_config"]),
            tuple(int(n) for n in ckpt["data"]["shape"]),
            int(ckpt["model_config"].get("num_classes") or 0),
            model,
        )
    except (KeyError, TypeError) as e:
        raise UserError(
            f"the checkpoint of {run} lacks {e}; give the --out of an rl-diffusion pretrain or finetune run"
        ) from None


def _mode_sampler(action_mode: str, sampler: str | None, eta: float | None, process) -> tuple[str, float]:
    """The reverse chain of a mode: the process's policy sampler (a DDPM's ddpm, a flow's sde) with eta 1 by
    default; its deterministic sampler (DDIM with eta = 0, a flow's Euler ODE) for noise, the only choice there."""
    if action_mode == "noise":
        deterministic = process.DETERMINISTIC["sampler"]
        if sampler not in (None, deterministic) or eta not in (None, 0.0):
            raise UserError(
                f"the noise action mode runs the deterministic {deterministic} sampler (eta = 0: x_0 a function of "
                f"x_T); got sampler={sampler!r}, eta={eta}"
            )
        return deterministic, 0.0
    sampler, eta = sampler or process.POLICY_SAMPLER, 1.0 if eta is None else eta
    check_sampler(sampler, eta)
    if action_mode == "residual" and is_deterministic(sampler, eta):
        raise UserError(
            f"the residual action mode shifts the step in units of its sigma, which is 0 for {sampler} with "
            f"eta = {eta}; use a stochastic sampler (eta > 0)"
        )
    return sampler, eta


class DenoisingVectorEnv(VectorEnv):
    """N denoising chains stepped together as one torch op; all chains share t (fixed-length episodes).

    Autoreset is SAME_STEP (`metadata["autoreset_mode"]`): every chain ends at the same step, and
    that step returns the NEW episode's first observation, terminated = True for all, the rewards,
    and the finished samples in the info as
        "x0":         float32 [N, *data_shape], the final x_0 of every chain;
        "final_obs":  gymnasium's SAME_STEP convention, an object array of per-chain observation
                      dicts (x = x_0, t = [0], ...), with the all-True mask "_final_obs".
    Every step's info also has "clipped" (int [N], action coordinates clipped this step), "kl"
    (float32 [N], this step's closed-form KL to the pretrained model; residual mode only) and,
    for the returned state, "t_prev" (int [N], where the next action lands; 0 in noise mode).

    Torch-level use (no numpy round-trips, e.g. a stable-baselines3 adapter): `reset_tensor()`,
    then `step_tensor(action)` until it returns done = True; it does not autoreset. The state is
    `self.x` (float32 [N, *data_shape] on `device`), `self.c` (long [N] or None) and `self.t`.

    Args:
        run: a pretrain or finetune run directory; the diffusion schedule, data shape, number of
            classes and (residual, noise) the eps network are read from its newest checkpoint.
            Leave None to pass `diffusion`, `data_shape` (and `eps_model`) instead.
        reward: a reward name, 'package.module:factory' path or entry point (see `rewards`).
        reward_kwargs: keyword arguments of the reward factory.
        sampler: "ddpm" (all T steps) or "ddim" (`sampling_steps` spaced steps) for a DDPM, "sde" or "euler"
            for a flow; None: "ddpm" (a flow: "sde"), and the deterministic "ddim" (a flow: "euler") in noise
            mode (the only choice there).
        sampling_steps: K for "ddim", "sde" or "euler"; None means all T.
        eta: DDIM stochasticity (the sde's noise level); None: 1, and 0 in noise mode (the only choice there). In sample
            mode the transition ignores it (the action is the agent's); it is kept so the policy
            acting there knows which reverse step it takes.
        num_envs: N, the number of chains.
        action_mode: "sample", "residual" (default) or "noise"; see the module docstring and docs/design.md, section 1.
        kl_coef: beta >= 0; each step's reward gets -beta kl_k (residual mode: kl_k = ||a||^2 / 2
            nats, a in sigma units). Refused in the other modes, which have no closed form here.
        device: where the chains, the network's calls, actions and rewards live.
        diffusion: the process, when there is no run directory.
        data_shape: shape of one sample, e.g. (2,), when there is no run directory.
        num_classes: labels c drawn uniformly at reset; 0 for unconditional. Read from the run
            when `run` is given.
        eps_model: eps(x [N, *shape], t long [N], c long [N] or None), the frozen pretrained
            network of residual and noise mode when there is no run directory; called as it is
            (put it in eval mode) under no_grad, on `device`.
        action_bound: actions are clipped to [-action_bound, action_bound] per coordinate (data
            units in sample mode, sigma units in residual mode, N(0, I) units in noise mode);
            clipped coordinates are counted. None: `ACTION_BOUNDS[action_mode]`.
        render_mode: must be None; there is nothing to render.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": []}

    def __init__(
        self,
        run: str | Path | None = None,
        reward: str = "target_point",
        reward_kwargs: dict | None = None,
        sampler: str | None = None,
        sampling_steps: int | None = None,
        eta: float | None = None,
        *,
        num_envs: int,
        action_mode: str = "residual",
        kl_coef: float = 0.0,
        device: str | torch.device = "cpu",
        diffusion: DenoisingProcess | None = None,
        data_shape: tuple | None = None,
        num_classes: int = 0,
        eps_model: nn.Module | None = None,
        action_bound: float | None = None,
        render_mode: str | None = None,
    ):
        if render_mode is not None:
            raise UserError(f"the denoising env has no render modes, got render_mode={render_mode!r}")
        if action_mode not in ACTION_MODES:
            raise UserError(f"unknown action_mode '{action_mode}'; choose one of {', '.join(ACTION_MODES)}")
        if num_envs < 1:
            raise UserError(f"num_envs must be at least 1, got {num_envs}")
        action_bound = ACTION_BOUNDS[action_mode] if action_bound is None else float(action_bound)
        if not action_bound > 0:
            raise UserError(f"action_bound must be > 0, got {action_bound}")
        if kl_coef < 0:
            raise UserError(f"kl_coef must be >= 0, got {kl_coef}")
        if kl_coef > 0 and action_mode != "residual":
            raise UserError(
                f"kl_coef needs a closed-form per-step KL, which only the residual action mode has; in {action_mode} "
                "mode it depends on the agent's own density (for a diffusion policy, --algo sb3-ppo --kl-coef adds it)"
            )
        self.action_mode, self.kl_coef, self.action_bound = action_mode, float(kl_coef), action_bound
        self.device = torch.device(device)
        self.diffusion, self.data_shape, self.num_classes, self.eps_model = _process(
            run, diffusion, data_shape, num_classes, eps_model, action_mode != "sample", self.device
        )
        self.sampler, self.eta = _mode_sampler(action_mode, sampler, eta, self.diffusion)
        self.timesteps = self.diffusion.timesteps(self.sampler, sampling_steps)  # K decreasing t's, T first
        self.prev_timesteps = self.timesteps[1:] + [0]  # where step k lands
        self.reward = build_reward(reward, reward_kwargs)
        self.num_envs = num_envs

        box = spaces.Box(-np.inf, np.inf, self.data_shape, np.float32)
        obs = {"x": box, "t": spaces.Box(0, self.diffusion.num_timesteps, (1,), np.int64)}
        if action_mode == "residual":
            obs["x0_hat"] = box
        if self.num_classes > 0:
            obs["c"] = spaces.Discrete(self.num_classes)
        self.single_observation_space = spaces.Dict(obs)
        self.single_action_space = spaces.Box(-self.action_bound, self.action_bound, self.data_shape, np.float32)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)

        self.generator = torch.Generator(device=self.device)
        self._generator_seeded = False
        # Until the first reset the chains count as finished, so stepping them is refused.
        self.x = torch.zeros(num_envs, *self.data_shape, device=self.device)
        self.c: Tensor | None = None
        self.t = self.steps_per_episode  # step index k (0: the first decision), not the diffusion time
        self.eps: Tensor | None = None  # residual mode: the pretrained eps at the current state
        self.last_clipped = torch.zeros(num_envs, dtype=torch.long, device=self.device)
        self.last_kl = torch.zeros(num_envs, device=self.device)
        self.episode_kl = torch.zeros(num_envs, device=self.device)  # sum of kl_k over the episode so far
        self.final_rewards: Tensor | None = None  # r(x_0, c) [N] of the last finished episode, without the KL penalty
        # Summed on the device so that stepping never waits for it; int(...) to read.
        self.clipped_actions = torch.zeros((), dtype=torch.long, device=self.device)

    @property
    def steps_per_episode(self) -> int:
        """Decisions per episode: one per denoising step, or one in noise mode."""
        return 1 if self.action_mode == "noise" else len(self.timesteps)

    @property
    def timestep(self) -> int:
        """The diffusion time t of the current state (T at x_T, 0 at x_0)."""
        return self.timesteps[self.t] if self.t < self.steps_per_episode else 0

    # Torch level

    def seed_generator(self, seed: int | None) -> None:
        """Seed the generator of x_T and step noises with `seed`; once from `np_random` when None and never seeded."""
        if seed is None and self._generator_seeded:
            return
        self.generator.manual_seed(int(self.np_random.integers(2**63 - 1)) if seed is None else seed)
        self._generator_seeded = True

    def _standard_normal(self) -> Tensor:
        return torch.randn((self.num_envs, *self.data_shape), generator=self.generator, device=self.device)

    def _pretrained_eps(self, x: Tensor, k: int) -> Tensor:
        """eps_pre(x, t_k, c) for all chains: one network call."""
        t = torch.full((self.num_envs,), self.timesteps[k], dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self.eps_model(x, t, self.c)

    def _pretrained_step(self, x: Tensor, eps: Tensor, k: int, noise: Tensor) -> Tensor:
        """The pretrained reverse step k from x: mu_pre + sigma_k * noise."""
        return self.diffusion.reverse_step(
            eps, x, self.timesteps[k], t_prev=self.prev_timesteps[k], sampler=self.sampler, eta=self.eta, noise=noise
        ).x_prev

    def _observe(self) -> None:
        """Residual mode: the pretrained eps at the new state, for the next step and for x0_hat."""
        if self.action_mode == "residual" and self.t < self.steps_per_episode:
            self.eps = self._pretrained_eps(self.x, self.t)

    def reset_tensor(self) -> None:
        """Start every chain at x_T ~ N(0, I) from `self.generator` (with c ~ U{0..num_classes-1} from `np_random`)."""
        c = None
        x = self._standard_normal()
        if self.num_classes > 0:
            c = torch.from_numpy(self.np_random.integers(self.num_classes, size=self.num_envs)).to(self.device)
        self.start(x, c)

    def start(self, x_T: Tensor, c: Tensor | None) -> None:
        """Start every chain at the given x_T [N, *data_shape] and labels [N] (or None), e.g. a checkpoint's."""
        self.x, self.c, self.t = x_T.to(self.device), None if c is None else c.to(self.device), 0
        self.episode_kl = torch.zeros(self.num_envs, device=self.device)
        self._observe()

    def step_tensor(self, action: Tensor) -> tuple[Tensor, bool]:
        """Take one decision for every chain with the action clipped to +-action_bound.

        action: [N, *data_shape], any float dtype and device; it is detached, so the state never
        holds the policy's graph. Returns (rewards float32 [N] on `device`, done): r(x_0, c) at the
        last step and 0 before, minus kl_coef * kl_k. No autoreset: after done, `self.x` holds x_0
        until `reset_tensor()`.
        """
        if self.t >= self.steps_per_episode:
            raise RuntimeError(
                "the chains have reached x_0 (or were never reset); call reset() or reset_tensor() first"
            )
        action = action.detach().to(device=self.device, dtype=torch.float32)
        if action.shape != self.x.shape:
            raise ValueError(
                f"action must have shape {tuple(self.x.shape)} ([num_envs, *data_shape]), got {tuple(action.shape)}"
            )
        self.last_clipped = (action.abs() > self.action_bound).flatten(1).sum(1)
        self.clipped_actions += self.last_clipped.sum()
        action = action.clamp(-self.action_bound, self.action_bound)
        if self.action_mode == "sample":
            self.x = action
        elif self.action_mode == "residual":
            # x_{t_prev} = mu_pre + sigma (a + z): the step's own Gaussian, its mean moved by sigma a
            self.x = self._pretrained_step(self.x, self.eps, self.t, noise=action + self._standard_normal())
            self.last_kl = action.square().flatten(1).sum(1) / 2
            self.episode_kl += self.last_kl
        else:
            x, zero = action, torch.zeros_like(action)  # eta = 0: sigma is 0, and no draw from any generator
            for k in range(len(self.timesteps)):
                x = self._pretrained_step(x, self._pretrained_eps(x, k), k, noise=zero)
            self.x = x
        self.t += 1
        self._observe()
        done = self.t == self.steps_per_episode
        if done:
            with torch.no_grad():
                rewards = self.final_rewards = self.reward(self.x, self.c).float()
        else:
            rewards = torch.zeros(self.num_envs, device=self.device)
        if self.kl_coef > 0:
            rewards = rewards - self.kl_coef * self.last_kl
        return rewards, done

    def observation(self) -> dict[str, np.ndarray]:
        """The batched observation of the current state, as numpy copies (safe to modify)."""
        obs = {
            "x": self.x.to("cpu", copy=True).numpy(),
            "t": np.full((self.num_envs, 1), self.timestep, dtype=np.int64),
        }
        if self.action_mode == "residual":
            x0_hat = self.x
            if self.t < self.steps_per_episode:
                t = torch.full((self.num_envs,), self.timestep, dtype=torch.long, device=self.device)
                x0_hat = self.diffusion.clip_x0(self.diffusion.predict_x0(self.x, t, self.eps))
            obs["x0_hat"] = x0_hat.to("cpu", copy=True).numpy()
        if self.c is not None:
            obs["c"] = self.c.to("cpu", copy=True).numpy()
        return obs

    def state_info(self) -> dict[str, np.ndarray]:
        """{"t_prev": int [N]}: where the next action lands (0 in noise mode: the chain runs to x_0)."""
        t_prev = self.prev_timesteps[self.t] if self.action_mode != "noise" else 0
        return {"t_prev": np.full(self.num_envs, t_prev, dtype=np.int64)}

    # Gymnasium vector API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self.seed_generator(seed)
        self.reset_tensor()
        return self.observation(), self.state_info()

    def step(
        self, actions: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        rewards, done = self.step_tensor(torch.as_tensor(actions))
        info: dict[str, Any] = {"clipped": self.last_clipped.cpu().numpy()}
        if self.action_mode == "residual":
            info["kl"] = self.last_kl.cpu().numpy()
        if done:
            final = self.observation()
            final_obs = np.empty(self.num_envs, dtype=object)
            final_obs[:] = [{key: value[i] for key, value in final.items()} for i in range(self.num_envs)]
            info.update(x0=final["x"], final_obs=final_obs, _final_obs=np.ones(self.num_envs, dtype=bool))
            self.reset_tensor()
        info.update(self.state_info())
        return (
            self.observation(),
            rewards.cpu().numpy(),
            np.full(self.num_envs, done),
            np.zeros(self.num_envs, dtype=bool),
            info,
        )


class DenoisingEnv(gymnasium.Env):
    """One denoising chain: a numpy view of a one-chain `DenoisingVectorEnv` on the CPU.

    reset(seed=s) starts the chain (x_T from a generator seeded with s, c from `np_random`);
    info["t_prev"] is where the first action lands. A step that reaches x_0 returns reward
    r(x_0, c), terminated = True and info["x0"]; every other step returns reward 0.0 and
    info["t_prev"]; in residual mode each reward is lowered by kl_coef * info["kl"]. Never
    truncated. info["clipped"] counts the action coordinates clipped this step,
    `clipped_actions` all of them so far.

    Arguments as for `DenoisingVectorEnv` (without num_envs and device).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        run: str | Path | None = None,
        reward: str = "target_point",
        reward_kwargs: dict | None = None,
        sampler: str | None = None,
        sampling_steps: int | None = None,
        eta: float | None = None,
        *,
        action_mode: str = "residual",
        kl_coef: float = 0.0,
        diffusion: DenoisingProcess | None = None,
        data_shape: tuple | None = None,
        num_classes: int = 0,
        eps_model: nn.Module | None = None,
        action_bound: float | None = None,
        render_mode: str | None = None,
    ):
        self.chains = DenoisingVectorEnv(
            run,
            reward,
            reward_kwargs,
            sampler,
            sampling_steps,
            eta,
            num_envs=1,
            action_mode=action_mode,
            kl_coef=kl_coef,
            diffusion=diffusion,
            data_shape=data_shape,
            num_classes=num_classes,
            eps_model=eps_model,
            action_bound=action_bound,
            render_mode=render_mode,
        )
        self.observation_space = self.chains.single_observation_space
        self.action_space = self.chains.single_action_space

    @property
    def clipped_actions(self) -> int:
        """Action coordinates clipped since the env was made."""
        return int(self.chains.clipped_actions)

    def _observation(self) -> dict[str, np.ndarray]:
        return {key: value[0] for key, value in self.chains.observation().items()}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        super().reset(seed=seed)
        self.chains.reset(seed=seed)
        return self._observation(), {"t_prev": int(self.chains.state_info()["t_prev"][0])}

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        reward, done = self.chains.step_tensor(torch.as_tensor(action).unsqueeze(0))
        obs = self._observation()
        info: dict[str, Any] = {"clipped": int(self.chains.last_clipped[0])}
        if self.chains.action_mode == "residual":
            info["kl"] = float(self.chains.last_kl[0])
        if done:
            info["x0"] = obs["x"]
            return obs, float(reward[0]), True, False, info
        info["t_prev"] = int(self.chains.state_info()["t_prev"][0])
        return obs, float(reward[0]), False, False, info
