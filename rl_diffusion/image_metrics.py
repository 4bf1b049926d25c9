"""Image sample quality in a classifier's feature space: Frechet distance, KID, label coverage.

FID and KID proper use Inception-v3 features of photos; for the 8x8 digits the feature
extractor is the penultimate layer of the small digit CNN (``rl_diffusion.models.digit_classifier``),
so the numbers are comparable between runs of this codebase, never with published FIDs.
Both distances depend on the sample size (FD is biased upwards for small N), which is why
``image_quality`` reports each next to its floor: the same metric between two real sets of
the same sizes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

Features = Tensor | np.ndarray


def _as_float64(a: Features) -> np.ndarray:
    """numpy or torch [N, ...] -> float64 numpy [N, d]."""
    a = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    return a.astype(np.float64).reshape(len(a), -1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix, by eigendecomposition.

    Eigenvalues that rounding left slightly negative are set to 0.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T


def frechet_distance(feats_a: Features, feats_b: Features) -> float:
    """Frechet distance between Gaussians fitted to feats_a [N, d] and feats_b [M, d], in squared feature units.

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)  (Dowson & Landau 1982),
    with unbiased covariances. The last trace equals tr((S_a S_b)^1/2) of the usual FID formula,
    but is the trace of a symmetric PSD matrix, so it comes from real eigenvalues in float64 with
    no complex parts to discard. Needs N, M >= 2; with N < d the covariances are singular, which
    is allowed but makes the value noisy.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"the Frechet distance needs at least 2 samples per set, got {len(a)} and {len(b)}")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    sqrt_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clip(min=0)).sum()
    mean_term = np.square(a.mean(axis=0) - b.mean(axis=0)).sum()
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def kernel_inception_distance(
    feats_a: Features, feats_b: Features, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> float:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3.

    The mean over ``subsets`` random subsets of min(subset_size, N, M) rows of each set, drawn
    without replacement by a generator seeded with ``seed`` (the same inputs always give the
    same number). Unbiased: two sets from one distribution give values scattered around 0,
    negative ones included. Memory: three subset_size^2 float64 kernel matrices.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if m == len(a) == len(b):
        subsets = 1  # every subset would be both whole sets, reordered: the same estimate each time
    dim = a.shape[1]
    rng = np.random.default_rng(seed)
    estimates = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = ((p @ q.T / dim + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        # U-statistics: the diagonals k(x_i, x_i) pair a sample with itself and are left out.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates[i] = within - 2 * k_xy.mean()
    return float(estimates.mean())


def classifier_features(images: Tensor, classifier: nn.Module, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """(features [N, F], predicted labels [N]) of images under ``classifier``, in batches, on CPU.

    ``classifier`` must have ``features(x)`` (penultimate activations) and ``head`` (features ->
    logits), as ``DigitCNN`` has; images go to the classifier's device.
    """
    device = next(classifier.parameters()).device
    feats, labels = [], []
    with torch.no_grad():
        for batch in torch.as_tensor(images).split(batch_size):
            f = classifier.features(batch.to(device, torch.float32))
            feats.append(f.cpu())
            labels.append(classifier.head(f).argmax(dim=1).cpu())
    return torch.cat(feats), torch.cat(labels)


def image_quality(
    samples: Tensor,
    data: Tensor,
    data_again: Tensor,
    classifier: nn.Module,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, float | int | list[float]]:
    """Frechet distance and KID of samples to data in classifier features, with floors, and label coverage.

    Args:
        samples: generated images [N, C, H, W] in [-1, 1].
        data: real images, the reference set.
        data_again: other real images, disjoint from ``data``, ideally N of them: the ``*_floor``
            entries are the metric between data_again and data, what a perfect sampler scores.
        classifier: a ``DigitCNN``-like module (``features`` and ``head``) with K classes.
        kid_subsets, kid_subset_size: see ``kernel_inception_distance``.

    Returns:
        fd, fd_floor: Frechet distances (squared feature units).
        kid, kid_floor: kernel distances (unitless, the kernel is normalised by the dimension).
        label_distribution: fraction of samples the classifier assigns to each of the K classes.
        mode_coverage: number of classes holding at least half their uniform share, 1 / (2K), of
            the samples: K when every class is reasonably represented, fewer when the sampler
            drops modes. (It assumes balanced classes, as the digits are.)
    """
    sample_feats, sample_labels = classifier_features(samples, classifier)
    data_feats, _ = classifier_features(data, classifier)
    again_feats, _ = classifier_features(data_again, classifier)
    num_classes = classifier.head.out_features
    fractions = torch.bincount(sample_labels, minlength=num_classes).double() / len(sample_labels)
    return {
        "fd": frechet_distance(sample_feats, data_feats),
        "fd_floor": frechet_distance(again_feats, data_feats),
        "kid": kernel_inception_distance(sample_feats, data_feats, kid_subsets, kid_subset_size),
        "kid_floor": kernel_inception_distance(again_feats, data_feats, kid_subsets, kid_subset_size),
        "label_distribution": fractions.tolist(),
        "mode_coverage": int((fractions >= 1 / (2 * num_classes)).sum()),
    }
