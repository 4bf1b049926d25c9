"""A diffusers UNet2DModel as an eps network (model kind "diffusers-unet"; rl_diffusion/diffusers_io.py imports one).

diffusers is an optional extra, imported only when such a network is built.
"""

from __future__ import annotations

from types import ModuleType

from torch import Tensor, nn

from rl_diffusion.errors import UserError


def require_diffusers() -> ModuleType:
    """The diffusers package, or a UserError saying how to install it."""
    try:
        import diffusers
    except ImportError:
        raise UserError("this needs the optional diffusers extra: pip install -e .[diffusers]") from None
    return diffusers


class DiffusersUNet(nn.Module):
    """eps_theta(x_t, t) of an unconditional UNet2DModel, built from its config dict.

    diffusers counts timesteps from 0: its timestep k is our t = k + 1 (abar_t = prod_{s <= t} alpha_s
    in both), so the network sees t - 1.
    """

    num_classes = 0

    def __init__(self, unet: dict):
        super().__init__()
        self.unet = require_diffusers().UNet2DModel(**unet)
        config = self.unet.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else (size or (None, None))
        if height is None or height != width:
            raise ValueError(f"only square images are supported, the U-Net's sample_size is {size}")
        if config.num_class_embeds or config.class_embed_type:
            raise ValueError("only unconditional U-Nets are supported (this one embeds class labels)")
        if config.out_channels != config.in_channels:
            raise ValueError(
                f"the U-Net must predict eps alone: {config.out_channels} output channels for {config.in_channels} "
                "input channels (a learned variance?)"
            )
        self.in_channels, self.image_size = config.in_channels, height

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        """eps for x_t [B, C, S, S] at timesteps t [B] in 1..T; c is ignored (unconditional)."""
        return self.unet(x, t - 1).sample
