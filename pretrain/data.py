"""One view of every data set, points or images: a training pool, labels, and reference draws."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pretrain.datasets import DATASETS_2D, sample_2d
from pretrain.images import IMAGE_DATASETS, load_image_dataset
from rl_diffusion.errors import UserError, nearest

POOL_SIZE_2D = 100_000  # fresh 2D points drawn once per run; batches index into them
# The `data` record of a network imported from a diffusers pipeline (rl_diffusion/diffusers_io.py): its data is unknown.
IMPORTED = "diffusers"
EVAL_DATA_SEED = 12345  # the reference draw every evaluation compares against


@dataclass
class TrainingData:
    """A data set as pretraining consumes it."""

    name: str
    x: Tensor  # [N, ...] float32: 2D points, or images in [-1, 1]
    labels: Tensor | None  # [N] long, or None when unlabelled
    num_classes: int  # 0 when unlabelled

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.dim() == 4


def is_image_dataset(name: str) -> bool:
    if name in IMAGE_DATASETS:
        return True
    if name in DATASETS_2D:
        return False
    everything = [*DATASETS_2D, *IMAGE_DATASETS]
    raise UserError(f"unknown data set '{name}'{nearest(name, everything)}; available: {', '.join(everything)}")


def load_training_data(name: str, seed: int, root: str = "", image_size: int = 0) -> TrainingData:
    """2D: a pool of fresh points drawn with `seed`; images: the whole data set with its labels."""
    if not is_image_dataset(name):
        return TrainingData(name, torch.from_numpy(sample_2d(name, POOL_SIZE_2D, seed)), None, 0)
    images, labels, num_classes = load_image_dataset(name, root or None, image_size or None)
    return TrainingData(name, torch.from_numpy(images), torch.from_numpy(labels) if num_classes else None, num_classes)


def reference_draws(data: TrainingData, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two independent reference sets of (up to) n items: what samples are compared to, and the floor's partner.

    2D: two fresh draws. Images: two disjoint random halves of the data set (at most N/2 each).
    """
    if not data.is_image:
        return sample_2d(data.name, n, seed), sample_2d(data.name, n, seed + 1)
    n = min(n, len(data.x) // 2)
    order = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(seed))
    return data.x[order[:n]].numpy(), data.x[order[n : 2 * n]].numpy()


def data_of_checkpoint(info: dict) -> TrainingData:
    """The data set a checkpoint's model was trained on, from its `data` record; empty for an imported network."""
    if info["dataset"] == IMPORTED:
        return TrainingData(IMPORTED, torch.zeros((0, *info["shape"])), None, 0)
    return load_training_data(info["dataset"], info.get("seed", 0), info.get("root", ""), info.get("image_size", 0))
