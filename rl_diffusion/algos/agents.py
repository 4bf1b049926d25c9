"""`--algo sb3-sac | sb3-td3 | sb3-a2c | sb3-ppo-mlp`: stable-baselines3's algorithms with its default
`MultiInputPolicy`, steering the frozen pretrained model through the env's residual or noise action mode.

The agent is SB3's, unchanged. The pretrained network lives in the env (`DenoisingVectorEnv` with the
pretrained eps network), all chains step as one batch through `DenoisingVecEnvAdapter`, and one epoch
is one episode of all `--chains` chains. The fine-tuned sampler is the pretrained network plus the
agent's deterministic action (`agent_sampling.sample_agent`). With `--kl-coef` the residual env lowers
each step's reward by beta ||a||^2 / 2 (env.py).

Settings are SB3's defaults except: learning_rate = --lr, gamma = 1 (the reward comes at x_0), seed,
device; on-policy (a2c, ppo-mlp): n_steps = one episode, gae_lambda = 1, max_grad_norm = --grad-clip,
and for PPO batch_size = --minibatch-size, n_epochs = --inner-epochs, clip_range = --clip-range;
off-policy (sac, td3): gradient_steps = --inner-epochs per env step and a replay buffer that holds the
whole run, so it is never overwritten and a checkpoint records it with its fill level.
"""

from __future__ import annotations

import functools
import io
import time
import warnings

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from tqdm import tqdm

from rl_diffusion.agent_sampling import AGENTS, load_agent, make_env
from rl_diffusion.algos.sb3 import DenoisingVecEnvAdapter, learn
from rl_diffusion.checkpoint import (
    StopSignal,
    generator_state,
    rng_state,
    set_generator_state,
    set_rng_state,
)
from rl_diffusion.run import Setup, log_epoch, save_checkpoint


def make_agent(run: Setup) -> BaseAlgorithm:
    """The SB3 algorithm of `run.config.algo` with its default MultiInputPolicy on `run.config.chains` chains."""
    cfg = run.config
    env = DenoisingVecEnvAdapter(make_env(cfg, run.pretrained, cfg.chains, run.device))
    episode = env.env.steps_per_episode
    kwargs: dict = dict(learning_rate=cfg.lr, gamma=1.0, seed=cfg.seed, device=run.device)
    if issubclass(AGENTS[cfg.algo], OffPolicyAlgorithm):
        kwargs.update(gradient_steps=cfg.inner_epochs, buffer_size=run.epochs * episode * cfg.chains)
    else:
        kwargs.update(n_steps=episode, gae_lambda=1.0, max_grad_norm=cfg.max_grad_norm)
        if cfg.algo == "sb3-ppo-mlp":
            kwargs.update(
                batch_size=min(cfg.minibatch_size, episode * cfg.chains),
                n_epochs=cfg.inner_epochs,
                clip_range=cfg.clip_range,
            )
    with warnings.catch_warnings():
        # a smaller last minibatch when minibatch_size does not divide the rollout is intended, as in ddpo.py
        warnings.filterwarnings("ignore", message="You have specified a mini-batch size")
        model = AGENTS[cfg.algo]("MultiInputPolicy", env, **kwargs)
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


class AgentCallback(BaseCallback):
    """One epoch per episode of all chains, logged and checkpointed by the shared `log_epoch` and `save_checkpoint`.

    An episode ends inside an env step and the agent's update for that step comes after it, so the
    epoch boundary (what a checkpoint holds) is the state before the next step: the start of the
    next rollout, or the end of training. Logged per epoch besides the rewards: kl/to_pretrained
    (the episode's summed closed-form KL, residual mode), env/clipped_fraction and SB3's own
    train/* values as sb3/* (those of the updates so far). On SIGINT/SIGTERM `_on_step` returns
    False and `train` saves the last boundary.
    """

    def __init__(self, run: Setup, start: int, reward_queries: int, stop: StopSignal, bar: tqdm):
        super().__init__()
        self.run, self.stop, self.bar = run, stop, bar
        self.epoch = self.saved = start  # epochs finished / checkpointed
        self.reward_queries = reward_queries
        self.pending = False  # an episode ended and its boundary is not reached yet
        self.boundary: dict = {}
        self.clipped_before = 0
        self.started = time.perf_counter()

    def _on_training_start(self) -> None:
        self.clipped_before = int(self.model.env.env.clipped_actions)

    def _on_step(self) -> bool:
        if self.locals["dones"].all():
            adapter, run = self.model.env, self.run
            clipped = int(adapter.env.clipped_actions)
            scalars = {
                "kl/to_pretrained": adapter.kl.mean().item(),
                "kl/to_pretrained_max": adapter.kl.max().item(),
                "env/clipped_fraction": (clipped - self.clipped_before)
                / (adapter.env.steps_per_episode * adapter.x0.numel()),
                **{
                    f"sb3/{key[len('train/') :]}": float(v)
                    for key, v in self.model.logger.name_to_value.items()
                    if key.startswith("train/")
                },
            }
            self.clipped_before = clipped
            self.reward_queries += len(adapter.rewards)
            now = time.perf_counter()
            log_epoch(run, self.epoch, self.reward_queries, adapter.x0, adapter.rewards, scalars, now - self.started)
            self.started = now
            self.epoch += 1
            self.pending = True
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{run.history[-1]['reward/mean']:.3f}")
        return self.stop.received is None

    def _at_boundary(self) -> None:
        self.pending = False
        self.boundary = train_state(self.model, self.reward_queries, len(self.run.history))
        if self.epoch % self.run.config.checkpoint_every == 0 or self.epoch == self.run.epochs:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Save the last epoch boundary, unless it is saved already (or no epoch has finished)."""
        epoch = self.boundary.get("epochs_logged", 0)
        if epoch > self.saved:
            del (
                self.run.history[epoch:],
                self.run.frames[epoch:],
            )  # epochs logged after the boundary are run again on resume
            save_checkpoint(self.run, epoch - 1, self.boundary)
            self.saved = epoch

    def _on_rollout_start(self) -> None:
        if self.pending:
            self._at_boundary()

    def _on_training_end(self) -> None:
        if self.pending and self.stop.received is None:
            self._at_boundary()


def train_state(model: BaseAlgorithm, reward_queries: int, epochs_logged: int) -> dict:
    """What a continuation needs: the SB3 model (policy, optimizers, counters, next observation) as bytes, the
    replay buffer and its fill level, every RNG (SB3's action space's too) and the chains' next x_T."""
    agent = io.BytesIO()
    model.save(agent)
    env = model.env.env
    buffer = getattr(model, "replay_buffer", None)
    return {
        "agent": agent.getvalue(),
        "replay_buffer": buffer,
        "replay_fill": None if buffer is None else (buffer.pos, buffer.full),
        "rng": rng_state(),
        "action_space_rng": model.action_space.np_random.bit_generator.state,
        "env_rng": env.np_random.bit_generator.state,
        "env_generator": generator_state(env.generator),
        "x_T": env.x,
        "c": env.c,
        "reward_queries": reward_queries,
        "epochs_logged": epochs_logged,
    }


def load_train_state(run: Setup, model: BaseAlgorithm, state: dict) -> BaseAlgorithm:
    """The model of a checkpoint on `model`'s env, with its replay buffer, RNGs and next x_T put back."""
    env = model.env
    model = load_agent(run.config.algo, state["agent"], env, run.device)
    if state["replay_buffer"] is not None:
        model.replay_buffer = state["replay_buffer"]
        model.replay_buffer.pos, model.replay_buffer.full = state["replay_fill"]
    set_rng_state(state["rng"])
    model.action_space.np_random.bit_generator.state = state["action_space_rng"]
    env.env.np_random.bit_generator.state = state["env_rng"]
    set_generator_state(env.env.generator, state["env_generator"])
    env.env.start(state["x_T"], state["c"])
    return model


def train(run: Setup, resume: bool = False, progress: bool = True) -> dict:
    """Train the agent for run.epochs episodes of all chains; returns the final metrics.

    resume=True continues from the newest checkpoint as if the run had never stopped (on CPU).
    """
    model = make_agent(run)
    steps_per_epoch = model.env.env.steps_per_episode * run.config.chains
    return learn(run, model, functools.partial(load_train_state, run), AgentCallback, steps_per_epoch, resume, progress)
