"""Epsilon networks, built by kind from the plain dict saved in every checkpoint."""

from __future__ import annotations

from torch import nn

from rl_diffusion.errors import UserError
from rl_diffusion.models.diffusers_unet import DiffusersUNet
from rl_diffusion.models.mlp import INPUT_EMBEDDINGS, TIME_EMBEDDINGS, MLPEps
from rl_diffusion.models.unet import UNetEps

MODELS: dict[str, type[nn.Module]] = {"mlp": MLPEps, "unet": UNetEps, "diffusers-unet": DiffusersUNet}

__all__ = ["MODELS", "build_model", "DiffusersUNet", "MLPEps", "UNetEps", "TIME_EMBEDDINGS", "INPUT_EMBEDDINGS"]


def build_model(config: dict) -> nn.Module:
    """Build the network described by {"kind": ..., **constructor kwargs}."""
    kwargs = dict(config)
    kind = kwargs.pop("kind")
    if kind not in MODELS:
        raise UserError(f"unknown model kind '{kind}'; this version knows {', '.join(MODELS)}")
    try:
        return MODELS[kind](**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build a '{kind}' model: {e}") from None
