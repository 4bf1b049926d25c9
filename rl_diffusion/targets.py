"""Exact samples of the KL-regularised optimum p_data(x) exp(r(x) / beta) / Z of 2D fine-tuning.

Two cases are exact, with beta = kl_coef:
- a ``linear`` reward a . x on a Gaussian-mixture data set: each component N(mu, s^2 I) tilts
  to N(mu + s^2 a / beta, s^2 I), with weight proportional to
  w exp(a . mu / beta + s^2 |a|^2 / (2 beta^2)), again a mixture (closed form);
- any 2D data set with a reward that declares an upper bound ``max_value``: rejection sampling,
  proposing from the data set's own sampler and accepting with probability
  exp((r(x) - max_value) / beta).
Both are samples of the optimum for the data set itself, not for a pretrained model of it
(docs/design.md, section 5).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pretrain.datasets import DATASETS_2D, MIXTURES, Mixture, sample_2d
from rewards import Reward, build_reward
from rewards.builtin_2d import gmm25_posterior, linear
from rl_diffusion.metrics import mode_masses

# A sample within 4 component stds of a mode counts for it: a 2D Gaussian holds 1 - exp(-8)
# = 99.97% of its mass there, and on the gmm25 grid (spacing 9.1 stds) the discs do not touch.
MODE_RADIUS_STDS = 4.0
PROPOSAL_BATCH = 100_000  # proposals per reward call in rejection sampling
MAX_PROPOSALS = 10_000_000  # give up rejection sampling when it is projected to need more
MASS_ESTIMATE_SAMPLES = 100_000  # exact target draws behind mode masses without a closed form


@dataclass(frozen=True)
class Modes:
    """The modes of a 2D mixture-like distribution and how much mass each one holds."""

    means: np.ndarray  # [M, 2] float64, data units
    masses: np.ndarray  # [M] float64: the mass at each mode (the rest lies outside every mode)
    radius: float  # data units: a point within radius of its nearest mean counts for that mode


@dataclass(frozen=True)
class ExactTarget:
    """Exact samples of p_data(x) exp(r(x) / kl_coef) / Z."""

    samples: np.ndarray  # [N, 2] float32, i.i.d.
    modes: Modes | None  # None unless the data set is a mixture
    description: str  # one line: how the samples were obtained


class RejectionTooCostly(Exception):
    """Rejection sampling would need more than MAX_PROPOSALS proposals (the acceptance rate is too low)."""


def dataset_modes(dataset: str) -> Modes | None:
    """A mixture data set's component means and weights, radius MODE_RADIUS_STDS stds; None for the others."""
    mixture = MIXTURES.get(dataset)
    if mixture is None:
        return None
    return Modes(mixture.means, mixture.weights, MODE_RADIUS_STDS * mixture.std)


def tilt_linear(mixture: Mixture, a: np.ndarray, kl_coef: float) -> Mixture:
    """The mixture times exp(a . x / kl_coef), normalised: again a mixture, in closed form.

    Component N(mu, s^2 I) becomes N(mu + s^2 a / kl_coef, s^2 I) with weight proportional to
    w exp(a . mu / kl_coef + s^2 |a|^2 / (2 kl_coef^2)); the last term is common to every
    component (one std), so it cancels in the normalisation.
    """
    log_weights = np.log(mixture.weights) + mixture.means @ a / kl_coef
    return Mixture(mixture.means + mixture.std**2 * a / kl_coef, mixture.std, np.exp(log_weights - log_weights.max()))


def rejection_sample(
    dataset: str, reward: Reward, kl_coef: float, num_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """num_samples exact draws of p_data(x) exp(r(x) / kl_coef) / Z, float32 [num_samples, 2].

    Proposes batches from the data set's sampler and accepts x with probability
    exp((r(x) - max_value) / kl_coef), which needs ``reward.max_value``. A non-finite reward
    rejects. Raises RejectionTooCostly once the acceptance rate so far projects more than
    MAX_PROPOSALS proposals.
    """
    if reward.max_value is None:
        raise ValueError(f"reward '{reward.name}' declares no max_value: rejection sampling needs an upper bound")
    accepted: list[np.ndarray] = []
    num_accepted = num_proposed = 0
    while num_accepted < num_samples:
        if num_proposed * num_samples > MAX_PROPOSALS * max(num_accepted, 1):
            raise RejectionTooCostly(
                f"rejection sampling accepted {num_accepted} of {num_proposed} proposals; {num_samples} samples "
                f"would need more than {MAX_PROPOSALS:,}"
            )
        x = sample_2d(dataset, PROPOSAL_BATCH, rng)
        r = reward(torch.from_numpy(x)).double().numpy()
        # exp of a non-finite log-ratio is nan or inf; the finite mask rejects those.
        log_ratio = np.where(np.isfinite(r), (r - reward.max_value) / kl_coef, -np.inf)
        keep = np.log(rng.random(len(x))) < log_ratio
        accepted.append(x[keep])
        num_accepted += int(keep.sum())
        num_proposed += len(x)
    return np.concatenate(accepted)[:num_samples]


def exact_target(
    dataset: str, reward_name: str, reward_args: dict[str, Any], kl_coef: float, num_samples: int, seed: int
) -> ExactTarget | None:
    """num_samples exact draws of the KL-regularised optimum of data set x reward, or None.

    None: no exact method for this pair (an image or non-mixture data set with a reward that
    declares no max_value, or kl_coef <= 0). Raises RejectionTooCostly when rejection sampling
    accepts too rarely; the caller falls back to importance resampling.

    For a mixture data set the modes come too: the tilted components for a linear reward; the
    posterior's weights for ``gmm_posterior`` on ``gmm25`` at kl_coef 1; otherwise the data
    set's means, with each one's mass estimated as the fraction of MASS_ESTIMATE_SAMPLES more
    exact draws within the mode radius. Closed-form masses are component weights: a
    component holds 1 - exp(-8) of its weight within the radius, so the two agree within 4e-4.
    """
    if kl_coef <= 0 or dataset not in DATASETS_2D:
        return None
    reward = build_reward(reward_name, reward_args, skip_nonfinite=True)
    rng = np.random.default_rng(seed)
    mixture = MIXTURES.get(dataset)
    if reward_name == "linear" and mixture is not None:
        bound = inspect.signature(linear).bind(**reward_args)
        bound.apply_defaults()
        a = np.asarray(bound.arguments["a"], dtype=np.float64)
        tilted = tilt_linear(mixture, a, kl_coef)
        return ExactTarget(
            tilted.sample(rng, num_samples).astype(np.float32),
            Modes(tilted.means, tilted.weights, MODE_RADIUS_STDS * mixture.std),
            f"closed form: the {dataset} components tilted by exp(a . x / {kl_coef:g}), a = {a.tolist()}",
        )
    if reward.max_value is None:
        return None
    description = f"rejection sampling from {dataset}, acceptance exp((r - {reward.max_value:g}) / {kl_coef:g})"
    if mixture is None:
        return ExactTarget(rejection_sample(dataset, reward, kl_coef, num_samples, rng), None, description)
    radius = MODE_RADIUS_STDS * mixture.std
    if reward_name == "gmm_posterior" and dataset == "gmm25" and kl_coef == 1:
        samples = rejection_sample(dataset, reward, kl_coef, num_samples, rng)
        return ExactTarget(
            samples,
            Modes(mixture.means, gmm25_posterior(reward_args.get("modes")).weights, radius),
            f"{description}; mode masses: the posterior's weights",
        )
    samples = rejection_sample(dataset, reward, kl_coef, num_samples + MASS_ESTIMATE_SAMPLES, rng)
    masses, _ = mode_masses(samples[num_samples:], mixture.means, radius)
    return ExactTarget(
        samples[:num_samples],
        Modes(mixture.means, masses, radius),
        f"{description}; mode masses from {MASS_ESTIMATE_SAMPLES:,} more exact draws",
    )
