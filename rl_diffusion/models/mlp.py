"""The MLP epsilon network for low-dimensional data, with the embeddings users ablate."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

TIME_EMBEDDINGS = ("sinusoidal", "learnable", "linear", "zero")
INPUT_EMBEDDINGS = ("sinusoidal", "identity", "learnable")


class SinusoidalEmbedding(nn.Module):
    """[sin(scale * v * w_k), cos(scale * v * w_k)] with geometric frequencies w_k (Vaswani et al.)."""

    def __init__(self, size: int, scale: float = 1.0):
        super().__init__()
        half = size // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half) / max(half - 1, 1)))
        self.scale = scale
        self.size = 2 * half

    def forward(self, v: Tensor) -> Tensor:
        angles = self.scale * v.unsqueeze(-1) * self.freqs
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class ScalarEmbedding(nn.Module):
    """The value itself ("identity"/"linear"), a learned linear map, or zeros (ablates the input)."""

    def __init__(self, kind: str, size: int):
        super().__init__()
        self.kind = kind
        self.size = size if kind == "learnable" else 1
        self.linear = nn.Linear(1, size) if kind == "learnable" else None

    def forward(self, v: Tensor) -> Tensor:
        v = v.unsqueeze(-1)
        if self.kind == "zero":
            return torch.zeros_like(v)
        return self.linear(v) if self.linear is not None else v


def _embedding(kind: str, size: int, scale: float, choices: tuple[str, ...], what: str) -> nn.Module:
    if kind not in choices:
        raise ValueError(f"unknown {what} embedding '{kind}'; choose one of {', '.join(choices)}")
    return SinusoidalEmbedding(size, scale) if kind == "sinusoidal" else ScalarEmbedding(kind, size)


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h: Tensor) -> Tensor:
        return h + nn.functional.gelu(self.linear(h))


class MLPEps(nn.Module):
    """eps_theta(x_t, t, c) for x in R^d: embed each coordinate and t, concatenate, residual MLP.

    Args:
        data_dim: d, the number of coordinates.
        num_timesteps: T; t is read as t / T so embeddings mean the same for any T.
        hidden_size: width of every hidden layer.
        hidden_layers: number of residual blocks.
        emb_size: size of each sinusoidal/learnable embedding.
        time_embedding: sinusoidal | learnable | linear (t / T) | zero (the network is not told t).
        input_embedding: sinusoidal (scale 25, per coordinate) | identity | learnable (linear map).
        num_classes: 0 for an unconditional model; else labels 0..K-1 get an embedding, and
            label K is the "no label" used for classifier-free guidance.
    """

    def __init__(
        self,
        data_dim: int = 2,
        num_timesteps: int = 100,
        hidden_size: int = 128,
        hidden_layers: int = 3,
        emb_size: int = 128,
        time_embedding: str = "sinusoidal",
        input_embedding: str = "sinusoidal",
        num_classes: int = 0,
    ):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.data_dim = data_dim
        self.num_classes = num_classes
        self.time_embedding = time_embedding
        if time_embedding == "learnable":
            self.t_emb = nn.Embedding(num_timesteps + 1, emb_size)
            t_size = emb_size
        else:
            # sinusoidal frequencies are tuned for t in [0, 1000]
            self.t_emb = _embedding(time_embedding, emb_size, 1000.0, TIME_EMBEDDINGS, "time")
            t_size = self.t_emb.size
        self.x_embs = nn.ModuleList(
            _embedding(input_embedding, emb_size, 25.0, INPUT_EMBEDDINGS, "input") for _ in range(data_dim)
        )
        in_size = t_size + sum(e.size for e in self.x_embs)
        if num_classes > 0:
            self.c_emb = nn.Embedding(num_classes + 1, emb_size)
            in_size += emb_size
        layers: list[nn.Module] = [nn.Linear(in_size, hidden_size), nn.GELU()]
        layers += [ResidualBlock(hidden_size) for _ in range(hidden_layers)]
        layers.append(nn.Linear(hidden_size, data_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        if self.time_embedding == "learnable":
            t_feat = self.t_emb(t)
        else:
            t_feat = self.t_emb(t.to(x.dtype) / self.num_timesteps)
        feats = [t_feat] + [emb(x[:, i]) for i, emb in enumerate(self.x_embs)]
        if self.num_classes > 0:
            if c is None:
                c = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            feats.append(self.c_emb(c))
        return self.net(torch.cat(feats, dim=-1))
