"""Low-rank adapters (Hu et al. 2021, "LoRA"): fine-tune W x + (alpha / r) B A x with W frozen.

Written here rather than taken from peft: it is a few dozen lines, adds no dependency, and works on
any network built of nn.Linear and nn.Conv2d, so the MLP, the native U-Net and a diffusers
UNet2DModel alike. Each such layer is replaced in place by a `LoRA` layer holding the frozen layer
and two small ones: A, a layer of the same kind into r channels (default init, kaiming uniform),
and B, a 1x1 map back to the layer's outputs, initialised to zero, so that the adapted network is
exactly the pretrained one at the start. Every other parameter (norms, embeddings) stays frozen.

With the adapters disabled the adapted network IS the pretrained one: `Pretrained` calls it so, and
serves as the frozen reference of the path KL without a second copy of the weights in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

ADAPTED = (nn.Linear, nn.Conv2d)


class LoRA(nn.Module):
    """base(x) + (alpha / rank) B(A(x)), with `base` frozen and only A and B trained."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.enabled = True
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        else:  # A sees what the base kernel sees (same size, stride, padding); B mixes the r channels only
            self.lora_A = nn.Conv2d(
                base.in_channels,
                rank,
                base.kernel_size,
                base.stride,
                base.padding,
                base.dilation,
                bias=False,
                padding_mode=base.padding_mode,
                **factory,
            )
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        return self.base(x) + self.scale * self.lora_B(self.lora_A(x))

    def delta_weight(self) -> Tensor:
        """(alpha / rank) B A in the base weight's shape: [out, r] @ [r, in * kernel]."""
        update = self.lora_B.weight.flatten(1) @ self.lora_A.weight.flatten(1)
        return self.scale * update.reshape(self.base.weight.shape)


def adapt(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Freeze `model` and replace each of its nn.Linear and (ungrouped) nn.Conv2d layers, in place, by a
    LoRA layer of that rank and alpha; returns `model`, whose only trainable parameters are the adapters.
    A draws its initial weights from torch's global RNG."""
    model.requires_grad_(False)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, ADAPTED) and getattr(child, "groups", 1) == 1:
                setattr(parent, name, LoRA(child, rank, alpha))
    return model


def layers(model: nn.Module) -> Iterator[LoRA]:
    return (m for m in model.modules() if isinstance(m, LoRA))


@contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """`model` with every adapter switched off: the pretrained network."""
    adapted = list(layers(model))
    for layer in adapted:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in adapted:
            layer.enabled = True


class Pretrained(nn.Module):
    """The pretrained network inside an adapted one: its forward with the adapters disabled.

    The adapted network is kept outside the module tree, so this module has no parameters of its own
    and an optimizer or a state dict never sees the shared weights twice."""

    def __init__(self, adapted: nn.Module):
        super().__init__()
        object.__setattr__(self, "adapted", adapted)

    def forward(self, *args, **kwargs) -> Tensor:
        with disabled(self.adapted):
            return self.adapted(*args, **kwargs)


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' weights (A and B of every LoRA layer) from model's state dict: what a checkpoint keeps."""
    return {name: value for name, value in model.state_dict().items() if ".lora_" in name}


def load_adapters(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter weights saved by `adapter_state` into an adapted model; the frozen weights stay."""
    expected = adapter_state(model)
    if state.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        raise ValueError(f"adapters do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict({**model.state_dict(), **state})


@torch.no_grad()
def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer (W <- W + (alpha / rank) B A) and put the base layer back in
    its place; returns `model`, now an ordinary network of the pretrained architecture."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, LoRA):
                child.base.weight += child.delta_weight()
                setattr(parent, name, child.base)
    return model


def trainable_fraction(model: nn.Module) -> float:
    """Trainable parameters over all parameters of `model`."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / total


def fingerprint(model: nn.Module) -> str:
    """A digest of model's weights: a LoRA checkpoint records its base's, so that adapters are never
    loaded onto weights that changed since (a pretraining run resumed past the one they were trained on)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
