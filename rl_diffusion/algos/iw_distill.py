"""IW-distill: importance-weighted denoising. Fit the model to its own samples, weighted towards the tilt.

Each epoch draws a pool of --pool-size chains tau_b from the current policy and weights them exactly towards
P*(tau) = P_pre(tau) exp(r(x_0) / beta) / Z, whose x_0-marginal is the tilt on any chain, memoryless or not:

    log w_b = lambda r(x0_b) + sum_k [log pi_ref(x_{k-1} | x_k) - log pi_theta(x_{k-1} | x_k)],   lambda = 1 / beta,

self-normalised over the pool (within each class for a class-conditional model). It then takes
--distill-steps gradient steps of the pretraining loss on minibatches of --minibatch-size samples resampled
in proportion to the weights; the stage's model is the moving average of those steps' weights
(--distill-ema). Where the full tilt keeps less than --ess-target of the pool, the epoch fits an
intermediate lambda (adaptive tempering). The derivation, why resampling, and the tempering:
docs/design.md, section 8.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from rl_diffusion.algos.base import Algorithm, Batch
from rl_diffusion.config import arg
from rl_diffusion.errors import UserError
from rl_diffusion.path_kl import Pairs

BISECTION_STEPS = 50  # halvings of [lambda_prev, 1 / beta]: far below any reward's resolution
ESS_FLOOR = 0.01  # warn when a stage's weights keep fewer than this fraction of the pool


def self_normalised(log_weights: Tensor, c: Tensor | None) -> Tensor:
    """Weights [B] from log-weights [B], summing to 1; with labels c [B], each class's weights sum to its share of
    the pool (a class-conditional optimum tilts within each class). float64."""
    log_weights = log_weights.double()
    if c is None:
        return torch.softmax(log_weights, 0)
    weights = torch.zeros_like(log_weights)
    for label in c.unique():
        rows = c == label
        weights[rows] = torch.softmax(log_weights[rows], 0) * rows.sum() / len(c)
    return weights


def effective_sample_size(weights: Tensor) -> float:
    """Kish's effective sample size 1 / sum_b w_b^2 of normalised weights: N for equal weights, 1 for one."""
    return 1.0 / weights.square().sum().item()


def tempered_lambda(
    rewards: Tensor, log_ratio: Tensor, c: Tensor | None, lambda_prev: float, lambda_final: float, ess_target: float
) -> float:
    """The stage's inverse temperature: the largest lambda in [lambda_prev, lambda_final] whose weights
    exp(lambda r + log_ratio) keep an effective sample size of ess_target * B; lambda_final when it does;
    lambda_prev when even that falls short. Assumes the effective sample size falls as lambda grows."""

    def ess(lam: float) -> float:
        return effective_sample_size(self_normalised(lam * rewards.double() + log_ratio, c)) / len(rewards)

    if ess(lambda_final) >= ess_target:
        return lambda_final
    if ess(lambda_prev) < ess_target:
        return lambda_prev
    low, high = lambda_prev, lambda_final
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        low, high = (middle, high) if ess(middle) >= ess_target else (low, middle)
    return low


class ImportanceWeightedDistillation(Algorithm):
    """IW-distill: each epoch, a pool of the policy's chains weighted towards the tilt, fitted by the denoising
    loss on resampled minibatches."""

    defaults = {"epochs": 3, "kl_coef": 1.0, "lr": 5e-4, "minibatch_size": 512}
    # Images: one stage at the full tilt, on the full DDPM chain. A later stage's weights carry the path ratio over
    # every pixel of every step, which degenerates (digit 3: 0.15% of a 4,096-chain pool kept at the second
    # epoch); the first stage's are exp(r / beta) alone. On 20 DDIM steps the fitted digits lost variety within
    # their class (0.69 of the real 3s', against 0.84 on the DDPM chain: docs/benchmarks.md).
    image_defaults = {
        "sampler": "ddpm",
        "sampling_steps": 0,
        "epochs": 1,
        "ess_target": 0.05,
        "pool_size": 4096,
        "distill_steps": 1000,
        "distill_ema": 0.995,  # 0.999 ** 1,000 would leave 37% of the starting weights in the average
        "minibatch_size": 128,
    }

    @dataclass(frozen=True)
    class Settings:
        pool_size: int = arg(
            10_000,
            "iw-distill: chains drawn and scored per epoch (reward queries), weighted towards the tilt; its defaults "
            "differ: --epochs 3 --kl-coef 1 --lr 5e-4 --minibatch-size 512 (samples per gradient step); on images "
            "--sampler ddpm --epochs 1 --ess-target 0.05 --pool-size 4096 --distill-steps 1000 --distill-ema 0.995 "
            "--minibatch-size 128",
        )
        distill_steps: int = arg(4000, "iw-distill: gradient steps of the denoising loss per epoch, on resampled pools")
        distill_ema: float = arg(
            0.999,
            "iw-distill: decay per step of the moving average of the weights that becomes each stage's model "
            "(0 = the last step's weights)",
        )
        ess_target: float = arg(
            0.25,
            "iw-distill: effective sample size, as a fraction of the pool, that each tempering stage keeps; below it "
            "the epoch fits an intermediate tilt exp(r / beta_e), beta_e > beta",
        )

    def __init__(self, run):
        super().__init__(run)
        self.lam = 0.0  # lambda of the last stage fitted: 0 before the first (the pretrained model)
        self.warned = False

    @classmethod
    def validate(cls, config) -> None:
        if config.kl_coef <= 0:
            raise UserError("--algo iw-distill fits p_pre exp(r / beta) / Z: it needs --kl-coef > 0, got 0")
        if config.kl_target:
            raise UserError("--algo iw-distill fits the tilt at the fixed beta of --kl-coef; --kl-target adapts none")
        settings = config.settings
        if settings.pool_size < 2:
            raise UserError(f"--pool-size must be at least 2 chains, got {settings.pool_size}")
        if settings.distill_steps < 1:
            raise UserError(f"--distill-steps must be positive, got {settings.distill_steps}")
        if not 0 <= settings.distill_ema < 1:
            raise UserError(f"--distill-ema must be in [0, 1) (0: the last step), got {settings.distill_ema}")
        if not 0 < settings.ess_target <= 1:
            raise UserError(f"--ess-target must be a fraction of the pool in (0, 1], got {settings.ess_target}")
        if config.log_prob_reduction != "sum":
            raise UserError("--algo iw-distill weights chains by their exact path ratio: use --log-prob-reduction sum")

    def sample(self, generator: torch.Generator, noise_scale: float = 1.0) -> tuple[Pairs, Tensor, Tensor | None]:
        """The epoch's pool: --pool-size chains of the current policy (on-policy: the loop logs their rewards)."""
        return self.sample_chains(self.settings.pool_size, "--pool-size", generator, noise_scale)

    def update(self, batch: Batch, generator: torch.Generator) -> dict[str, float]:
        run, cfg, settings = self.run, self.run.config, self.settings
        log_ratio = batch.log_ratio.sum(0).double()  # [B] log P_pre(tau) / Q(tau)
        self.lam = tempered_lambda(batch.rewards, log_ratio, batch.c, self.lam, 1 / self.kl_coef, settings.ess_target)
        weights = self_normalised(self.lam * batch.rewards.double() + log_ratio, batch.c)
        ess = effective_sample_size(weights) / batch.B
        if ess < ESS_FLOOR and not self.warned and run.ranks.is_main:
            self.warned = True
            print(
                f"warning: iw-distill's weights keep {ess:.2%} of the pool of {batch.B:,} (effective sample size "
                f"below {ESS_FLOOR:.0%}): the fit follows a few chains; raise --pool-size or --ess-target",
                file=sys.stderr,
            )
        rows = run.ranks.shard(cfg.minibatch_size, "--minibatch-size")

        def denoising_loss() -> Tensor:  # E_{t, eps} ||eps_theta(x_t, t) - eps||^2 / D on a resampled minibatch
            pick = torch.multinomial(weights.float(), cfg.minibatch_size, replacement=True, generator=generator)
            c = None if batch.c is None else batch.c[pick]
            return run.diffusion.training_loss(run.synced_policy, batch.x0[pick], c, generator=generator, shard=rows)

        # The stage's model is the exponential moving average of the steps' iterates (Polyak averaging), as in
        # pretraining: the last iterate's minibatch noise moves mode masses by more than the pool's own error
        # (9-mode posterior, seed 0: mode-mass L1 0.060 with the last iterate, 0.041 with the average).
        params = [p for p in run.policy.parameters() if p.requires_grad]
        average = [p.detach().clone() for p in params]

        def after_step() -> None:
            torch._foreach_lerp_(average, [p.detach() for p in params], 1 - settings.distill_ema)

        loss = self.descend(denoising_loss, settings.distill_steps, after_step)  # decay 0: the average is the last step
        with torch.no_grad():
            torch._foreach_copy_(params, average)
        return {
            "loss/policy": loss,
            "iw/lambda": self.lam,  # 1 / beta of the stage fitted: reaches 1 / --kl-coef when tempering is done
            "iw/ess_fraction": ess,
            "iw/log_ratio_mean": log_ratio.mean().item(),
        }

    def state_dict(self) -> dict:
        return {**super().state_dict(), "iw": {"lambda": self.lam, "warned": self.warned}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lam, self.warned = state["iw"]["lambda"], state["iw"]["warned"]
