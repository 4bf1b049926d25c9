"""DRaFT: back-propagate the reward (and the path KL) through the sampling chain itself.

Clark, Vicol, Swersky, Fleet (2023), "Directly fine-tuning diffusion models on differentiable
rewards". The chain is reparameterised: with its noises z_k fixed,
    x_{k+1} = mu_theta(x_k, t_k) + sigma_k z_k,   k = 0 .. N - 1,   x_N = x_0,
is a differentiable function of theta, and the update ascends
    J(theta) = E_z[ r(x_0) - beta sum_k kl_k ],   kl_k = ||mu_theta(x_k) - mu_ref(x_k)||^2 / (2 sigma_k^2),
the KL-regularised objective (docs/design.md, section 2). The loss of chain b is -(r(x_0) - beta sum_k kl_k),
averaged over chains. The chains are the loop's, replayed with their recorded noises; gradients flow
through the last K steps (--draft-steps K; 0: all N, the exact pathwise gradient, whose fixed point is the
tilted optimum on a memoryless chain). Where kl_k is charged, the bias of K < N, and memory: docs/design.md,
sections 6 and 8.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rl_diffusion import memory
from rl_diffusion.algos.base import Algorithm, Batch
from rl_diffusion.config import arg
from rl_diffusion.errors import UserError


def window_start(chain_steps: int, draft_steps: int) -> int:
    """The first step gradients flow through: N - K (K = 0 means all N steps)."""
    return chain_steps - (draft_steps or chain_steps)


class DRaFT(Algorithm):
    needs_reward_gradient = True
    needs_memoryless = False  # a reparameterised stochastic chain of any kind
    needs_log_prob = True  # sigma_k > 0: the noises are recovered by dividing by it, and the loop's path KL needs it
    uses_kl = True

    @dataclass(frozen=True)
    class Settings:
        draft_steps: int = arg(
            0, "draft: back-propagate through the last K denoising steps (0 = all: the exact pathwise gradient)"
        )

    @classmethod
    def validate(cls, config) -> None:
        steps = config.settings.draft_steps
        if steps < 0:
            raise UserError(f"--draft-steps must be >= 0 (0 = back-propagate through every step), got {steps}")

    @classmethod
    def validate_chain(cls, config, steps_per_chain: int) -> None:
        if config.settings.draft_steps > steps_per_chain:
            raise UserError(
                f"--draft-steps {config.settings.draft_steps} exceeds the {steps_per_chain} steps of the chain "
                f"(--sampler {config.sampler}); give at most {steps_per_chain}, or 0 for all of them"
            )

    step_bytes: float | None = None  # what one replayed step of one chain keeps for backward (measured once)
    announced = False  # the switch to gradient checkpointing is said once per run

    def chain_step(self, policy, x: Tensor, t: Tensor, t_prev: Tensor, noise: Tensor, c: Tensor | None):
        """One reparameterised step from x: (x_{k+1} = mu_theta(x) + sigma z, kl_k [B])."""
        run, cfg = self.run, self.run.config
        kwargs = dict(t_prev=t_prev, sampler=cfg.sampler, eta=cfg.eta, noise=noise)
        ours = run.diffusion.reverse_step(policy(x, t, c), x, t, **kwargs)
        ref = run.diffusion.reverse_step(run.reference(x, t, c), x, t, **kwargs)  # frozen; depends on theta via x
        kl = ((ours.mean - ref.mean) ** 2).flatten(1).sum(1) / (2 * ours.sigma**2)
        return ours.x_prev, kl

    def plan(self, batch: Batch) -> tuple[tuple[Tensor, ...], bool]:
        """This rank's chains in the fewest groups whose replay fits --memory-mib, and whether each step is
        checkpointed (only where one chain alone does not fit)."""
        run, cfg, pairs, N = self.run, self.run.config, batch.pairs, batch.K
        if self.step_bytes is None:  # the unwrapped policy: a forward with no backward would upset DDP

            def one_step(n: int):
                rows = torch.zeros(n, dtype=torch.long, device=run.device)
                c = None if pairs.c is None else pairs.c[rows]
                # a replayed state depends on theta: the reference's forward keeps its activations too
                x = pairs.x_t[rows].clone().requires_grad_()
                return self.chain_step(run.policy, x, pairs.t[rows], pairs.t_prev[rows], torch.zeros_like(x), c)

            self.step_bytes = memory.bytes_per_unit(one_step)
        budget = self.memory_budget()
        chain_bytes, checkpointed = N * self.step_bytes, False
        if chain_bytes > budget * memory.MIB:
            # kept per checkpointed step: its input state and noise; plus one step's graph while it is recomputed
            state_bytes = pairs.x_t[0].numel() * pairs.x_t.element_size()
            chain_bytes, checkpointed = N * 2 * state_bytes + self.step_bytes, True
            if run.ranks.is_main and not self.announced:
                print(
                    f"note: draft replays each step under gradient checkpointing: one chain of {N} steps keeps "
                    f"{N * self.step_bytes / memory.MIB:.0f} MiB for backward, over the {budget:.0f} MiB of "
                    f"--memory-mib {cfg.memory_mib:g} that the process does not already hold",
                    file=sys.stderr,
                )
            self.announced = True
        largest_shard = math.ceil(batch.B / run.ranks.world_size)  # the same number of groups on every rank
        count = memory.groups(largest_shard, chain_bytes, budget)
        return torch.arange(len(pairs) // N, device=run.device).tensor_split(count), checkpointed

    def replay(self, batch: Batch, chains: Tensor, checkpointed: bool) -> tuple[Tensor, Tensor]:
        """Replay this rank's chains `chains` (indices into its own B_rank) with gradients:
        (x_0 [n, ...], sum_k kl_k [n])."""
        run, cfg, pairs, N = self.run, self.run.config, batch.pairs, batch.K
        B = len(pairs) // N
        start = window_start(N, self.settings.draft_steps)
        x, kl_sum = pairs.x_t[start * B + chains], 0.0
        for k in range(N):
            rows = k * B + chains
            t, t_prev, c = pairs.t[rows], pairs.t_prev[rows], None if pairs.c is None else pairs.c[rows]
            with torch.no_grad():  # z_k = (x_{k+1} - mean_old_k) / sigma_k; sigma needs no network call
                zeros = torch.zeros_like(pairs.x_t[rows])
                step = run.diffusion.reverse_step(
                    zeros, zeros, t, t_prev=t_prev, sampler=cfg.sampler, eta=cfg.eta, x_prev=zeros
                )
                noise = (pairs.x_prev[rows] - pairs.mean_old[rows]) / step.sigma.reshape(-1, *[1] * (x.dim() - 1))
            state = x if k >= start else pairs.x_t[rows]  # before the window: the recorded, detached state
            inputs = (run.synced_policy, state, t, t_prev, noise, c)
            if checkpointed:
                x_next, kl = checkpoint(self.chain_step, *inputs, use_reentrant=False)
            else:
                x_next, kl = self.chain_step(*inputs)
            if k >= start:
                x = x_next
            kl_sum = kl_sum + kl
        return x, kl_sum

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        run, cfg = self.run, self.run.config
        groups, checkpointed = self.plan(batch)
        sums = torch.zeros(3, device=run.device)  # loss, reward, kl: summed over chains and inner epochs
        for _ in range(cfg.inner_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            for chains in groups:
                x0, kl = self.replay(batch, chains, checkpointed)
                c = None if batch.pairs.c is None else batch.pairs.c[chains]
                reward = run.reward(x0, c)
                loss = -(reward - self.kl_coef * kl)
                # DDP's mean over ranks: the sum over the whole batch's chains / B
                (loss.sum() * run.ranks.world_size / batch.B).backward()
                sums += torch.stack([loss.detach().sum(), reward.detach().sum(), kl.detach().sum()])
            grad_norm = self.step()
        loss, reward, kl = (run.ranks.sum(sums) / (batch.B * cfg.inner_epochs)).tolist()
        return {
            "loss/policy": loss,
            "draft/reward": reward,
            "draft/kl": kl,
            "draft/replays": float(len(groups)),
            "draft/checkpointed": float(checkpointed),
            "train/grad_norm": grad_norm.item(),
        }
