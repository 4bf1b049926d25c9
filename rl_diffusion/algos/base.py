"""What a native algorithm is: an update rule over one epoch's batch. The loop (loop.py) does the rest.

A subclass declares its own settings beside its update rule (`Settings`: their flags, defaults and
help; the run's values in `self.settings`) and checks them in `validate`, says what it needs in class
attributes (checked before a run directory is written), and implements `update`, which reads beta
from `self.kl_coef` (the loop adapts it under --kl-target; the config keeps the starting value). It
may also replace `sample` (off-policy algorithms), add parameters to its optimizer (`parameters`)
and keep state across epochs (`state_dict`, restored bit for bit on --resume).

Data parallel (torchrun): `Batch` holds this rank's pairs and the whole batch's x_0, labels,
rewards and KLs, so every rank computes the same targets; an update computes the loss of its own
rows, scaled so that DDP's mean over ranks is the one-process loss (`own_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from rl_diffusion import memory
from rl_diffusion.path_kl import Pairs, policy_step

if TYPE_CHECKING:
    from rl_diffusion.finetune import FinetuneConfig
    from rl_diffusion.run import Setup


def lr_factor(epoch: int, epochs: int, decay: float) -> float:
    """The learning rate's multiplier at `epoch` (0-based) of `epochs`: 1, then over the last `decay` fraction of
    the epochs a straight line towards 0, (epochs - epoch) / (decay epochs), so the last epoch's is above 0: a
    falling rate averages out the last iterates' minibatch noise (on the 9-mode posterior rtb's error was a bias,
    which it did not lower: docs/design.md, section 8)."""
    if decay == 0:
        return 1.0
    return min(1.0, (epochs - epoch) / (decay * epochs))


@dataclass
class Batch:
    """One epoch's scored chains (those with a finite reward)."""

    pairs: Pairs  # this rank's chains as (trajectory, timestep) pairs, step-major: row k * B_rank + b
    x0: Tensor  # [B, ...] the whole batch's samples
    c: Tensor | None  # [B] their class labels, or None
    rewards: Tensor  # [B]
    kl: Tensor | None  # [K, B] kl_k of every chain to the pretrained model (summed over k, its exact path KL);
    # None on a deterministic chain (DDIM with eta = 0), where the path KL is not defined
    K: int  # steps per chain
    log_ratio: Tensor | None = None  # [K, B] log pi_ref - log pi_old of every step's action (summed over k:
    # log P_pre(tau) / P_old(tau)); None on a deterministic chain

    @property
    def B(self) -> int:
        return len(self.rewards)


class Algorithm:
    """One family's update rule, built once per run with the run's Setup."""

    @dataclass(frozen=True)
    class Settings:
        """The algorithm's own settings, none here. A subclass declares its own `Settings`, a frozen dataclass
        whose fields are `arg(default, help)`: each is the flag of its name (draft_steps: --draft-steps), the
        help starting with the algorithm's name; the config's algo_args hold the values given."""

    uses_kl: ClassVar[bool] = True  # --kl-coef and --kl-target apply
    needs_memoryless: ClassVar[bool] = False  # the chain must forget x_T (DDPM, or DDIM with eta = 1)
    needs_reward_gradient: ClassVar[bool] = False  # the reward must declare itself differentiable
    needs_log_prob: ClassVar[bool] = True  # the chain must be stochastic (eta > 0): the update scores actions
    defaults: ClassVar[dict] = {}  # config fields whose default differs for this algorithm (finetune.config_for)
    image_defaults: ClassVar[dict] = {}  # over `defaults` where the pretrained run holds images
    pair_bytes: float | None = None  # what one (chain, step) pair's policy step keeps for backward (measured once)
    in_use_mib: float | None = None  # what the process held at the run's first update (measured once, checkpointed)
    label_block: int = 1  # consecutive chains that share one drawn class label

    def __init__(self, run: Setup):
        self.run = run
        self.settings = self.Settings(**run.config.algo_args)  # before parameters(), which may read them
        self.kl_coef = run.config.kl_coef  # beta of the updates: --kl-coef, adapted by the loop under --kl-target
        self.epoch = 0  # epochs trained, the clock of an algorithm's schedules: the loop advances it after update()
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=run.config.lr, weight_decay=0.0)
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # --lr-decay scales these

    def parameters(self) -> Iterable:
        """What the optimizer trains: the policy's trainable parameters (or parameter groups); under --lora-rank
        the adapters only."""
        return [p for p in self.run.policy.parameters() if p.requires_grad]

    @classmethod
    def validate(cls, config: FinetuneConfig) -> None:
        """Refuse settings this algorithm cannot use (UserError); called before anything is written."""

    @classmethod
    def validate_chain(cls, config: FinetuneConfig, steps_per_chain: int) -> None:
        """Refuse settings that depend on the pretrained chain's length (UserError), before anything is written."""

    def sample(self, generator: torch.Generator, noise_scale: float = 1.0) -> tuple[Pairs, Tensor, Tensor | None]:
        """This rank's share of the epoch's --chains chains: its pairs, x_0 [B_rank, ...] and labels [B_rank] or
        None. On-policy: the current policy's chains (labels uniform for a class-conditional model); noise_scale > 1
        widens every step's noise (GaussianDiffusion.sample)."""
        return self.sample_chains(self.run.config.chains, "--chains", generator, noise_scale)

    def sample_chains(
        self, chains: int, flag: str, generator: torch.Generator, noise_scale: float = 1.0
    ) -> tuple[Pairs, Tensor, Tensor | None]:
        """This rank's share of `chains` chains of the current policy (the number `flag` sets), as `sample`
        returns them. A class-conditional model's labels are drawn uniformly, one per block of `label_block`
        consecutive chains."""
        run, cfg, block = self.run, self.run.config, self.label_block
        shard = run.ranks.shard(chains, flag)
        num_classes = getattr(run.policy, "num_classes", 0)
        c = None
        if num_classes and not cfg.null_label:
            c = torch.randint(0, num_classes, (chains // block,), generator=generator, device=run.device)
            c = c.repeat_interleave(block)[shard]
        sampling, etas = cfg.sampling, self.step_etas()
        if etas is not None:
            sampling = {**sampling, "eta": etas}
        # no_grad, not inference_mode: these tensors are inputs to the update's autograd graph.
        with torch.no_grad():
            traj = run.diffusion.sample(
                run.policy,
                (chains, *run.data_shape),
                c=c,
                generator=generator,
                device=run.device,
                record=True,
                log_prob_reduction=cfg.log_prob_reduction,
                shard=shard,
                noise_scale=noise_scale,
                **sampling,
            )
        return Pairs.from_trajectory(traj), traj.xs[-1], c

    def step_etas(self) -> list[float] | None:
        """The eta of each step of this epoch's chains, where they differ from step to step (None: --eta at every
        step)."""
        return None

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        """Train on the batch; returns TensorBoard scalars, at least "loss/policy"."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "in_use_mib": self.in_use_mib, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.in_use_mib = state.get("in_use_mib")
        self.epoch = state.get("epoch", 0)

    def step(self) -> Tensor:
        """Clip the policy's gradient norm to --grad-clip and step at this epoch's learning rates (--lr-decay);
        returns the norm before clipping."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.run.policy.parameters(), self.run.config.max_grad_norm)
        if self.run.config.lr_decay:
            factor = lr_factor(self.epoch, self.run.epochs, self.run.config.lr_decay)
            for group, lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
                group["lr"] = lr * factor
        self.optimizer.step()
        return grad_norm

    def forward_process_steps(self, batch: Batch) -> int:
        """Gradient steps per epoch of the algorithms that train on x_0 through the forward process (rwr, awm):
        --inner-epochs passes of K B / --minibatch-size steps, as many as ddpo-is takes over the batch's pairs."""
        cfg = self.run.config
        return cfg.inner_epochs * max(1, batch.K * batch.B // cfg.minibatch_size)

    def descend(self, loss: Callable[[], Tensor], steps: int, after_step: Callable[[], None] | None = None) -> float:
        """`steps` optimizer steps on loss(), each on a fresh draw (then after_step(), if given); returns the mean
        loss over them. Each rank's loss is scaled so that the mean over ranks is the whole batch's."""
        losses = torch.zeros(steps, device=self.run.device)
        for step in range(steps):
            value = loss()
            self.optimizer.zero_grad(set_to_none=True)
            value.backward()
            self.step()
            if after_step is not None:
                after_step()
            losses[step] = value.detach()
        return self.run.ranks.sum(losses).mean().item() / self.run.ranks.world_size

    def pair_groups(self, rows: Tensor, pairs: Pairs) -> tuple[Tensor, ...]:
        """`rows` of `pairs` in the fewest groups whose policy steps fit --memory-mib, for updates that accumulate
        one gradient over all of them (their sum does not depend on the split). The same count on every rank:
        `rows` index the whole batch. Measured on the unwrapped policy: a forward without a backward upsets DDP."""
        run = self.run
        if self.pair_bytes is None:
            first = torch.zeros(1, dtype=torch.long, device=run.device)  # a pair of this rank (rows index the batch)
            probe = lambda n: policy_step(run.diffusion, run.config, run.policy, pairs, first.repeat(n)).log_prob  # noqa: E731
            self.pair_bytes = memory.bytes_per_unit(probe)
        return memory.split(rows, self.pair_bytes, self.memory_budget())

    def memory_budget(self) -> float:
        """MiB the update's tensors kept for backward may take: --memory-mib less what the process held at the
        run's first update (the most of any rank, so every rank makes the same groups). Measured once and kept in
        the checkpoint, so a resumed run splits its batches, and rounds, as the uninterrupted run did."""
        if self.in_use_mib is None:
            local = torch.tensor([memory.in_use_mib(self.run.device)], device=self.run.device)
            self.in_use_mib = self.run.ranks.gather(local).max().item()
        return max(self.run.config.memory_mib - self.in_use_mib, 0.0)

    def own_rows(self, rows: Tensor, B: int) -> tuple[Tensor, Tensor]:
        """Of pair rows k * B + b of the whole batch, those of this rank's chains: (their rows, the same
        pairs' rows in this rank's Pairs). On one rank both are `rows`."""
        shard = self.run.ranks.shard(B, "--chains")
        k, b = rows // B, rows % B
        mine = (b >= shard.start) & (b < shard.stop)
        return rows[mine], k[mine] * (shard.stop - shard.start) + b[mine] - shard.start
