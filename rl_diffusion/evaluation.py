"""`rl-diffusion evaluate`: the metrics of a run's samples, each next to a floor or a baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pretrain.data import data_of_checkpoint, reference_draws
from pretrain.train import EVAL_DATA_SEED, draw_samples, quality_metrics, sample_shape_and_labels
from rl_diffusion.checkpoint import load_run, read_run_config
from rl_diffusion.distributed import resolve_device
from rl_diffusion.metrics import diversity, sliced_wasserstein2

TILTED_POOL = 50_000  # pretrained samples importance-resampled into the KL-regularised optimum


def evaluate_run(run_dir: Path, num_samples: int = 5000, seed: int = 0, device: str = "cpu") -> dict:
    """Pretrain runs: sample quality against the data set. Finetune runs: see `evaluate_finetuned`."""
    if read_run_config(run_dir).get("kind") == "finetune":
        return evaluate_finetuned(run_dir, num_samples, seed, device)
    device = resolve_device(device)
    run = load_run(run_dir, device)
    reference, again = reference_draws(data_of_checkpoint(run.checkpoint["data"]), num_samples, EVAL_DATA_SEED)
    samples = draw_samples(run.diffusion, run.model, len(reference), seed=seed, device=device)
    metrics = quality_metrics(samples, reference, again)
    return {"run": str(run_dir), "kind": "pretrain", "dataset": run.checkpoint["data"]["dataset"], "num_samples": len(reference), **metrics}


def tilted_target(pool: np.ndarray, pool_rewards: np.ndarray, kl_coef: float, num_samples: int, seed: int) -> tuple[np.ndarray, float]:
    """Samples of p_pre(x) exp(r(x) / beta) / Z by importance-resampling a pool of pretrained samples.

    Returns the samples and the effective sample size of the weights (small: the pool is too
    small for this beta, and every distance to the target is noisier).
    """
    logw = pool_rewards / kl_coef
    w = np.exp(logw - logw.max())
    w /= w.sum()
    idx = np.random.default_rng(seed).choice(len(pool), size=num_samples, replace=True, p=w)
    return pool[idx], float(1.0 / np.sum(w**2))


def evaluate_finetuned(run_dir: Path, num_samples: int = 5000, seed: int = 0, device: str = "cpu") -> dict:
    """Mean reward, exact path KL to the pretrained model, diversity; with kl_coef > 0 the sliced W2
    to the KL-regularised optimum next to that target's floor (two independent resamplings)."""
    from rewards import build_reward
    from rl_diffusion.ddpo import Pairs, path_kls
    from rl_diffusion.finetune import FinetuneConfig

    device = resolve_device(device)
    saved = read_run_config(run_dir)
    cfg = FinetuneConfig(**{k: v for k, v in saved.items() if k != "kind"})
    run, pretrained = load_run(run_dir, device), load_run(Path(cfg.run), device)
    reward = build_reward(cfg.reward, cfg.reward_args, skip_nonfinite=True)
    shape, c = sample_shape_and_labels(run.model, num_samples, device)
    with torch.no_grad():
        traj = run.diffusion.sample(run.model, shape, c=c, generator=torch.Generator(device=device).manual_seed(seed),
                                    device=device, record=True, log_prob_reduction=cfg.log_prob_reduction, **cfg.sampling)
        kl = path_kls(run.diffusion, cfg, run.model, pretrained.model, Pairs.from_trajectory(traj), len(traj.timesteps)).sum(0)
        before = pretrained.diffusion.sample(pretrained.model, shape, c=c, generator=torch.Generator(device=device).manual_seed(seed + 1),
                                             device=device, **cfg.sampling).xs[-1]
    samples = traj.xs[-1]
    metrics = {
        "run": str(run_dir), "kind": "finetune", "algo": cfg.algo, "reward": cfg.reward, "num_samples": num_samples,
        "reward_mean": reward(samples, c).nanmean().item(),
        "reward_mean_pretrained": reward(before, c).nanmean().item(),
        "kl_to_pretrained": kl.mean().item(),
        "diversity": diversity(samples),
        "diversity_pretrained": diversity(before),
    }
    if cfg.kl_coef > 0 and len(run.checkpoint["data"]["shape"]) == 1:
        targets, esses = [], []  # two independent resamplings: the target, and its floor's partner
        for i in range(2):
            pool = draw_samples(pretrained.diffusion, pretrained.model, TILTED_POOL, seed=seed + 2 + i, device=device, **cfg.sampling)
            pool_rewards = reward(torch.from_numpy(pool).to(device)).cpu().numpy()
            target, ess = tilted_target(pool, pool_rewards, cfg.kl_coef, num_samples, seed=seed + i)
            targets.append(target)
            esses.append(ess)
        metrics.update({
            "tilted_sw2": sliced_wasserstein2(samples, targets[0]),
            "tilted_sw2_pretrained": sliced_wasserstein2(before, targets[0]),
            "tilted_sw2_floor": sliced_wasserstein2(targets[1], targets[0]),
            "tilted_ess": esses[0],  # of the pool behind the target every distance is measured to
            "tilted_reward_mean": reward(torch.from_numpy(targets[0]).to(device)).mean().item(),
        })
    return metrics
