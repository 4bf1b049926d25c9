"""RTB: relative trajectory balance, an off-policy balance loss whose fixed point is the tilted optimum.

Venkatraman et al. (2024), "Amortizing intractable inference in diffusion models for vision, language,
and control". For a chain tau = (x_T, ..., x_0), x_T ~ N(0, I) shared by the policy and the prior,

    delta(tau) = log Z + sum_k log pi_theta(x_{k+1} | x_k) - sum_k log pi_ref(x_{k+1} | x_k) - r(x_0) / beta,
    L = mean over training chains of h(delta(tau)),  h(d) = d^2 for |d| <= c, 2 c |d| - c^2 beyond (Huber's),

with log Z a learned scalar (--log-z-lr) and c = --delta-clip (0: d^2 throughout). Every delta is 0 exactly
when p_theta(tau) = p_ref(tau) exp(r(x_0) / beta) / Z, whatever chains it is trained on: fresh ones from an
exploratory sampler (--explore-scale) and replayed ones (--replay-size). The fixed point, why Huber's,
the exploration schedule, the replay buffer's limits, the flat-memory gradient, log Z's start and data
parallelism: docs/design.md, section 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rl_diffusion.algos.base import Batch
from rl_diffusion.algos.exploration import ExplorationSettings, Exploring
from rl_diffusion.config import arg
from rl_diffusion.diffusion import Trajectory
from rl_diffusion.errors import UserError
from rl_diffusion.path_kl import Pairs, policy_step


def initial_log_z(log_ratio: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """log mean_b exp(r_b / beta - log_ratio_b): the importance estimate of log Z = log E_ref exp(r / beta) from
    chains of the policy, log_ratio [B] = sum_k log pi_theta - log pi_ref of each."""
    return torch.logsumexp(rewards / beta - log_ratio, 0) - math.log(len(rewards))


def relative_tb_delta(log_z: Tensor, log_ratio: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """delta [B] = log Z + sum_k (log pi_theta - log pi_ref) - r / beta, from log_ratio [B] summed over each chain."""
    return log_z + log_ratio - rewards / beta


class RelativeTrajectoryBalance(Exploring):
    needs_memoryless = True  # the path-measure optimum has the tilted x_0-marginal only on a memoryless chain
    needs_reward_gradient = False
    # Its balance uses r / beta: the CLI's beta = 0 has none. No gradient clipping, as its authors run it: the Huber
    # balance (--delta-clip) already bounds what one chain can pull (docs/design.md, section 8).
    # Exploration on points: sigma x 2.45 (the authors' std 0.5 over our sigma), held 250 epochs, on-policy from 1,000.
    defaults = {"kl_coef": 1.0, "grad_clip": 0.0, "explore_scale": 2.45}
    # Images: as before these defaults were measured on points: on-policy chains, the squared balance and the
    # clipped gradient (the image benchmarks' numbers are of these)
    image_defaults = {"explore_scale": 1.0, "delta_clip": 0.0, "grad_clip": 1.0}

    @dataclass(frozen=True)
    class Settings(ExplorationSettings):
        replay_size: int = arg(0, "rtb: chains kept in the replay buffer (0 = none)")
        replay_fraction: float = arg(0.5, "rtb: fraction of each update's chains drawn from the replay buffer")
        log_z_lr: float = arg(0.1, "rtb: learning rate of log Z")
        delta_clip: float = arg(
            3.0,
            "rtb: Huber threshold of the balance in nats: a chain with |delta| above it pulls as one at it "
            "(0 = the squared loss throughout)",
        )

    def __init__(self, run):
        self.log_z = torch.nn.Parameter(torch.zeros((), device=run.device))
        self.log_z_ready = False  # set to the first batch's estimate on the first update
        self.buffer: dict | None = None  # replay: xs [K + 1, R, ...], c [R] or None, rewards [R]
        super().__init__(run)

    def parameters(self):
        return [{"params": super().parameters()}, {"params": [self.log_z], "lr": self.settings.log_z_lr}]

    @classmethod
    def validate(cls, config) -> None:
        settings = config.settings
        if config.kl_coef <= 0:
            raise UserError(f"--algo rtb needs --kl-coef > 0: its balance uses r / beta, got {config.kl_coef}")
        if settings.delta_clip < 0:
            raise UserError(f"--delta-clip must be >= 0 (0 = the squared loss), got {settings.delta_clip}")
        if settings.log_z_lr <= 0:
            raise UserError(f"--log-z-lr must be positive, got {settings.log_z_lr}")
        if not 0 <= settings.replay_fraction < 1:
            raise UserError(f"--replay-fraction must be in [0, 1), got {settings.replay_fraction}")
        if settings.replay_size < 0:
            raise UserError(f"--replay-size must be >= 0 chains (0 = no replay), got {settings.replay_size}")
        settings.validate()
        if config.log_prob_reduction != "sum":
            raise UserError(
                "--algo rtb balances whole-chain log-densities: use --log-prob-reduction sum "
                "(mean would tilt by r D / beta)"
            )

    def mine(self, rows: Tensor, N: int) -> Tensor:
        """Of pair rows k * N + b, those of this rank's chains (b mod world_size = rank)."""
        return rows[(rows % N) % self.run.ranks.world_size == self.run.ranks.rank]

    def chain_log_probs(self, model: torch.nn.Module, pairs: Pairs, N: int) -> Tensor:
        """sum_k log pi(x_{k+1} | x_k) of each of the N chains [N] under `model`, no grad, in the update's groups;
        each rank scores its chains' pairs and the sum over ranks fills in the rest."""
        run = self.run
        log_probs = torch.zeros(len(pairs), device=run.device)
        with torch.no_grad():
            for idx in self.pair_groups(torch.arange(len(pairs), device=run.device), pairs):
                own = self.mine(idx, N)
                log_probs[own] = policy_step(run.diffusion, run.config, model, pairs, own).log_prob
        return run.ranks.sum(log_probs).reshape(-1, N).sum(0)

    def training_chains(self, batch: Batch, generator: torch.Generator) -> tuple[Pairs, Tensor, int]:
        """The update's chains, the epoch's fresh ones then those replayed, as whole-batch pairs; their
        rewards; the number replayed. The fresh chains then enter the buffer (first in, first out)."""
        run, settings, K = self.run, self.settings, batch.K
        x_t = batch.pairs.x_t.reshape(K, -1, *batch.pairs.x_t.shape[1:])
        fresh = torch.cat([x_t, batch.pairs.x_prev.reshape(x_t.shape)[-1:]])  # [K + 1, B_rank, ...]
        fresh = run.ranks.gather(fresh, dim=1)
        t, t_prev = batch.pairs.t.reshape(K, -1)[:, 0], batch.pairs.t_prev.reshape(K, -1)[:, 0]
        xs, c, rewards = fresh, batch.c, batch.rewards
        replayed = 0
        if self.buffer is not None and settings.replay_fraction > 0:
            stored = len(self.buffer["rewards"])
            replayed = min(stored, round(settings.replay_fraction * batch.B / (1 - settings.replay_fraction)))
            pick = torch.randperm(stored, generator=generator, device=run.device)[:replayed]
            xs = torch.cat([xs, self.buffer["xs"][:, pick]], 1)
            rewards = torch.cat([rewards, self.buffer["rewards"][pick]])
            c = None if c is None else torch.cat([c, self.buffer["c"][pick]])
        if settings.replay_size > 0:
            old = self.buffer or {
                "xs": fresh[:, :0],
                "rewards": batch.rewards[:0],
                "c": None if batch.c is None else batch.c[:0],
            }
            self.buffer = {
                "xs": torch.cat([old["xs"], fresh], 1)[:, -settings.replay_size :],
                "rewards": torch.cat([old["rewards"], batch.rewards])[-settings.replay_size :],
                "c": None if batch.c is None else torch.cat([old["c"], batch.c])[-settings.replay_size :],
            }
        chains = Trajectory(xs=xs, timesteps=t, prev_timesteps=t_prev, log_probs=None, c=c)
        return Pairs.from_trajectory(chains), rewards, replayed

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        run, cfg = self.run, self.run.config
        beta = self.kl_coef
        pairs, rewards, replayed = self.training_chains(batch, generator)
        N = len(rewards)
        log_ref = None
        losses, delta_abs = [], []
        for inner in range(cfg.inner_epochs):
            if inner == 0 and replayed == 0:
                log_ratio = -batch.log_ratio.sum(0)  # the loop's, of the policy as it is before its first step
            else:
                if log_ref is None:
                    log_ref = self.chain_log_probs(run.reference, pairs, N)
                log_ratio = self.chain_log_probs(run.policy, pairs, N) - log_ref
            if not self.log_z_ready:
                with torch.no_grad():
                    self.log_z.copy_(initial_log_z(log_ratio, rewards, beta))
                self.log_z_ready = True
            delta = relative_tb_delta(self.log_z.detach(), log_ratio, rewards, beta)
            clip = self.settings.delta_clip or math.inf
            pull = delta.clamp(-clip, clip)  # h'(delta) / 2
            self.optimizer.zero_grad(set_to_none=True)
            # Surrogate with delta detached: its gradient is that of sum_b h(delta_b), h' = 2 clip(delta) (section 8).
            # DDP's mean over ranks of world_size / N times each rank's pairs: the surrogate / N, the grad of L.
            for idx in self.pair_groups(torch.arange(len(pairs), device=run.device), pairs):
                own = self.mine(idx, N)
                log_prob = policy_step(run.diffusion, cfg, run.synced_policy, pairs, own).log_prob
                ((2 * pull[own % N] * log_prob).sum() * run.ranks.world_size / N).backward()
            (2 * pull.mean() * self.log_z).backward()  # log Z is outside DDP: every rank takes the whole term
            self.step()
            losses.append(delta.square().mean())
            delta_abs.append(delta.abs().mean())
        return {
            "rtb/explore_scale": self.exploration(),
            "loss/policy": torch.stack(losses).mean().item(),
            "rtb/log_z": self.log_z.item(),
            "rtb/delta_abs": torch.stack(delta_abs).mean().item(),
            "rtb/replayed": float(replayed),
        }

    def state_dict(self) -> dict:
        rtb = {"log_z": self.log_z.detach().clone(), "log_z_ready": self.log_z_ready, "buffer": self.buffer}
        return {**super().state_dict(), "rtb": rtb}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.log_z.copy_(state["rtb"]["log_z"])
        self.log_z_ready, self.buffer = state["rtb"]["log_z_ready"], state["rtb"]["buffer"]
        self.epoch = state["rtb"].get("epoch", self.epoch)  # where checkpoints kept it before the base did
