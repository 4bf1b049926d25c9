"""`rl-diffusion evaluate`: the metrics of a run's samples, each next to a floor or a baseline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pretrain.data import EVAL_DATA_SEED, data_of_checkpoint, reference_draws
from rewards import Reward, build_reward, finite_mean
from rl_diffusion.checkpoint import (
    CheckpointManager,
    LoadedRun,
    atomic_save_npy,
    checkpoint_step,
    load_run,
    read_run_config,
)
from rl_diffusion.config import saved_config
from rl_diffusion.distributed import resolve_device
from rl_diffusion.errors import UserError
from rl_diffusion.metrics import (
    diversity,
    far_fraction,
    mmd_rbf,
    mode_mass_l1,
    mode_masses,
    quality_metrics,
    sliced_wasserstein2,
    vendi_score,
)
from rl_diffusion.processes import is_memoryless
from rl_diffusion.sampling import draw_samples, sample_shape_and_labels
from rl_diffusion.targets import ExactTarget, Modes, RejectionTooCostly, dataset_modes, exact_target


def evaluation_samples(eval_samples: int, data_shape: tuple[int, ...]) -> int:
    """The final evaluation's sample count: --eval-samples, or by default 5,000 points or 500 images (each image
    sample costs a U-Net call per step for the policy, the pretrained model and the path KL)."""
    return eval_samples or (5000 if len(data_shape) == 1 else 500)


TILTED_POOL = 50_000  # pretrained samples importance-resampled into the KL-regularised optimum
# Below 1,000 effective pool points the resampled target is a few hundred distinct points, each
# repeated: its distances then measure the pool's luck (see tilted_sw2_floor) more than the model.
TILTED_MIN_ESS = 1_000
FAR_RADIUS_FACTOR = 1.5  # far_radius = 1.5 x the largest norm of the data's reference draw


def _distances(points: np.ndarray, target: np.ndarray, modes: Modes | None) -> dict[str, float]:
    """Sliced W2 and MMD^2 (V-statistic, >= 0) of points [N, 2] to a target draw [M, 2], in data units;
    with modes, also the L1 error of the points' per-mode masses against ``modes.masses``."""
    out = {"sw2": sliced_wasserstein2(points, target), "mmd": mmd_rbf(points, target, statistic="v")}
    if modes is not None:
        out["mode_mass_l1"] = mode_mass_l1(mode_masses(points, modes.means, modes.radius)[0], modes.masses)
    return out


def _point_stats(points: np.ndarray, modes: Modes | None, far_radius: float) -> dict[str, float | list[float]]:
    """Fraction of points [N, 2] beyond far_radius; with modes, their per-mode masses and the mass outside all modes."""
    out: dict[str, float | list[float]] = {"far_fraction": far_fraction(points, far_radius)}
    if modes is not None:
        masses, outside = mode_masses(points, modes.means, modes.radius)
        out.update(mode_masses=masses.tolist(), outside_mass=outside)
    return out


def _far_radius(reference: np.ndarray) -> float:
    """FAR_RADIUS_FACTOR x the largest norm of the data's reference draw [N, 2], in data units."""
    return FAR_RADIUS_FACTOR * float(np.linalg.norm(reference, axis=1).max())


def checkpoint_samples(
    run_dir: Path, num_samples: int, seed: int, device: torch.device, **sampling
) -> Iterator[tuple[int, np.ndarray]]:
    """(step, samples) for every checkpoint a run keeps, oldest first: num_samples draws of each checkpoint's
    network, all from the same seed, with `sampling` (the process's default sampler if empty). How a run got to
    where it ended: the benchmarks score these against a target."""
    for path in CheckpointManager(run_dir).paths():
        loaded = load_run(run_dir, device, checkpoint=path)
        yield checkpoint_step(path), draw_samples(loaded.diffusion, loaded.model, num_samples, seed, device, **sampling)


def evaluate_run(
    run_dir: Path, num_samples: int = 5000, seed: int = 0, device: str = "cpu", kl_coef: float | None = None
) -> dict:
    """Pretrain runs: sample quality against the data set. Finetune runs: see `evaluate_finetuned`.

    2D data sets add the fraction of samples beyond ``far_radius``; mixture data sets add the
    samples' per-mode masses, their L1 error against the mixture weights (``data_mode_masses``)
    and the mass outside every mode (within ``mode_radius`` of none).
    """
    if read_run_config(run_dir).get("kind") == "finetune":
        return evaluate_finetuned(run_dir, num_samples, seed, device, kl_coef)
    if kl_coef is not None:
        raise UserError(
            f"--kl-coef measures a fine-tuning run against its tilted optimum; {run_dir} is a pretraining run"
        )
    device = resolve_device(device)
    run = load_run(run_dir, device)
    dataset = run.checkpoint["data"]["dataset"]
    reference, again = reference_draws(data_of_checkpoint(run.checkpoint["data"]), num_samples, EVAL_DATA_SEED)
    if len(reference) == 0:  # an imported network: no data to compare with
        return {
            "run": str(run_dir),
            "kind": "pretrain",
            "dataset": dataset,
            "note": f"the network was imported ('{dataset}') without its data set: sample quality (sliced W2, MMD, "
            "energy distance, Frechet distance, KID) needs data to compare with and is not computed; fine-tuning "
            "runs from it report reward, path KL and diversity",
        }
    samples = draw_samples(run.diffusion, run.model, len(reference), seed=seed, device=device)
    metrics = {
        "run": str(run_dir),
        "kind": "pretrain",
        "dataset": dataset,
        "num_samples": len(reference),
        **quality_metrics(samples, reference, again),
    }
    if reference.ndim == 2:
        modes = dataset_modes(dataset)
        metrics["far_radius"] = far_radius = _far_radius(reference)
        metrics.update(_point_stats(samples, modes, far_radius))
        if modes is not None:
            metrics.update(
                mode_radius=modes.radius,
                data_mode_masses=modes.masses.tolist(),
                mode_mass_l1=mode_mass_l1(np.array(metrics["mode_masses"]), modes.masses),
            )
    return metrics


def tilted_target(
    pool: np.ndarray, pool_rewards: np.ndarray, kl_coef: float, num_samples: int, seed: int
) -> tuple[np.ndarray, float]:
    """Samples of p_pre(x) exp(r(x) / beta) / Z by importance-resampling a pool of pretrained samples.

    Returns the samples and the effective sample size of the weights (small: the pool is too
    small for this beta, and every distance to the target is noisier).
    """
    logw = pool_rewards / kl_coef
    w = np.exp(logw - logw.max())
    w /= w.sum()
    idx = np.random.default_rng(seed).choice(len(pool), size=num_samples, replace=True, p=w)
    return pool[idx], float(1.0 / np.sum(w**2))


def evaluate_finetuned(
    run_dir: Path, num_samples: int = 5000, seed: int = 0, device: str = "cpu", kl_coef: float | None = None
) -> dict:
    """Metrics of a fine-tuned run's samples, each beside the pretrained model's ("..._pretrained").

    Always: mean reward, exact path KL to the pretrained model, diversity (mean pairwise
    distance), and ``eval_reward/<label>``: the mean of each held-out reward of the run
    (--eval-reward). 2D data sets add ``vendi`` (metrics.vendi_score: effective number of
    distinct samples), ``far_fraction`` (beyond ``far_radius``) and the yardstick ``pretrained_data_sw2`` /
    ``pretrained_data_mmd`` (the pretrained model against its data, with floors): how close
    the pretrained model, not the exact data distribution, is to its own target.

    With kl_coef > 0 on 2D data, distances to the KL-regularised optimum p_data exp(r / beta) / Z:
    - ``target_*``: to exact samples (`rl_diffusion.targets.exact_target`) where they exist:
      sliced W2 and MMD^2 (V-statistic) with floors (``_floor``: between two independent exact
      draws), E[r] and far fraction of the target; on mixtures the target's per-mode masses,
      the samples' ``mode_masses`` and ``outside_mass``, and the per-mode mass L1 error.
      ``target_note`` says why they are missing when rejection sampling accepts too rarely.
    - ``tilted_*``: to the pretrained model's own tilt, TILTED_POOL pretrained samples
      importance-resampled by exp(r / beta), with its effective sample size; pool samples with
      a non-finite reward are dropped (``tilted_nonfinite_dropped``), and below TILTED_MIN_ESS
      ``tilted_reliable`` is false.
    The optimum is reachable only by a memoryless reference chain (DDPM, or DDIM with eta = 1);
    otherwise ``memoryless`` is false and ``note`` says so.

    ``kl_coef`` is the beta of the optimum measured against: the run's own --kl-coef by default;
    give one to measure a run trained without a KL term (rwr, or kl_coef 0) against a tilt.
    """
    from rl_diffusion.finetune import FinetuneConfig

    device = resolve_device(device)
    cfg = saved_config(FinetuneConfig, run_dir)
    run, pretrained = load_run(run_dir, device), load_run(Path(cfg.run), device)
    # a --kl-target run adapts beta: its checkpoint holds the last one, the tilt its policy aims at
    beta = run.checkpoint["train_state"].get("kl_coef", cfg.kl_coef) if kl_coef is None else kl_coef
    if beta < 0:
        raise UserError(f"--kl-coef must be >= 0, got {beta}")
    reward = build_reward(cfg.reward, cfg.reward_args, skip_nonfinite=True)
    samples, kl, before, c = _draw_both(run_dir, cfg, run, pretrained, num_samples, seed, device)
    metrics = {"run": str(run_dir), "kind": "finetune", "algo": cfg.algo, "reward": cfg.reward}
    metrics |= _reward_kl_and_diversity(cfg, reward, samples, kl, before, c, beta) | {"num_samples": num_samples}
    if len(run.checkpoint["data"]["shape"]) == 1:
        samples, before = samples.cpu().numpy(), before.cpu().numpy()
        metrics |= _point_metrics(run, pretrained, cfg, reward, samples, before, beta, seed, device)
    return metrics


def _draw_both(run_dir: Path, cfg, run: LoadedRun, pretrained: LoadedRun, num_samples: int, seed: int, device):
    """The fine-tuned run's samples with each chain's path KL (None for an agent in noise mode), and the
    pretrained model's on the same labels: (samples, kl, before, labels)."""
    from rl_diffusion import agent_sampling
    from rl_diffusion.algos import AGENT_ALGOS

    shape, c = sample_shape_and_labels(run.model, num_samples, device)
    c = None if cfg.null_label else c
    with torch.no_grad():
        if cfg.algo in AGENT_ALGOS:  # the pretrained network steered by a stable-baselines3 agent
            samples, _, kl = agent_sampling.sample_agent(run_dir, num_samples, seed, device, c)
        else:
            samples, kl = sample_with_path_kl(run.model, run, pretrained, cfg, shape, c, seed, device)
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        before = pretrained.diffusion.sample(
            pretrained.model, shape, c=c, generator=generator, device=device, **cfg.sampling
        ).xs[-1]
    return samples, kl, before, c


def _reward_kl_and_diversity(cfg, reward: Reward, samples, kl, before, c, beta: float) -> dict:
    """What every run reports, points and images: rewards (held-out ones too), path KL, diversity."""
    from rl_diffusion.run import build_eval_rewards

    memoryless = is_memoryless(cfg.sampler, cfg.eta)
    metrics = {
        "memoryless": memoryless,
        "reward_mean": finite_mean(reward(samples, c)),
        "reward_mean_pretrained": finite_mean(reward(before, c)),
        "kl_to_pretrained": None if kl is None else kl.mean().item(),  # None: an agent in noise mode (no closed form)
        "diversity": diversity(samples),
        "diversity_pretrained": diversity(before),
    }
    for label, eval_reward in build_eval_rewards(cfg.eval_rewards).items():
        metrics[f"eval_reward/{label}"] = finite_mean(eval_reward(samples, c))
        metrics[f"eval_reward/{label}_pretrained"] = finite_mean(eval_reward(before, c))
    if not memoryless and beta > 0:
        metrics["note"] = (
            f"sampler {cfg.sampler} with eta {cfg.eta} does not forget x_T: p_pre exp(r / kl_coef) / Z "
            "is not reachable (docs/design.md, section 2), so distances to it are not distances to a "
            "reachable target"
        )
    return metrics


def _point_metrics(run: LoadedRun, pretrained: LoadedRun, cfg, reward: Reward, samples, before, beta, seed, device):
    """2D data: Vendi score, the pretrained model against its data, and with beta > 0 the distances to the
    exact target and to the pretrained model's own tilt (the docstring of `evaluate_finetuned`)."""
    num_samples = len(samples)
    metrics = {"vendi": vendi_score(samples), "vendi_pretrained": vendi_score(before)}
    dataset = run.checkpoint["data"]["dataset"]
    reference, again = reference_draws(data_of_checkpoint(run.checkpoint["data"]), num_samples, EVAL_DATA_SEED)
    metrics.update({f"pretrained_data_{k}": v for k, v in _distances(before, reference, None).items()})
    metrics.update({f"pretrained_data_{k}_floor": v for k, v in _distances(again, reference, None).items()})
    target = None
    if beta > 0:
        metrics["kl_coef"] = beta
        try:
            target = exact_target(dataset, cfg.reward, cfg.reward_args, beta, 2 * num_samples, seed)
        except RejectionTooCostly as e:
            metrics["target_note"] = f"no exact target: {e}; only tilted_* is reported"
    metrics["far_radius"] = far_radius = _far_radius(reference)
    modes = None if target is None else target.modes
    for suffix, points in (("", samples), ("_pretrained", before)):
        metrics.update({f"{k}{suffix}": v for k, v in _point_stats(points, modes, far_radius).items()})
    if target is not None:
        metrics.update(_exact_target_metrics(target, samples, before, reward, far_radius))
    if beta > 0:
        pools = [pretrained_pool(Path(cfg.run), pretrained, seed + 2 + i, device, cfg.sampling) for i in range(2)]
        metrics.update(_tilted_metrics(pools, reward, beta, samples, before, seed))
    return metrics


def sample_with_path_kl(
    model: torch.nn.Module,
    run: LoadedRun,
    pretrained: LoadedRun,
    cfg,
    shape: tuple[int, ...],
    c: torch.Tensor | None,
    seed: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_0 [N, ...] of `model` on the chain the run was trained on (cfg.sampling), and each chain's exact
    path KL to the pretrained model [N] in nats: `model` is scored as a policy, whatever it is."""
    from rl_diffusion.path_kl import Pairs, path_kls

    with torch.no_grad():
        traj = run.diffusion.sample(
            model,
            shape,
            c=c,
            generator=torch.Generator(device=device).manual_seed(seed),
            device=device,
            record=True,
            log_prob_reduction=cfg.log_prob_reduction,
            **cfg.sampling,
        )
        kl = path_kls(
            run.diffusion, cfg, model, pretrained.model, Pairs.from_trajectory(traj), len(traj.timesteps)
        ).sum(0)
    return traj.xs[-1], kl


def pretrained_pool(run_dir: Path, run: LoadedRun, seed: int, device: torch.device, sampling: dict) -> np.ndarray:
    """TILTED_POOL samples [N, 2] of a pretrained run, drawn once per (checkpoint, sampler, seed) and kept in
    RUN/cache/: every evaluation of every run fine-tuned from it needs the same pool."""
    step = run.checkpoint["train_state"]["step"]
    key = "_".join(f"{k}{v}" for k, v in sorted(sampling.items()))
    path = run_dir / "cache" / f"pool_step{step}_{key}_n{TILTED_POOL}_seed{seed}.npy"
    if path.exists():
        return np.load(path)
    pool = draw_samples(run.diffusion, run.model, TILTED_POOL, seed=seed, device=device, **sampling)
    atomic_save_npy(path, pool)
    return pool


def _exact_target_metrics(
    target: ExactTarget, samples: np.ndarray, before: np.ndarray, reward: Reward, far_radius: float
) -> dict:
    """The ``target_*`` block: fine-tuned and pretrained samples [N, 2] against the first half of the
    exact target's samples, and the second half against the first (the floors)."""
    draw, again = np.split(target.samples, 2)
    out = {
        "target_method": target.description,
        "target_reward_mean": finite_mean(reward(torch.from_numpy(draw))),
        "target_far_fraction": far_fraction(draw, far_radius),
    }
    for suffix, points in (("", samples), ("_pretrained", before), ("_floor", again)):
        out.update({f"target_{k}{suffix}": v for k, v in _distances(points, draw, target.modes).items()})
    if target.modes is not None:
        out.update(
            mode_radius=target.modes.radius,
            target_mode_masses=target.modes.masses.tolist(),
            target_outside_mass=mode_masses(draw, target.modes.means, target.modes.radius)[1],
        )
    return out


def _tilted_metrics(
    pools: list[np.ndarray], reward: Reward, kl_coef: float, samples: np.ndarray, before: np.ndarray, seed: int
) -> dict:
    """The ``tilted_*`` block: samples [N, 2] against the first pool's importance-resampled tilt, and the
    second pool's tilt against it (the floor); pool samples with a non-finite reward are dropped."""
    targets, esses, dropped = [], [], 0
    for i, pool in enumerate(pools):
        pool_rewards = reward(torch.from_numpy(pool)).numpy()
        finite = np.isfinite(pool_rewards)
        target, ess = tilted_target(pool[finite], pool_rewards[finite], kl_coef, len(samples), seed=seed + i)
        targets.append(target)
        esses.append(ess)
        dropped += int((~finite).sum())
    reliable = min(esses) >= TILTED_MIN_ESS
    out = {
        "tilted_ess": esses[0],
        "tilted_reliable": reliable,
        "tilted_nonfinite_dropped": dropped,
        "tilted_reward_mean": finite_mean(reward(torch.from_numpy(targets[0]))),
    }
    for suffix, points in (("", samples), ("_pretrained", before), ("_floor", targets[1])):
        out.update({f"tilted_{k}{suffix}": v for k, v in _distances(points, targets[0], None).items()})
    if not reliable:
        out["tilted_note"] = (
            f"effective sample size {min(esses):.0f} of a pool of {len(pools[0]):,} is below "
            f"{TILTED_MIN_ESS:,}: the resampled target repeats a few pool points, so tilted_* "
            "distances are unreliable"
        )
    return out
