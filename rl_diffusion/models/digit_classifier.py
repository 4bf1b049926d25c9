"""A small CNN for scikit-learn's 8x8 digits: the digit rewards and the image metrics use it.

It trains in a few seconds on CPU and is cached as a state dict, so the first use trains it
once and later uses load it. Its penultimate layer is the feature space of the Frechet and
kernel distances in ``rl_diffusion.image_metrics`` (the role Inception plays for photos).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.images import load_digits_images
from rl_diffusion.checkpoint import atomic_save
from rl_diffusion.errors import UserError

CACHE_ENV = "RL_DIFFUSION_CACHE"
CACHE_FILE = "digit_cnn_v1.pt"
"""Bump the version tag whenever the architecture or the training recipe changes."""

HELD_OUT_FRACTION = 0.2
FEATURE_DIM = 64


class DigitCNN(nn.Module):
    """Logits over the 10 digits for grey images [B, 1, S, S] in [-1, 1] (ink = +1), any S.

    Images that are not 8x8 are resized to 8x8 (bilinear, antialiased, like the PIL resize of
    ``load_digits_images``), so models trained on 16x16 digits can be scored too. The
    attribute ``held_out_accuracy`` (a buffer, saved with the weights) is the accuracy on the
    split ``split_digits`` holds out, measured right after training.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)
        self.register_buffer("held_out_accuracy", torch.tensor(float("nan")))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations [B, FEATURE_DIM] (after ReLU, so non-negative)."""
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"the digit classifier takes grey images [B, 1, S, S], got {list(x.shape)}")
        if x.shape[-2:] != (8, 8):
            x = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
        return self.conv(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def split_digits(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, held-out images, held-out labels) of the 8x8 digits.

    A seeded random 80/20 split of the 1,797 images (1,438 / 359); the same seed always
    gives the same split, so the held-out part stays unseen by the classifier it trains.
    """
    images, labels = load_digits_images(8)
    order = np.random.default_rng(seed).permutation(len(images))
    num_held_out = round(HELD_OUT_FRACTION * len(images))
    train, held_out = order[num_held_out:], order[:num_held_out]
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    return x[train], y[train], x[held_out], y[held_out]


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random small affine warps per image: rotation +-10 deg, scale 0.9..1.1, shift +-1 pixel.

    Diffusion samples are slightly off-centre and unevenly drawn; the warps keep the classifier
    from relying on exact pixel positions. Pixels warped in from outside are background (-1).
    """
    b = len(x)
    angle = (torch.rand(b, generator=generator) * 2 - 1) * (10 * torch.pi / 180)
    scale = 0.9 + 0.2 * torch.rand(b, generator=generator)
    # affine_grid works in [-1, 1] coordinates, where one of 8 pixels is 2 / 8 wide.
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 / 8)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False) - 1


def accuracy(model: DigitCNN, images: Tensor, labels: Tensor) -> float:
    """Fraction of images whose most likely class is the label."""
    with torch.no_grad():
        return (model(images).argmax(dim=1) == labels).float().mean().item()


def train_digit_classifier(seed: int = 0, epochs: int = 15, batch_size: int = 64) -> DigitCNN:
    """Train a DigitCNN on the training part of ``split_digits(seed)``; eval mode on return.

    Adam (lr 3e-3, cosine decay to 0), cross-entropy, affine augmentation: 345 steps of 64, about
    3 s on one CPU core, held-out accuracy 97-99% over seeds 0..2 (98.3% for seed 0). Sets
    ``held_out_accuracy`` on the held-out 20%. The caller's global torch RNG is left as it was.

    Pitfall: on a CPU that other processes keep busy, torch's default of one thread per core can
    make this 5-20x slower (threads wait for each other); OMP_NUM_THREADS=1 avoids that.
    """
    train_x, train_y, held_x, held_y = split_digits(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the weight initialisation
        model = DigitCNN()
    steps_per_epoch = -(-len(train_x) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(_augment(train_x[batch], generator)), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    model.held_out_accuracy.fill_(accuracy(model, held_x, held_y))
    return model


def cache_path(cache_dir: str | Path | None = None) -> Path:
    """Where the trained classifier lives: cache_dir, else $RL_DIFFUSION_CACHE, else ~/.cache/rl_diffusion."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rl_diffusion"
    return Path(cache_dir) / CACHE_FILE


def load_digit_classifier(cache_dir: str | Path | None = None) -> DigitCNN:
    """The cached DigitCNN (eval mode, CPU); trained with seed 0 and saved first if absent.

    The file is written atomically (temporary file, then rename), so an interrupted run or
    two runs training at once never leave a half-written cache. A cache that does not load is
    reported with its path, to be deleted.
    """
    path = cache_path(cache_dir)
    if not path.is_file():
        model = train_digit_classifier(seed=0)
        atomic_save(model.state_dict(), path)
        return model
    model = DigitCNN()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise UserError(
            f"cannot load the cached digit classifier {path} ({type(e).__name__}); delete it and it will be retrained"
        ) from None
    return model.eval()
