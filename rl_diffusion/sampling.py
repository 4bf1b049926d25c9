"""Samples of a trained network: the batch shape and labels it produces, and classifier-free guidance."""

from __future__ import annotations

import numpy as np
import torch

from rl_diffusion.diffusion import DenoisingProcess
from rl_diffusion.models.unet import guided_eps


def draw_samples(
    diffusion: DenoisingProcess,
    model: torch.nn.Module,
    num_samples: int,
    seed: int,
    device: torch.device,
    guidance_scale: float = 1.0,
    **sampling,
) -> np.ndarray:
    """num_samples samples (the process's default sampler over all T steps, or as `sampling` says) as numpy, in the
    data's shape.

    A class-conditional model gets balanced labels 0, 1, ..., K-1, 0, 1, ...; guidance_scale != 1
    mixes in its unconditional prediction (classifier-free guidance).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    shape, c = sample_shape_and_labels(model, num_samples, device)
    with torch.inference_mode():
        traj = diffusion.sample(
            guided(model, guidance_scale), shape, c=c, generator=generator, device=device, **sampling
        )
    return traj.xs[-1].cpu().numpy()


def sample_shape_and_labels(
    model: torch.nn.Module, num_samples: int, device: torch.device
) -> tuple[tuple[int, ...], torch.Tensor | None]:
    """The batch shape a network produces, and balanced labels when it is class-conditional."""
    shape = (
        (num_samples, model.in_channels, model.image_size, model.image_size)
        if hasattr(model, "image_size")
        else (num_samples, model.data_dim)
    )
    c = torch.arange(num_samples, device=device) % model.num_classes if model.num_classes else None
    return shape, c


def guided(model: torch.nn.Module, guidance_scale: float) -> torch.nn.Module:
    """The model itself at scale 1; else a module computing the classifier-free guided eps."""
    if guidance_scale == 1.0:
        return model

    class Guided(torch.nn.Module):
        def forward(self, x, t, c=None):
            return guided_eps(model, x, t, c, guidance_scale)

    return Guided()
