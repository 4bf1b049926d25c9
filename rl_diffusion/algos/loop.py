"""The epoch loop of every native algorithm: sample -> score -> path KL -> update -> log -> checkpoint -> stop.

Written once; an algorithm only supplies `update` (and, if it needs to, `sample`): base.py.

Data parallel (torchrun, distributed.py): each rank samples and scores its share of the chains;
rewards, labels and x_0 are gathered, and the KLs of each rank's pairs, so every rank holds the
whole batch's scores.

Adaptive beta (--kl-target, Ziegler et al. 2019, "Fine-tuning language models from human
preferences"): after each epoch beta <- beta (1 + K_beta e), e = clip(KL / KL_target - 1, -0.2, 0.2),
with KL the batch's mean path KL per chain. Beta is loop state: updates read it from the algorithm's
kl_coef, which the loop adapts (the config and config.json keep the starting value; checkpoints the current one).
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
from tqdm import tqdm

from rl_diffusion import figures
from rl_diffusion.algos import algorithm
from rl_diffusion.algos.base import Algorithm, Batch
from rl_diffusion.checkpoint import StopSignal, atomic_write_text, rng_state, set_rng_state
from rl_diffusion.errors import UserError
from rl_diffusion.evaluation import evaluate_finetuned, evaluation_samples
from rl_diffusion.path_kl import reference_scores
from rl_diffusion.run import (
    Setup,
    best_epoch,
    early_stop,
    hacking_warnings,
    labels_fight_warning,
    log_epoch,
    restore_checkpoint,
    save_checkpoint,
    score_rewards,
    write_hyperparameters,
)

KL_ERROR_CLIP = 0.2  # Ziegler et al.: a KL far off target moves beta no faster than one 20% off


def adapted_kl_coef(kl_coef: float, kl: float, kl_target: float, kl_gain: float) -> float:
    """beta (1 + K_beta e), e = clip(KL / KL_target - 1, -0.2, 0.2): proportional control of log beta.

    kl and kl_target in nats of path KL per chain; a KL above the target raises beta, below lowers it.
    """
    error = min(max(kl / kl_target - 1, -KL_ERROR_CLIP), KL_ERROR_CLIP)
    return kl_coef * (1 + kl_gain * error)


def collect(run: Setup, algo: Algorithm, generator: torch.Generator, epoch: int) -> tuple[Batch, int]:
    """The epoch's chains (algo.sample), scored once, with the path KL and path log-ratio of each: the whole
    batch on every rank; and the number of samples scored (reward queries).

    Under --skip-nonfinite-rewards (one rank) chains with a non-finite reward are dropped entirely.
    """
    cfg = run.config
    pairs, x0, c = algo.sample(generator)  # this rank's chains
    rewards = score_rewards(run, x0, c, epoch)
    x0, rewards, c = (None if v is None else run.ranks.gather(v) for v in (x0, rewards, c))
    finite = torch.isfinite(rewards)
    K = run.steps_per_chain
    if not finite.all():
        pairs = pairs.select(finite.repeat(K))
    kl = log_ratio = None
    if pairs.log_prob_old is not None:  # a stochastic chain: its path KL and path density are defined
        scores = reference_scores(run.diffusion, cfg, run.policy, run.reference, pairs, K)
        kl, log_ratio = (run.ranks.gather(v, dim=1) for v in scores)
    c = None if c is None else c[finite]
    return Batch(pairs, x0[finite], c, rewards[finite], kl, K, log_ratio), len(rewards)


def train(run: Setup, resume: bool = False, progress: bool = True) -> dict:
    """Fine-tune run.policy for run.epochs epochs with the algorithm run.config.algo names; returns the final
    metrics."""
    cfg = run.config
    algo = algorithm(cfg.algo)(run)
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed)
    start, reward_queries = 0, 0
    if resume:
        state = restore_checkpoint(run)
        algo.load_state_dict(state)
        set_rng_state(state["rng"], generator)
        start, reward_queries = state["epoch"], state["reward_queries"]
        algo.kl_coef = state.get("kl_coef", cfg.kl_coef)
    else:
        write_hyperparameters(run)

    def train_state() -> dict:
        return {
            **algo.state_dict(),
            "rng": rng_state(generator),
            "reward_queries": reward_queries,
            "kl_coef": algo.kl_coef,
        }

    show = progress and run.ranks.is_main
    bar = tqdm(total=run.epochs, initial=start, desc=f"{cfg.algo} {run.reward.name}", disable=not show)
    with StopSignal() as stop, bar:
        for epoch in range(start, run.epochs):
            started = time.perf_counter()
            batch, scored = collect(run, algo, generator, epoch)
            reward_queries += scored
            if epoch == 0 and batch.c is not None and run.ranks.is_main:
                warning = labels_fight_warning(batch.rewards, batch.c)
                if warning:
                    print(f"warning: {warning}", file=sys.stderr)
            stats = algo.update(batch, generator)
            algo.epoch += 1
            if not math.isfinite(stats["loss/policy"]):
                raise UserError(
                    f"the {cfg.algo} loss became {stats['loss/policy']} at epoch {epoch + 1}; "
                    f"the last good checkpoint is kept in {run.out} (try a lower --lr)"
                )
            stats["reward/nonfinite"] = float(scored - batch.B)
            stats["train/lr"] = algo.optimizer.param_groups[0]["lr"]  # the policy's, at this epoch's --lr-decay
            if batch.kl is not None:
                kl_path = batch.kl.sum(0)
                stats["kl/to_pretrained"], stats["kl/to_pretrained_max"] = kl_path.mean().item(), kl_path.max().item()
                stats["kl/beta"] = algo.kl_coef
            if cfg.kl_target > 0:
                algo.kl_coef = adapted_kl_coef(algo.kl_coef, stats["kl/to_pretrained"], cfg.kl_target, cfg.kl_gain)
            log_epoch(
                run, epoch, reward_queries, batch.x0, batch.rewards, stats, time.perf_counter() - started, batch.c
            )
            bar.update(1)
            bar.set_postfix(
                reward=f"{run.history[-1]['reward/mean']:.3f}", kl=f"{stats.get('kl/to_pretrained', 0):.3f}"
            )
            stopping = run.ranks.any(stop.received is not None)
            new_best, early_stop_reason = early_stop(run)
            last = epoch + 1 == run.epochs
            if (epoch + 1) % cfg.checkpoint_every == 0 or last or stopping or new_best or early_stop_reason:
                save_checkpoint(run, epoch, train_state())
            if early_stop_reason and not stopping:
                if run.ranks.is_main:
                    print(early_stop_reason, file=sys.stderr)
                break
            if stopping:
                run.writer.close()
                raise UserError(
                    f"stopped by signal {stop.received} after epoch {epoch + 1}; "
                    f"checkpoint saved, continue with --resume {run.out}"
                )
    return finish_run(run)


def final_evaluation(run: Setup) -> dict:
    """The finished run against the pretrained model and the exact target (`evaluate_finetuned`), or, under
    --no-final-eval, the last epoch's training summary."""
    if not run.config.final_eval:
        last = run.history[-1] if run.history else {}
        return {"final_evaluation": "skipped (--no-final-eval)", "reward_mean": last.get("reward/mean")}
    num_samples = evaluation_samples(run.config.eval_samples, run.data_shape)
    return evaluate_finetuned(run.out, num_samples=num_samples, device=str(run.device))


def finish_run(run: Setup) -> dict:
    """Metrics file and figures of a finished run: samples before/after, reward curve, a GIF across epochs.
    Rank 0 only; the others get {}."""
    warnings = hacking_warnings(run.history, run.eval_data)
    for warning in warnings:
        run.writer.add_text("warnings", warning)
    run.writer.close()
    if not run.ranks.is_main:
        return {}
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    metrics = final_evaluation(run)
    # every sample scored in training (pools and exploratory chains included), so runs compare at equal cost
    metrics["reward_queries"] = run.history[-1]["reward_queries"] if run.history else 0
    if run.config.early_stop_on:
        metrics["best_epoch"] = best_epoch(run)
    if warnings:
        metrics["warnings"] = warnings
    atomic_write_text(run.out / "metrics.json", json.dumps(metrics, indent=2))
    if run.frames:
        lim = figures.limits(run.eval_data)
        figures.save_gif(run.frames, run.out / "figures" / "samples_over_epochs.gif", lim=lim)
        if run.frames[0][1].ndim == 4:
            figures.save_image_grid(run.frames[0][1], run.out / "figures" / "samples_before.png")
            figures.save_image_grid(run.frames[-1][1], run.out / "figures" / "samples_after.png")
        figures.plot_finetune_summary(
            before=run.frames[0][1],
            after=run.frames[-1][1],
            data=run.eval_data,
            epochs=[h["epoch"] for h in run.history],
            mean_rewards=[h["reward/mean"] for h in run.history],
            path=run.out / "figures" / "finetune.png",
            title=f"{run.config.algo} on {run.reward.name}",
        )
    return metrics
