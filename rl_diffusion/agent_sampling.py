"""Sampling from a finished stable-baselines3 agent run (`--algo sb3-sac | sb3-td3 | sb3-a2c | sb3-ppo-mlp`):
the pretrained network steered by the agent's deterministic action. Evaluation and `sample` use it; the
training side is rl_diffusion/algos/agents.py."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from stable_baselines3 import A2C, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecEnv
from torch import Tensor

from rl_diffusion.checkpoint import CheckpointManager, LoadedRun, load_run
from rl_diffusion.config import saved_config
from rl_diffusion.env import DenoisingVectorEnv
from rl_diffusion.finetune import FinetuneConfig

AGENTS: dict[str, type[BaseAlgorithm]] = {"sb3-sac": SAC, "sb3-td3": TD3, "sb3-a2c": A2C, "sb3-ppo-mlp": PPO}


def make_env(cfg: FinetuneConfig, pretrained: LoadedRun, num_envs: int, device: torch.device) -> DenoisingVectorEnv:
    """The env of `cfg.action_mode` around the frozen pretrained network, `num_envs` chains in one batch."""
    ckpt = pretrained.checkpoint
    return DenoisingVectorEnv(
        reward=cfg.reward,
        reward_kwargs=cfg.reward_args,
        **cfg.sampling,
        num_envs=num_envs,
        action_mode=cfg.action_mode,
        kl_coef=cfg.kl_coef,
        device=device,
        diffusion=pretrained.diffusion,
        data_shape=tuple(ckpt["data"]["shape"]),
        num_classes=int(ckpt["model_config"].get("num_classes") or 0),
        eps_model=pretrained.model,
    )


def load_agent(algo: str, agent: bytes, env: VecEnv | None, device: torch.device) -> BaseAlgorithm:
    """An SB3 model saved by `train_state`; with env, ready to continue on it without a reset."""
    model = AGENTS[algo].load(io.BytesIO(agent), env=env, device=device, force_reset=False)
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def sample_agent(
    run_dir: Path, num_samples: int, seed: int, device: torch.device, c: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """num_samples samples of an agent run's fine-tuned sampler: the pretrained network plus the agent's
    deterministic action, from x_T (and labels, unless `c` [N] gives them) drawn with `seed`.

    Returns x_0 [N, *shape], the labels [N] or None, and each chain's path KL to the pretrained model
    [N], sum_k ||a_k||^2 / 2 (exact for this deterministic agent; None in noise mode, which has no
    closed form).
    """
    cfg = saved_config(FinetuneConfig, run_dir)
    state = CheckpointManager(run_dir).load_latest(map_location=device)["train_state"]
    env = make_env(cfg, load_run(Path(cfg.run), device), num_samples, device)
    agent = load_agent(cfg.algo, state["agent"], None, device)
    env.reset(seed=seed)
    if c is not None:
        env.start(env.x, c)
    while env.t < env.steps_per_episode:
        actions, _ = agent.predict(env.observation(), deterministic=True)
        env.step_tensor(torch.as_tensor(actions))
    return env.x, env.c, env.episode_kl if cfg.action_mode == "residual" else None
