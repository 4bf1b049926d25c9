"""Native batched policy-gradient fine-tuning: DDPO-SF, DDPO-IS (PPO-clip) and RWR.

Per epoch: sample `chains` trajectories in one batch, recording (x_t, t, x_{t-1}, log pi_old);
score x_0 once; turn rewards into advantages; update. Black et al. (2023), "Training diffusion
models with reinforcement learning".

KL to the pretrained model (kl_coef = beta > 0). The objective is
    J(theta) = E[r(x_0)] - beta KL(p_theta || p_ref),   KL = E sum_k kl_k,
    kl_k = ||mu_theta(x_k, t_k) - mu_ref(x_k, t_k)||^2 / (2 sigma_k^2),
exact because both chains share x_T and sigma (docs/design.md, section 2). Its gradient has two
parts and both are used:
  - the action at step k moves every later state, so it is charged the KL that follows it:
    the return of step k is G_k = r(x_0) - beta sum_{j>k} kl_j (a per-step penalty on the
    reward, with lower variance than charging the whole path KL to every step);
  - kl_k depends on theta directly through mu_theta at the visited state: its exact gradient
    is added to the loss.
The update follows grad J times a positive number, so its fixed point is the KL-regularised
optimum p_pre(x_0) exp(r(x_0) / beta) / Z, for any batch or group size. Three things make that so
(docs/design.md, section 4): the baseline of a chain leaves the chain itself out (a baseline that
includes it shrinks the reward's part of the gradient by 1 - 1/n and not the KL's); the scale
that advantages are divided by, which the direct KL term is divided by too, never depends on the
chain it divides; and with `--log-prob-reduction mean` the direct KL term is averaged over data
dimensions like the log-prob.

Adaptive beta (--kl-target, Ziegler et al. 2019, "Fine-tuning language models from human
preferences"): after each epoch beta <- beta (1 + K_beta e), e = clip(KL / KL_target - 1, -0.2, 0.2),
with KL the batch's mean path KL per chain. The update reads beta from s.config.kl_coef, which the
loop replaces with the adapted value (config.json keeps the starting one; checkpoints the current one).

Data parallel (torchrun, distributed.py): each rank samples and scores its share of the chains;
rewards, labels, x_0 and KLs are gathered so every rank computes the same advantages over the
whole batch; minibatches are drawn over the whole batch's pairs and each rank computes the loss
of its own pairs in them, scaled so that DDP's mean over ranks is the one-process loss.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor
from tqdm import tqdm

from rl_diffusion.checkpoint import StopSignal, rng_state, set_rng_state
from rl_diffusion.diffusion import GaussianDiffusion, ReverseStep, Trajectory
from rl_diffusion.errors import UserError
from rl_diffusion.finetune import (
    FinetuneConfig,
    Setup,
    early_stop,
    finish,
    log_epoch,
    restore,
    save,
    score,
    write_hyperparameters,
)


@dataclass
class Pairs:
    """The (trajectory, timestep) pairs of one sampled batch, flattened to N = K * B rows (step-major)."""

    x_t: Tensor  # [N, ...]
    t: Tensor  # [N]
    t_prev: Tensor  # [N]
    x_prev: Tensor  # [N, ...] the action taken
    log_prob_old: Tensor  # [N] log pi_old(x_prev | x_t), recorded while sampling
    mean_old: Tensor | None = None  # [N, ...] the mean of pi_old, recorded while sampling (None: not recorded)
    c: Tensor | None = None  # [N] class labels of the chains, or None

    def __len__(self) -> int:
        return len(self.t)

    @classmethod
    def from_trajectory(cls, traj: Trajectory) -> "Pairs":
        B = traj.xs.shape[1]
        return cls(
            x_t=traj.xs[:-1].flatten(0, 1),
            t=traj.timesteps.repeat_interleave(B),
            t_prev=traj.prev_timesteps.repeat_interleave(B),
            x_prev=traj.xs[1:].flatten(0, 1),
            log_prob_old=traj.log_probs.flatten(),
            mean_old=traj.means.flatten(0, 1),
            c=None if traj.c is None else traj.c.repeat(len(traj.timesteps)),
        )

    def select(self, keep: Tensor) -> "Pairs":
        return Pairs(**{f.name: None if (v := getattr(self, f.name)) is None else v[keep] for f in fields(self)})


def sample_batch(s: Setup, generator: torch.Generator) -> tuple[Pairs, Tensor, Tensor | None]:
    """Sample this rank's share of the `chains` trajectories with the current policy (labels uniform
    for a class-conditional model); returns its pairs, x_0 [B_rank, ...] and labels [B_rank] or None."""
    cfg = s.config
    shard = s.ranks.shard(cfg.chains, "--chains")
    num_classes = getattr(s.policy, "num_classes", 0)
    c = (
        torch.randint(0, num_classes, (cfg.chains,), generator=generator, device=s.device)[shard]
        if num_classes
        else None
    )
    # no_grad, not inference_mode: these tensors are inputs to the update's autograd graph.
    with torch.no_grad():
        traj = s.diffusion.sample(
            s.policy,
            (cfg.chains, *s.data_shape),
            c=c,
            generator=generator,
            device=s.device,
            record=True,
            log_prob_reduction=cfg.log_prob_reduction,
            shard=shard,
            **cfg.sampling,
        )
    return Pairs.from_trajectory(traj), traj.xs[-1], c


def policy_step(
    diffusion: GaussianDiffusion, cfg: FinetuneConfig, model: torch.nn.Module, pairs: Pairs, idx: Tensor
) -> ReverseStep:
    """The shared reverse step of `model` on the chosen pairs: one network call, the actions scored."""
    x_t, t = pairs.x_t[idx], pairs.t[idx]
    return diffusion.reverse_step(
        model(x_t, t, None if pairs.c is None else pairs.c[idx]),
        x_t,
        t,
        t_prev=pairs.t_prev[idx],
        sampler=cfg.sampler,
        eta=cfg.eta,
        x_prev=pairs.x_prev[idx],
        log_prob_reduction=cfg.log_prob_reduction,
    )


def step_kl(
    diffusion: GaussianDiffusion,
    cfg: FinetuneConfig,
    reference: torch.nn.Module,
    mean: Tensor,
    pairs: Pairs,
    idx: Tensor,
) -> Tensor:
    """kl_k = ||mu_theta - mu_ref||^2 / (2 sigma^2) at the chosen pairs, for the policy mean `mean` (differentiable in theta)."""
    with torch.no_grad():
        ref = policy_step(diffusion, cfg, reference, pairs, idx)
    return ((mean - ref.mean) ** 2).flatten(1).sum(1) / (2 * ref.sigma**2)


def path_kls(
    diffusion: GaussianDiffusion,
    cfg: FinetuneConfig,
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    pairs: Pairs,
    K: int,
) -> Tensor:
    """kl_k of every pair as [K, B]; summed over k it is the exact path KL of each chain.

    The policy's means are those recorded while sampling when the pairs have them (then only the
    reference is called), else the policy is called (sb3-ppo's rollout buffer keeps no means).
    """

    def policy_mean(idx: Tensor) -> Tensor:
        return policy_step(diffusion, cfg, policy, pairs, idx).mean if pairs.mean_old is None else pairs.mean_old[idx]

    with torch.no_grad():
        rows = torch.arange(len(pairs), device=pairs.t.device).split(cfg.minibatch_size)
        kl = torch.cat([step_kl(diffusion, cfg, reference, policy_mean(idx), pairs, idx) for idx in rows])
    return kl.reshape(K, -1)


MIN_GROUP_FOR_OWN_SCALE = 8  # chains a group needs to be scaled by its own spread (its others' spread: >= 7 values)
SCALE_FLOOR = 0.1  # no group's scale falls below this fraction of the batch's spread


def advantages(returns: Tensor, groups: Tensor | None, adv_clip: float) -> tuple[Tensor, Tensor]:
    """Standardised advantages [K, B] of returns [K, B] (step k, chain b) and the scale of each chain [B].

    Baseline: the mean return of the OTHER chains of the same group (class label) at the same
    step, leave-one-out, so it is independent of the chain it is subtracted from; a chain alone
    in its group is compared with the rest of the batch. Returns that are equal within a group
    give advantages of exactly 0 (they are measured from one member of the group).
    Scale: the spread of the group's other chains (sample variance, pooled over steps) for groups
    of at least MIN_GROUP_FOR_OWN_SCALE chains, so a class with easy rewards does not drown the
    others; smaller groups take the batch's spread. No scale falls below SCALE_FLOOR times the
    batch's spread, so a group with (nearly) equal returns cannot blow up the direct KL term that
    is divided by the same scale. Advantages are clipped to [-adv_clip, adv_clip].
    Computed in float64; returned as float32.
    """
    G = returns.double()
    K, B = G.shape
    groups = torch.zeros(B, dtype=torch.long, device=G.device) if groups is None else groups
    one_hot = torch.nn.functional.one_hot(groups).double()  # [B, number of groups]
    n = one_hot.sum(0)[groups]  # [B] chains in each chain's group
    first = one_hot.argmax(0)  # [number of groups] the first chain of each group
    d = G - G[:, first[groups]]  # returns measured from one member of the group
    group_sum, group_sum_sq = (d @ one_hot)[:, groups], (d.square() @ one_hot)[:, groups]  # [K, B]
    others = (n - 1).clamp(min=1)
    others_mean = (group_sum - d) / others
    batch_others_mean = (G.sum(1, keepdim=True) - G) / max(B - 1, 1)
    centred = torch.where(n > 1, d - others_mean, G - batch_others_mean)
    batch_scale = G.var(1, correction=0).mean().sqrt()
    others_var = ((group_sum_sq - d.square()) - (group_sum - d).square() / others) / (n - 2).clamp(min=1)
    own_scale = others_var.clamp(min=0).mean(0).sqrt()
    scale = torch.where(n >= MIN_GROUP_FOR_OWN_SCALE, own_scale, batch_scale)
    # the absolute floor only matters when every return in the batch is equal (then every advantage is 0)
    scale = torch.maximum(scale, SCALE_FLOOR * batch_scale).clamp(min=torch.finfo(torch.float32).tiny)
    return (centred / scale).clamp(-adv_clip, adv_clip).float(), scale.float()


def batch_advantages(
    s: Setup, pairs: Pairs, rewards: Tensor, c: Tensor | None, K: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair advantages [K, B] of the whole batch from G_k = r - beta sum_{j>k} kl_j; also kl [K, B]
    and the scale of each chain [B]. `pairs` are this rank's, rewards and labels [B] the whole batch's."""
    kl = s.ranks.gather(path_kls(s.diffusion, s.config, s.policy, s.reference, pairs, K), dim=1)
    kl_after = kl.flip(0).cumsum(0).flip(0) - kl  # sum_{j > k} kl_j
    adv, scale = advantages(rewards[None, :] - s.config.kl_coef * kl_after, c, s.config.adv_clip)
    return adv, kl, scale


def kl_penalty(s: Setup, mean: Tensor, pairs: Pairs, own: Tensor, scale: Tensor) -> Tensor:
    """The direct KL term of the loss per pair: beta kl_k / scale, with kl_k reduced over data dimensions
    the way the log-prob is (summed, or averaged for --log-prob-reduction mean), so that the two parts
    of the gradient stay in the ratio of grad J."""
    kl = step_kl(s.diffusion, s.config, s.reference, mean, pairs, own)
    if s.config.log_prob_reduction == "mean":
        kl = kl / mean[0].numel()
    return s.config.kl_coef * kl / scale


def own_rows(rows: Tensor, B: int, s: Setup) -> tuple[Tensor, Tensor]:
    """Of pair rows k * B + b of the whole batch, those of this rank's chains: (their rows, the same
    pairs' rows in this rank's Pairs). On one rank both are `rows`."""
    shard = s.ranks.shard(B, "--chains")
    k, b = rows // B, rows % B
    mine = (b >= shard.start) & (b < shard.stop)
    return rows[mine], k[mine] * (shard.stop - shard.start) + b[mine] - shard.start


def update_sf(
    s: Setup,
    optimizer,
    pairs: Pairs,
    x0: Tensor,
    c: Tensor | None,
    rewards: Tensor,
    adv: Tensor,
    scale: Tensor,
    generator,
) -> dict[str, float]:
    """DDPO-SF: REINFORCE, -A * log pi, gradients accumulated over all pairs, one optimizer step."""
    cfg = s.config
    K, B = adv.shape
    optimizer.zero_grad(set_to_none=True)
    total, adv, scale_pairs = torch.zeros((), device=s.device), adv.flatten(), scale.repeat(K)
    for idx in torch.arange(K * B, device=s.device).split(cfg.minibatch_size):
        rows, own = own_rows(idx, B, s)
        ours = policy_step(s.diffusion, cfg, s.synced_policy, pairs, own)
        terms = -adv[rows] * ours.log_prob
        if cfg.kl_coef > 0:
            terms = terms + kl_penalty(s, ours.mean, pairs, own, scale_pairs[rows])
        (terms.sum() * s.ranks.world_size / (K * B)).backward()  # DDP's mean over ranks: the sum over all pairs / (K B)
        total += terms.detach().sum()
    grad_norm = torch.nn.utils.clip_grad_norm_(s.policy.parameters(), cfg.grad_clip)
    optimizer.step()
    return {"loss/policy": s.ranks.sum(total).item() / (K * B), "train/grad_norm": grad_norm.item()}


def ppo_terms(adv: Tensor, log_prob: Tensor, log_prob_old: Tensor, clip_range: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per pair: the PPO-clip surrogate max(-A r, -A clip(r, 1 - eps, 1 + eps)), r = pi / pi_old (its
    mean is the loss); the approx_kl estimate; and whether r was clipped."""
    log_ratio = log_prob - log_prob_old
    ratio = log_ratio.exp()
    loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    with torch.no_grad():
        # (r - 1) - log r: unbiased and always >= 0 (Schulman's k3 estimator), unlike -log r
        approx_kl = (ratio - 1) - log_ratio
        clipped = ((ratio - 1).abs() > clip_range).float()
    return loss, approx_kl, clipped


def update_is(
    s: Setup,
    optimizer,
    pairs: Pairs,
    x0: Tensor,
    c: Tensor | None,
    rewards: Tensor,
    adv: Tensor,
    scale: Tensor,
    generator,
) -> dict[str, float]:
    """DDPO-IS: PPO-clip over inner epochs of shuffled minibatches of (trajectory, timestep) pairs."""
    cfg = s.config
    K, B = adv.shape
    adv, scale_pairs = adv.flatten(), scale.repeat(K)
    sums, count = torch.zeros(3, device=s.device), 0  # loss, approx_kl, clipped: summed over the epoch's pairs
    for _ in range(cfg.inner_epochs):
        rows = torch.arange(K * B, device=s.device)
        if cfg.timestep_fraction < 1:
            # each chain trains on a random subset of its timesteps
            keep = max(1, round(cfg.timestep_fraction * K))
            chosen = torch.rand(K, B, generator=generator, device=s.device).argsort(0)[:keep]
            rows = (chosen * B + torch.arange(B, device=s.device)).flatten()
        for idx in rows[torch.randperm(len(rows), generator=generator, device=s.device)].split(cfg.minibatch_size):
            mine, own = own_rows(idx, B, s)
            ours = policy_step(s.diffusion, cfg, s.synced_policy, pairs, own)
            terms, approx_kl, clipped = ppo_terms(adv[mine], ours.log_prob, pairs.log_prob_old[own], cfg.clip_range)
            if cfg.kl_coef > 0:
                terms = terms + kl_penalty(s, ours.mean, pairs, own, scale_pairs[mine])
            optimizer.zero_grad(set_to_none=True)
            (terms.sum() * s.ranks.world_size / len(idx)).backward()  # DDP's mean over ranks: the minibatch mean
            torch.nn.utils.clip_grad_norm_(s.policy.parameters(), cfg.grad_clip)
            optimizer.step()
            sums += torch.stack([terms.detach().sum(), approx_kl.sum(), clipped.sum()])
            count += len(idx)
    loss, approx_kl, clipfrac = (s.ranks.sum(sums) / count).tolist()
    return {"loss/policy": loss, "ppo/approx_kl": approx_kl, "ppo/clipfrac": clipfrac}


def rwr_weights(rewards: Tensor, temperature: float) -> Tensor:
    """softmax(r / temperature) over the batch: non-negative, summing to 1."""
    return torch.softmax(rewards / temperature, dim=0)


def update_rwr(
    s: Setup,
    optimizer,
    pairs: Pairs,
    x0: Tensor,
    c: Tensor | None,
    rewards: Tensor,
    adv: Tensor,
    scale: Tensor,
    generator,
) -> dict[str, float]:
    """RWR: the denoising loss on the policy's own samples x_0, weighted by softmax(r / temperature)."""
    cfg = s.config
    weights = rwr_weights(rewards, cfg.rwr_temperature)
    steps = cfg.inner_epochs * max(1, adv.numel() // cfg.minibatch_size)
    shard = s.ranks.shard(len(x0), "--chains")
    losses = torch.zeros(steps, device=s.device)
    for step in range(steps):
        loss = s.diffusion.training_loss(s.synced_policy, x0, c, generator=generator, weights=weights, shard=shard)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(s.policy.parameters(), cfg.grad_clip)
        optimizer.step()
        losses[step] = loss.detach()
    return {
        "loss/policy": s.ranks.sum(losses).mean().item() / s.ranks.world_size,
        "rwr/weight_max": weights.max().item(),
    }


KL_ERROR_CLIP = 0.2  # Ziegler et al.: a KL far off target moves beta no faster than one 20% off


def adapted_kl_coef(kl_coef: float, kl: float, kl_target: float, kl_gain: float) -> float:
    """beta (1 + K_beta e), e = clip(KL / KL_target - 1, -0.2, 0.2): proportional control of log beta.

    kl and kl_target in nats of path KL per chain; a KL above the target raises beta, below lowers it.
    """
    error = min(max(kl / kl_target - 1, -KL_ERROR_CLIP), KL_ERROR_CLIP)
    return kl_coef * (1 + kl_gain * error)


UPDATES = {"ddpo-sf": update_sf, "ddpo-is": update_is, "rwr": update_rwr}


def train(s: Setup, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune s.policy for s.epochs epochs with s.config.algo; returns the final metrics."""
    cfg = s.config
    update = UPDATES[cfg.algo]
    optimizer = torch.optim.AdamW(s.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator(device=s.device).manual_seed(cfg.seed)
    start, reward_queries = 0, 0
    if resume:
        state = restore(s)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
        start, reward_queries = state["epoch"], state["reward_queries"]
        s.config = replace(cfg, kl_coef=state.get("kl_coef", cfg.kl_coef))
    else:
        write_hyperparameters(s)

    def train_state() -> dict:
        return {
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(generator),
            "reward_queries": reward_queries,
            "kl_coef": s.config.kl_coef,
        }

    with (
        StopSignal() as stop,
        tqdm(
            total=s.epochs,
            initial=start,
            desc=f"{cfg.algo} {s.reward.name}",
            disable=not (progress and s.ranks.is_main),
        ) as bar,
    ):
        for epoch in range(start, s.epochs):
            started = time.perf_counter()
            pairs, x0, c = sample_batch(s, generator)  # this rank's chains
            rewards = score(s, x0, c, epoch)
            # the whole batch on every rank: advantages are normalised over all chains
            x0, rewards, c = (None if v is None else s.ranks.gather(v) for v in (x0, rewards, c))
            finite = torch.isfinite(rewards)
            reward_queries += len(rewards)
            K = s.steps_per_chain
            if not finite.all():  # --skip-nonfinite-rewards (one rank): drop those chains entirely
                pairs = pairs.select(finite.repeat(K))
            c_kept = None if c is None else c[finite]
            adv, kl, scale = batch_advantages(s, pairs, rewards[finite], c_kept, K)
            stats = update(s, optimizer, pairs, x0[finite], c_kept, rewards[finite], adv, scale, generator)
            if not math.isfinite(stats["loss/policy"]):
                raise UserError(
                    f"the {cfg.algo} loss became {stats['loss/policy']} at epoch {epoch + 1}; the last good checkpoint is kept in {s.out} (try a lower --lr)"
                )
            kl_path = kl.sum(0)
            stats.update(
                {
                    "kl/to_pretrained": kl_path.mean().item(),
                    "kl/to_pretrained_max": kl_path.max().item(),
                    "kl/beta": s.config.kl_coef,
                }
            )
            if cfg.kl_target > 0:
                beta = adapted_kl_coef(s.config.kl_coef, stats["kl/to_pretrained"], cfg.kl_target, cfg.kl_gain)
                s.config = replace(s.config, kl_coef=beta)
            log_epoch(s, epoch, reward_queries, x0, rewards, stats, time.perf_counter() - started, c)
            bar.update(1)
            bar.set_postfix(reward=f"{s.history[-1]['reward/mean']:.3f}", kl=f"{stats['kl/to_pretrained']:.3f}")
            stopping = s.ranks.any(stop.received is not None)
            new_best, early_stop_reason = early_stop(s)
            if (
                (epoch + 1) % cfg.checkpoint_every == 0
                or epoch + 1 == s.epochs
                or stopping
                or new_best
                or early_stop_reason
            ):
                save(s, epoch, train_state())
            if early_stop_reason and not stopping:
                if s.ranks.is_main:
                    print(early_stop_reason, file=sys.stderr)
                break
            if stopping:
                s.writer.close()
                raise UserError(
                    f"stopped by signal {stop.received} after epoch {epoch + 1}; checkpoint saved, continue with --resume {s.out}"
                )
    return finish(s)
