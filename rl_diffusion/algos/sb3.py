"""`--algo sb3-ppo`: stable-baselines3's PPO on the denoising MDP, over the same core as the native algorithms.

`DiffusionPolicy` is an SB3 actor-critic whose actor IS the pretrained eps network, its Gaussian that of
`GaussianDiffusion.reverse_step`; `DenoisingVecEnvAdapter` is SB3's VecEnv over one `DenoisingVectorEnv`;
`EpochCallback` logs and checkpoints through run.py's shared helpers, as the native algorithms do.

One epoch is one PPO rollout (one chain per env: n_steps = steps per chain) and one update, with
gamma = gae_lambda = 1 (every step's return is r(x_0), its advantage r(x_0) - V(x_t, t), normalised per
minibatch), ent_coef = 0 (the entropy is a constant) and vf_coef = 0.5 (SB3's default). `--kl-coef beta`
lowers each step's reward by beta (log pi_theta(a_k | x_k) - log p_pre(a_k | x_k)) after the rollout,
then recomputes returns and advantages: PPO then follows the gradient of E[r] - beta KL(path), the native
trainer's objective. Why, and how it differs from ddpo-is: docs/design.md, section 4.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, create_mlp
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn
from torch import Tensor, nn
from tqdm import tqdm

from rl_diffusion.algos.loop import finish_run
from rl_diffusion.checkpoint import StopSignal, generator_state, rng_state, set_generator_state, set_rng_state
from rl_diffusion.diffusion import DenoisingProcess, ReverseStep
from rl_diffusion.env import DenoisingVectorEnv
from rl_diffusion.errors import UserError
from rl_diffusion.path_kl import Pairs, path_kls, policy_step
from rl_diffusion.run import Setup, log_epoch, restore_checkpoint, save_checkpoint, write_hyperparameters

# SB3 logger keys of an update -> our TensorBoard tags (the names ddpo.py logs).
PPO_TAGS = {
    "train/policy_gradient_loss": "loss/policy",
    "train/value_loss": "loss/value",
    "train/approx_kl": "ppo/approx_kl",
    "train/clip_fraction": "ppo/clipfrac",
}


class CriticFeatures(BaseFeaturesExtractor):
    """The critic's input [flatten(x_t), t / T, one-hot c] from SB3's preprocessed dict observation.

    No parameters. SB3's preprocessing has already cast x and t to float and one-hot encoded c;
    T is the upper bound of the observation's t box (the env sets it to num_timesteps).
    """

    def __init__(self, observation_space: spaces.Dict):
        num_classes = int(observation_space["c"].n) if "c" in observation_space.spaces else 0
        super().__init__(observation_space, int(np.prod(observation_space["x"].shape)) + 1 + num_classes)
        self.num_timesteps = float(observation_space["t"].high.max())

    def forward(self, obs: dict[str, Tensor]) -> Tensor:
        parts = [obs["x"].flatten(1), obs["t"].reshape(-1, 1) / self.num_timesteps]
        if "c" in obs:
            parts.append(obs["c"].flatten(1))
        return torch.cat(parts, dim=1)


class DiffusionPolicy(ActorCriticPolicy):
    """PPO's actor-critic where the actor is the pretrained eps network and sigma is the schedule's.

    pi(x_{t_prev} | x_t, t, c) = N(mu_theta(x_t, t, c), sigma_t^2 I) as computed by
    `diffusion.reverse_step(eps_model(x_t, t, c), x_t, t, t_prev=...)`. No learned log-std, no
    action head, no orthogonal re-initialisation: the pretrained weights are used as they are.
    The critic V(x_t, t / T) is a separate small MLP with PyTorch's default init.

    Actions are clamped to the action box (the env's +-action_bound) and the log-prob is that of
    the clamped action under the same Gaussian: SB3's collect_rollouts clips actions only on the
    way to env.step and stores the unclipped action and its log-prob, so without the clamp here
    the update would train on actions the env never took. SB3's clip is then a no-op.

    The eps network stays in eval mode, also while SB3 trains (`set_training_mode`): dropout or
    batch norm in train mode would make the update's log-probs differ from the rollout's, so the
    PPO ratio would not be 1 before the first step. Only the critic follows SB3's mode.

    Observations are the env's dict {x, t (, c)}. Fresh from the env t is int64 [N, 1]; out of
    SB3's rollout buffer it has the dtype of the t box (int64 here, float in other SB3 versions):
    the actor reads it as long either way (exact: t is a small integer).

    Args:
        observation_space, action_space, lr_schedule: given by SB3.
        eps_model: eps_theta(x, t, c), called as eps_model(x [B, *shape], t long [B], c long [B] or None).
            Registered as a submodule and trained in place: the caller's module is the policy
            (and is put in eval mode).
        diffusion: the process whose `reverse_step` defines the Gaussian.
        timesteps: the decreasing diffusion times a chain visits (`diffusion.timesteps(...)`);
            the step from timesteps[k] lands on timesteps[k + 1], the last one on 0.
        sampler: "ddpm" or "ddim", as in `reverse_step`.
        eta: DDIM stochasticity (> 0: the policy needs a density); ignored by "ddpm".
        log_prob_reduction: "sum" (exact log-density) or "mean" over data dimensions.
        critic_arch: hidden widths of the critic MLP.
        activation_fn: the critic's activation.
        kwargs: passed to ActorCriticPolicy (optimizer_class, optimizer_kwargs, use_sde=False, ...).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        *,
        eps_model: nn.Module,
        diffusion: DenoisingProcess,
        timesteps: Sequence[int],
        sampler: str = "ddpm",
        eta: float = 1.0,
        log_prob_reduction: str = "sum",
        critic_arch: Sequence[int] = (64, 64),
        activation_fn: type[nn.Module] = nn.Tanh,
        **kwargs: Any,
    ):
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            activation_fn=activation_fn,
            ortho_init=False,
            features_extractor_class=CriticFeatures,
            **kwargs,
        )
        self.eps_model = eps_model.eval()
        self.diffusion = diffusion
        self.sampler, self.eta, self.log_prob_reduction = sampler, eta, log_prob_reduction
        prev_timestep = torch.zeros(diffusion.num_timesteps + 1, dtype=torch.long)
        prev_timestep[list(timesteps)] = torch.tensor(list(timesteps[1:]) + [0])
        self.register_buffer("prev_timestep", prev_timestep)  # t -> t_prev, moves with .to(device)
        self.register_buffer("action_low", torch.as_tensor(action_space.low))
        self.register_buffer("action_high", torch.as_tensor(action_space.high))
        self.value_net = nn.Sequential(*create_mlp(self.features_dim, 1, list(critic_arch), activation_fn))
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        """Replaces SB3's, which makes an action head, a learned log-std, orthogonal init and the
        optimizer; the networks and the optimizer are made in __init__, once eps_model is attached."""

    def _state(self, obs: PyTorchObs) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x_t float32 [B, *shape], t long [B], c long [B] or None) from a dict observation."""
        c = obs["c"].reshape(-1).long() if "c" in obs else None
        return obs["x"].float(), obs["t"].reshape(-1).long(), c

    def set_training_mode(self, mode: bool) -> None:
        """SB3's train/eval switch for the critic; the eps network stays in eval mode (see the class docstring)."""
        super().set_training_mode(mode)
        self.eps_model.eval()

    def reverse_step(self, obs: PyTorchObs, actions: Tensor | None = None, deterministic: bool = False) -> ReverseStep:
        """The shared reverse step at these states: scores `actions`, or takes an action and scores it.

        A taken action is a sample (the mean if deterministic) clamped to the action box; its
        log-prob is that of the clamped action. One eps network call; actions may come flattened
        ([B, D] from SB3's buffer).
        """
        x, t, c = self._state(obs)
        eps = self.eps_model(x, t, c)
        kwargs = dict(
            t_prev=self.prev_timestep[t], sampler=self.sampler, eta=self.eta, log_prob_reduction=self.log_prob_reduction
        )
        if actions is None:
            sampled = self.diffusion.reverse_step(eps, x, t, **kwargs)
            actions = (sampled.mean if deterministic else sampled.x_prev).clamp(self.action_low, self.action_high)
        return self.diffusion.reverse_step(eps, x, t, x_prev=actions.reshape(x.shape), **kwargs)

    def entropy(self, step: ReverseStep) -> Tensor:
        """Entropy [B] of N(mean, sigma^2 I) in nats, reduced over dimensions like the log-prob; constant in theta."""
        per_dim = 0.5 * math.log(2 * math.pi * math.e) + step.sigma.log()
        return per_dim * step.mean[0].numel() if self.log_prob_reduction == "sum" else per_dim

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(actions [B, *shape], values [B, 1], log pi(actions) [B]), as SB3's collect_rollouts expects."""
        step = self.reverse_step(obs, deterministic=deterministic)
        return step.x_prev, self.predict_values(obs), step.log_prob

    def evaluate_actions(self, obs: PyTorchObs, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(values [B, 1], log pi(actions) [B], entropy [B]) under the current weights, for PPO's update."""
        step = self.reverse_step(obs, actions)
        return self.predict_values(obs), step.log_prob, self.entropy(step)

    def predict_values(self, obs: PyTorchObs) -> Tensor:
        """V(x_t, t) [B, 1]: the expected terminal reward from this state."""
        return self.value_net(self.extract_features(obs))

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> Tensor:
        return self.reverse_step(observation, deterministic=deterministic).x_prev

    def get_distribution(self, obs: PyTorchObs) -> NoReturn:
        raise NotImplementedError(
            "the reverse step is not an SB3 Distribution; use reverse_step() or evaluate_actions()"
        )


class DenoisingVecEnvAdapter(VecEnv):
    """SB3's VecEnv interface over one `DenoisingVectorEnv`: its N chains are SB3's N envs.

    Every step is one `step_tensor` call for all chains. The step that reaches x_0 returns the
    rewards, dones all True, and per env info["terminal_observation"] (x = x_0, t = [0]); then it
    resets every chain and returns the new first observation (SB3's autoreset). That episode's x_0,
    task rewards r(x_0, c) (without a KL penalty) and summed per-step KL stay in `x0`
    [N, *shape], `rewards` [N] and `kl` [N] (torch, on the env's device) for logging.

    The chains are one env: get_attr/set_attr/env_method act on it once, whatever the indices.
    Actions arrive as numpy (inside the action box: the policy clamps them) and are converted here.
    Seeding (`seed(s)`, applied at the next reset) seeds the env's generators (x_T, and labels).
    """

    def __init__(self, env: DenoisingVectorEnv):
        self.env = env
        self.x0: Tensor | None = None
        self.rewards: Tensor | None = None
        self.kl: Tensor | None = None
        self._actions: Tensor | None = None
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    def reset(self) -> dict[str, np.ndarray]:
        obs, _ = self.env.reset(seed=self._seeds[0])
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = torch.as_tensor(actions)

    def step_wait(self) -> VecEnvStepReturn:
        rewards, done = self.env.step_tensor(self._actions)
        if not done:
            return (
                self.env.observation(),
                rewards.cpu().numpy(),
                np.zeros(self.num_envs, dtype=bool),
                [{} for _ in range(self.num_envs)],
            )
        self.x0, self.rewards, self.kl = self.env.x, self.env.final_rewards, self.env.episode_kl
        final = self.env.observation()
        infos = [
            {"terminal_observation": {key: value[i] for key, value in final.items()}} for i in range(self.num_envs)
        ]
        self.env.reset_tensor()
        return self.env.observation(), rewards.cpu().numpy(), np.ones(self.num_envs, dtype=bool), infos

    def close(self) -> None:
        self.env.close()

    def _count(self, indices: VecEnvIndices) -> int:
        if indices is None:
            return self.num_envs
        return 1 if isinstance(indices, int) else len(list(indices))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self.env, attr_name)] * self._count(indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.env, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        return [getattr(self.env, method_name)(*method_args, **method_kwargs)] * self._count(indices)

    def env_is_wrapped(self, wrapper_class: type, indices: VecEnvIndices = None) -> list[bool]:
        return [False] * self._count(indices)


def make_ppo(run: Setup) -> PPO:
    """SB3 PPO on `run`: policy = run.policy (trained in place), env = `run.config.chains` chains in one batch.

    n_steps is the number of steps of one chain, so a rollout is exactly one chain per env. The
    minibatch is `minibatch_size` (state, action) pairs, clamped to the rollout's n_steps * chains;
    when it does not divide the rollout, the last minibatch of each pass is smaller.
    SB3's logger stays in memory (no files: the shared writer logs).
    """
    cfg = run.config
    env = DenoisingVectorEnv(
        reward=cfg.reward,
        reward_kwargs=cfg.reward_args,
        sampler=cfg.sampler,
        sampling_steps=cfg.sampling_steps or None,
        eta=cfg.eta,
        num_envs=cfg.chains,
        action_mode="sample",
        device=run.device,
        diffusion=run.diffusion,
        data_shape=run.data_shape,
        num_classes=int(run.pretrained.checkpoint["model_config"].get("num_classes") or 0),
    )
    n_steps = run.steps_per_chain
    batch_size = min(cfg.minibatch_size, n_steps * cfg.chains)
    if batch_size < 2:  # PPO's per-minibatch advantage normalisation needs two
        raise UserError(
            f"--algo sb3-ppo needs at least 2 (state, action) pairs per minibatch, got {batch_size}; "
            "raise --chains or --minibatch-size"
        )
    with warnings.catch_warnings():
        # a smaller last minibatch when minibatch_size does not divide the rollout is intended, as in ddpo.py
        warnings.filterwarnings("ignore", message="You have specified a mini-batch size")
        model = PPO(
            DiffusionPolicy,
            DenoisingVecEnvAdapter(env),
            learning_rate=cfg.lr,
            n_steps=n_steps,
            batch_size=batch_size,
            n_epochs=cfg.inner_epochs,
            gamma=1.0,
            gae_lambda=1.0,
            clip_range=cfg.clip_range,
            normalize_advantage=True,
            ent_coef=0.0,
            max_grad_norm=cfg.max_grad_norm,
            tensorboard_log=None,
            seed=cfg.seed,
            device=run.device,
            policy_kwargs=dict(
                eps_model=run.policy,
                diffusion=run.diffusion,
                timesteps=env.timesteps,
                sampler=cfg.sampler,
                eta=cfg.eta,
                log_prob_reduction=cfg.log_prob_reduction,
                optimizer_class=torch.optim.AdamW,
                optimizer_kwargs={"weight_decay": 0.0},  # the native trainer's optimizer
            ),
        )
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def rollout_pairs(buffer: DictRolloutBuffer, prev_timestep: Tensor, data_shape: tuple[int, ...]) -> Pairs:
    """A filled rollout buffer ([n_steps, n_envs], step-major, before SB3 flattens it) as ddpo's Pairs."""
    device = prev_timestep.device
    t = torch.as_tensor(buffer.observations["t"], device=device).flatten().long()
    c = buffer.observations.get("c")
    return Pairs(
        x_t=torch.as_tensor(buffer.observations["x"], device=device).reshape(-1, *data_shape),
        t=t,
        t_prev=prev_timestep[t],
        x_prev=torch.as_tensor(buffer.actions, device=device).reshape(-1, *data_shape),
        log_prob_old=torch.as_tensor(buffer.log_probs, device=device).flatten(),
        c=None if c is None else torch.as_tensor(c, device=device).flatten().long(),
    )


def log_ratios_to_pretrained(run: Setup, pairs: Pairs) -> Tensor:
    """L_k = log pi_theta(a_k | x_k) - log p_pre(a_k | x_k) of every pair [N], in nats summed over data dimensions.

    Computed from the two means of the shared reverse step (one sigma):
    L_k = (||a - mu_pre||^2 - ||a - mu_theta||^2) / (2 sigma^2), whose mean at x_k is kl_k.
    """
    with torch.no_grad():
        ratios = []
        for idx in torch.arange(len(pairs), device=pairs.t.device).split(run.config.minibatch_size):
            ours = policy_step(run.diffusion, run.config, run.policy, pairs, idx)
            ref = policy_step(run.diffusion, run.config, run.reference, pairs, idx)
            action = pairs.x_prev[idx]
            squared = ((action - ref.mean) ** 2 - (action - ours.mean) ** 2).flatten(1).sum(1)
            ratios.append(squared / (2 * ref.sigma**2))
    return torch.cat(ratios)


class EpochCallback(BaseCallback):
    """One epoch per rollout: log it with the shared `log_epoch`, checkpoint with the shared `save_checkpoint`.

    At the end of rollout e it logs the rollout's x_0 and rewards, "env/clipped_fraction" (action
    coordinates the policy clamped to the action box, i.e. those on its boundary / all action
    coordinates of the rollout), the exact path KL to the pretrained model, and PPO's losses.
    The losses (loss/policy, loss/value, ppo/approx_kl, ppo/clipfrac) are those of the update
    made after rollout e - 1, i.e. of the update that produced the policy sampled in rollout e:
    SB3 logs an update after the rollout that feeds it, so epoch 1 has none and the last
    update's are not logged (native ddpo logs the update of the same epoch). perf/steps_per_sec
    counts the time since the previous epoch was logged: that update, this rollout and its logging.

    Checkpoints hold the state between an update and the next rollout (as ddpo.train saves after
    its update): taken at the start of a rollout, or at the end of training. On SIGINT/SIGTERM
    `_on_step` returns False, SB3 drops the unfinished rollout, and `train` saves the last
    finished epoch.
    """

    def __init__(self, run: Setup, start: int, reward_queries: int, stop: StopSignal, bar: tqdm):
        super().__init__()
        self.run, self.stop, self.bar = run, stop, bar
        self.epoch = self.saved = start  # epochs finished / checkpointed
        self.reward_queries = reward_queries
        self.in_rollout = False
        self.boundary: dict = {}
        self.clipped = 0
        self.started = time.perf_counter()

    @property
    def adapter(self) -> DenoisingVecEnvAdapter:
        return self.model.env

    def train_state(self) -> dict:
        """What a continuation needs besides the policy weights: critic, optimizer, every RNG, the next x_T."""
        env = self.adapter.env
        return {
            "critic": self.model.policy.value_net.state_dict(),
            "optimizer": self.model.policy.optimizer.state_dict(),
            "rng": rng_state(),
            "env_rng": env.np_random.bit_generator.state,
            "env_generator": generator_state(env.generator),
            "x_T": env.x,
            "c": env.c,
            "reward_queries": self.reward_queries,
        }

    def _at_epoch_boundary(self) -> None:
        """After an update, before the next rollout: refuse a diverged update, snapshot the train state."""
        loss = self.model.logger.name_to_value.get("train/loss")
        if loss is not None and not math.isfinite(loss):
            raise UserError(
                f"the sb3-ppo loss became {loss} after epoch {self.epoch}; "
                f"the last good checkpoint is kept in {self.run.out} (try a lower --lr)"
            )
        self.boundary = self.train_state()

    def checkpoint(self) -> None:
        """Save the last epoch boundary, unless it is saved already (or no epoch has finished)."""
        if self.epoch > self.saved:
            save_checkpoint(self.run, self.epoch - 1, self.boundary)
            self.saved = self.epoch

    def _on_rollout_start(self) -> None:
        self._at_epoch_boundary()
        if self.epoch % self.run.config.checkpoint_every == 0:
            self.checkpoint()
        self.in_rollout = True
        self.clipped = 0

    def _on_step(self) -> bool:
        actions, box = self.locals["actions"], self.model.action_space
        self.clipped += int(np.count_nonzero((actions <= box.low) | (actions >= box.high)))
        return self.stop.received is None

    def _on_rollout_end(self) -> None:
        run, model = self.run, self.model
        rewards = self.adapter.rewards
        self.reward_queries += len(rewards)
        buffer = model.rollout_buffer
        pairs = rollout_pairs(buffer, model.policy.prev_timestep, run.data_shape)
        kl = path_kls(run.diffusion, run.config, run.policy, run.reference, pairs, model.n_steps).sum(0)
        if run.config.kl_coef > 0:  # SB3 computed the returns before this callback: recompute them with the penalty
            buffer.rewards -= (
                run.config.kl_coef * log_ratios_to_pretrained(run, pairs).reshape(buffer.rewards.shape).cpu().numpy()
            )
            buffer.compute_returns_and_advantage(last_values=self.locals["values"], dones=self.locals["dones"])
        scalars = {
            "env/clipped_fraction": self.clipped / pairs.x_prev.numel(),
            "kl/to_pretrained": kl.mean().item(),
            "kl/to_pretrained_max": kl.max().item(),
            **{
                tag: float(model.logger.name_to_value[key])
                for key, tag in PPO_TAGS.items()
                if key in model.logger.name_to_value
            },
        }
        now = time.perf_counter()
        log_epoch(run, self.epoch, self.reward_queries, self.adapter.x0, rewards, scalars, now - self.started)
        self.started, self.in_rollout = now, False
        self.epoch += 1
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{run.history[-1]['reward/mean']:.3f}", kl=f"{scalars['kl/to_pretrained']:.3f}")

    def _on_training_end(self) -> None:
        if not self.in_rollout:  # learning ran to its end: the current state is a boundary
            self._at_epoch_boundary()


def load_train_state(model: PPO, state: dict) -> PPO:
    """Put a checkpoint's critic, optimizer, RNGs and next x_T back, so `learn` continues without a reset."""
    env = model.env.env
    if "env_generator" not in state:
        raise UserError(
            "this sb3-ppo checkpoint was written by an earlier version of rl-diffusion, which did not keep the env's "
            "noise generator; it cannot continue bit-identically: start the run again"
        )
    model.policy.value_net.load_state_dict(state["critic"])
    model.policy.optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    env.np_random.bit_generator.state = state["env_rng"]
    set_generator_state(env.generator, state["env_generator"])
    env.start(state["x_T"], state["c"])
    model._last_obs = env.observation()
    model._last_episode_starts = np.ones(env.num_envs, dtype=bool)
    return model


def train(run: Setup, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune run.policy with SB3's PPO for run.epochs epochs; returns the final metrics.

    resume=True continues from the newest checkpoint: policy weights (restore_checkpoint(run)), critic,
    optimizer state, python/numpy/torch RNGs, the env's generator and the x_T batch the next
    rollout starts from, history and frames, the reward-query count. That is all the state SB3's
    PPO carries between epochs, so on CPU a resumed run matches an uninterrupted one. Not
    restored: SB3's own counters (num_timesteps, n_updates), which nothing here reads.
    """
    model = make_ppo(run)
    return learn(run, model, load_train_state, EpochCallback, model.n_steps * run.config.chains, resume, progress)


def learn(
    run: Setup,
    model: BaseAlgorithm,
    load: Callable[[BaseAlgorithm, dict], BaseAlgorithm],
    callback_type: type,
    steps_per_epoch: int,
    resume: bool,
    progress: bool,
) -> dict:
    """The one training body of the stable-baselines3 paths (sb3-ppo here, SB3's own agents in agents.py):
    start, or put the newest checkpoint back with `load`, run SB3's `learn` for the epochs left with a
    callback that logs and checkpoints each epoch, and end the run."""
    start, reward_queries = 0, 0
    if resume:
        state = restore_checkpoint(run)
        model = load(model, state)
        start, reward_queries = state["epoch"], state["reward_queries"]
    else:
        write_hyperparameters(run)
    bar = tqdm(total=run.epochs, initial=start, desc=f"{run.config.algo} {run.reward.name}", disable=not progress)
    with StopSignal() as stop, bar:
        callback = callback_type(run, start, reward_queries, stop, bar)
        # reset_num_timesteps=False keeps the restored x_T instead of resetting the env
        model.learn(
            (run.epochs - start) * steps_per_epoch,
            callback=callback,
            reset_num_timesteps=not resume,
            progress_bar=False,
        )
        callback.checkpoint()
    return end_of_training(run, stop, callback.saved)


def end_of_training(run: Setup, stop: StopSignal, saved: int) -> dict:
    """The final metrics or, after SIGINT/SIGTERM, the UserError that says how many epochs the
    checkpoint holds (`saved`) and how to continue."""
    if not stop.received:
        return finish_run(run)
    run.writer.close()
    if saved == 0:
        raise UserError(
            f"stopped by signal {stop.received} before the first epoch finished; nothing was saved in {run.out}"
        )
    raise UserError(
        f"stopped by signal {stop.received} after epoch {saved}; checkpoint saved, continue with --resume {run.out}"
    )
