"""A small U-Net epsilon network for images, with classifier-free guidance helpers.

The layout follows Ho et al. (2020) and improved-diffusion at toy scale: residual blocks
(GroupNorm, SiLU, 3x3 convs) that each add a projection of the time (+ class) embedding,
strided-conv downsampling, nearest-neighbour upsampling, skip connections by concatenation,
and optionally one self-attention layer at the lowest resolution.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rl_diffusion.models.mlp import SinusoidalEmbedding


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 8 that divides ``channels``."""
    groups = next(g for g in range(min(8, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """h + F(h, emb): two norm-SiLU-conv layers, the embedding added between them."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual; heads of 32 channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.num_heads = max(1, channels // 32)
        if channels % self.num_heads:
            raise ValueError(f"attention needs channels divisible by {self.num_heads} heads, got {channels}")
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, ch, h, w = x.shape
        # [B, 3C, H, W] -> three [B, heads, H*W, C/heads]
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, ch // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, ch, h, w))


class UNetEps(nn.Module):
    """eps_theta(x_t, t, c) for images x of shape [B, C, H, W], H = W.

    Args:
        image_size: side of the training images in pixels; must be divisible by
            2 ** (len(channel_mults) - 1). Other sizes with that divisibility also run.
        in_channels: C, 1 (grey) or 3 (RGB); the output has the same channels.
        base_channels: channels at full resolution; level i has base_channels * channel_mults[i].
            Every level's width should be divisible by 8 so GroupNorm gets 8 groups (fewer
            groups are used otherwise, which trains less well).
        channel_mults: width multipliers per resolution level; each level after the first
            halves the resolution, so (1, 2) on 8x8 images reaches 4x4.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention: one self-attention layer in the middle, at the lowest resolution; cost
            grows with (H*W / 4 ** (levels - 1)) ** 2.
        num_timesteps: T; t is embedded as t / T * 1000, so the embedding means the same for any T.
        num_classes: 0 for an unconditional model; else labels 0..K-1 get an embedding, and
            label K is the "no label" used when c is None and for classifier-free guidance.
        dropout: dropout probability inside residual blocks (training only).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention: bool = False,
        num_timesteps: int = 100,
        num_classes: int = 0,
        dropout: float = 0.0,
    ):
        super().__init__()
        channel_mults = tuple(int(m) for m in channel_mults)
        if not channel_mults or min(channel_mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty list of positive integers, got {channel_mults}")
        self.downsampling = 2 ** (len(channel_mults) - 1)
        if image_size < 1 or image_size % self.downsampling:
            raise ValueError(
                f"image_size {image_size} must be a positive multiple of {self.downsampling} "
                f"(2 ** (len(channel_mults) - 1) with channel_mults={list(channel_mults)})"
            )
        if in_channels < 1 or base_channels < 1 or num_res_blocks < 1 or num_timesteps < 1 or num_classes < 0:
            raise ValueError(
                "in_channels, base_channels, num_res_blocks and num_timesteps must be >= 1 and num_classes >= 0"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_timesteps = num_timesteps
        self.num_classes = num_classes

        emb_dim = 4 * base_channels
        # sinusoidal frequencies are tuned for t in [0, 1000]
        self.t_emb = nn.Sequential(
            SinusoidalEmbedding(base_channels, scale=1000.0),
            nn.Linear(2 * (base_channels // 2), emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        self.c_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_channels * mult, emb_dim, dropout))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attention = SelfAttention(ch) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skip_channels.pop(), base_channels * mult, emb_dim, dropout))
                ch = base_channels * mult
            if level > 0:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))
                )

        self.out_norm = _group_norm(ch)
        self.out_conv = nn.Conv2d(ch, in_channels, 3, padding=1)
        # Zero output: the untrained network predicts eps = 0, a stable start (improved-diffusion).
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        """Predict the noise in x_t.

        Args:
            x: x_t, float [B, C, H, W] with H = W a multiple of 2 ** (len(channel_mults) - 1).
            t: long [B], timesteps in 1..T.
            c: long [B] labels in 0..K (K = num_classes means "no label"), or None for all "no
                label"; ignored by an unconditional model.
        """
        square = x.dim() == 4 and x.shape[2] == x.shape[3]
        if not square or x.shape[1] != self.in_channels or x.shape[2] % self.downsampling:
            raise ValueError(
                f"expected images [B, {self.in_channels}, S, S] with S a multiple of "
                f"{self.downsampling}, got {list(x.shape)}"
            )
        emb = self.t_emb(t.to(x.dtype) / self.num_timesteps)
        if self.c_emb is not None:
            if c is None:
                c = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.c_emb(c)

        h = self.input_conv(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        h = self.mid2(self.mid_attention(self.mid1(h, emb)), emb)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb) if isinstance(layer, ResBlock) else layer(h)
        return self.out_conv(F.silu(self.out_norm(h)))


def guided_eps(model: nn.Module, x: Tensor, t: Tensor, c: Tensor | None, guidance_scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + s * (eps_c - eps_u).

    eps_u is the prediction with the null label (index num_classes), eps_c the one with c.
    s = 0 gives the unconditional model, s = 1 the conditional one, s > 1 sharpens towards c.
    Both predictions come from one forward pass over the doubled batch [x; x], so the cost is
    one network call on 2B samples; at s = 0 or s = 1, or when c is None (eps_c = eps_u), a
    single call on B samples suffices and is made instead.

    Pitfall: the model must have been trained with label dropout (``drop_labels``), otherwise
    the null label was never seen and eps_u is meaningless.
    """
    if c is None or guidance_scale == 1:
        return model(x, t, c)
    if guidance_scale == 0:
        return model(x, t, None)
    null = torch.full_like(c, model.num_classes)
    eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, null])).chunk(2)
    # lerp is exact at both ends (unlike a + s * (b - a) at s = 1) and extrapolates for s > 1.
    return torch.lerp(eps_uncond, eps_cond, guidance_scale)


def drop_labels(c: Tensor, num_classes: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """A copy of labels c [B] with each replaced by the null label num_classes with probability p.

    Used when training a class-conditional model so that the same network also learns the
    unconditional prediction that classifier-free guidance needs (p = 0.1 to 0.2 is usual).
    ``generator`` must live on c's device.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label dropout probability must be in [0, 1], got {p}")
    drop = torch.rand(c.shape, generator=generator, device=c.device) < p
    return torch.where(drop, torch.full_like(c, num_classes), c)
