"""Built-in rewards for images x0 of shape [B, C, H, W] with pixel values in [-1, 1].

Values outside [-1, 1] are clipped first, as they are when an image is saved or shown: a
sampler cannot earn reward with pixels no one will see (so their gradient is 0). The condition
``c`` is ignored. A reward raises ValueError when x0 is not a batch of images it can score.
Brightness and the classifier rewards are ``@differentiable``; the JPEG sizes are not (an
encoder outside torch, on pixels rounded to 256 levels).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from rewards.base import RewardFn, differentiable, register
from rl_diffusion.models.digit_classifier import load_digit_classifier


def _check_images(x0: torch.Tensor) -> None:
    if x0.dim() != 4 or x0.shape[1] not in (1, 3):
        raise ValueError(
            f"this reward is for images: x0 must have shape [B, C, H, W] with C = 1 or 3, got {list(x0.shape)}"
        )


def _to_uint8(x0: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 numpy [B, H, W, C], rounded to the nearest level."""
    pixels = ((x0.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(x0: torch.Tensor, quality: int) -> torch.Tensor:
    """float32 [B] sizes in kB (1000 bytes) of each image saved as JPEG at ``quality``, on x0's device.

    The file includes the JPEG headers (about 0.3 kB for grey, 0.6 kB for RGB images), which
    dominate for tiny images: on 8x8 digits the whole range of sizes spans only tens of bytes.
    """
    _check_images(x0)
    sizes = []
    for pixels in _to_uint8(x0):  # the encoder takes one image at a time
        buffer = io.BytesIO()
        Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(
            buffer, format="JPEG", quality=quality
        )
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=x0.device)


def _check_quality(quality: int) -> None:
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer in 1..100 (PIL's JPEG quality), got {quality!r}")


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> RewardFn:
    """Minus the JPEG file size in kB: flat, smooth images score higher (Black et al. 2023).

    Args:
        quality: PIL JPEG quality 1..100; 95 as in DDPO. Lower quality shrinks every file and
            the differences between images.
    """
    _check_quality(quality)

    def reward(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return -jpeg_size_kb(x0, quality)

    return reward


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95) -> RewardFn:
    """The JPEG file size in kB: detailed, noisy images score higher (Black et al. 2023).

    Args:
        quality: PIL JPEG quality 1..100; 95 as in DDPO.
    """
    _check_quality(quality)

    def reward(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return jpeg_size_kb(x0, quality)

    return reward


@register("brightness")
@differentiable
def brightness() -> RewardFn:
    """Mean pixel value over pixels and channels, in [0, 1] (0 black, 1 white)."""

    def reward(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        _check_images(x0)
        return ((x0.clamp(-1, 1) + 1) / 2).mean(dim=(1, 2, 3))

    return reward


def _class_log_prob(model: nn.Module, classes: list[int], what: str) -> RewardFn:
    """reward(x0) = log sum_{k in classes} softmax(model(x0))[:, k], the log-probability that x0 is of one of
    `classes`; the model follows x0 to its device.

    Differentiable in x0: the model runs with autograd, in eval mode and frozen, so the gradient
    reaches x0 and none accumulates in the model's parameters.
    """
    model.eval()
    for parameter in model.parameters():  # ScriptModules have no requires_grad_
        parameter.requires_grad_(False)

    def reward(x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        _check_images(x0)
        logits = model.to(x0.device)(x0.clamp(-1, 1))
        if logits.dim() != 2 or logits.shape[0] != x0.shape[0]:
            raise ValueError(f"{what} returned shape {list(logits.shape)}, expected logits [B, num_classes]")
        if max(classes) >= logits.shape[1]:
            raise ValueError(f"class_index {max(classes)} is out of range: {what} has {logits.shape[1]} classes")
        return torch.logsumexp(torch.log_softmax(logits.float(), dim=1)[:, classes], dim=1)

    return reward


@register("digit_classifier")
@differentiable
def digit_classifier(digit: int | list[int] = 0) -> RewardFn:
    """Log-probability (nats, <= 0) that a grey digit image shows ``digit`` (or one of a list of digits), under a
    small CNN.

    The CNN (``rl_diffusion.models.digit_classifier``) is trained on scikit-learn's 8x8 digits the first
    time it is needed (a few seconds) and cached; images of any size are resized to 8x8.
    Pitfall: a classifier can be fooled; check samples by eye, not only this score.

    Args:
        digit: the class to reward, 0..9, or a list of them, e.g. [0, 2, 4, 6, 8]: log p(even | x), whose
            KL-regularised optimum at beta = 1 is the prior restricted to even digits (posterior sampling).
    """
    digits = digit if isinstance(digit, list) else [digit]
    if not digits or not all(isinstance(d, int) and 0 <= d <= 9 for d in digits) or len(set(digits)) < len(digits):
        raise ValueError(f"digit must be an integer 0..9 or a list of distinct ones, got {digit!r}")
    return _class_log_prob(load_digit_classifier(), digits, "the digit classifier")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a constants.pkl; torch.save archives have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


@register("classifier")
@differentiable
def classifier(checkpoint: str, class_index: int = 0) -> RewardFn:
    """Log-probability (nats, <= 0) of class ``class_index`` under your own torch classifier.

    The checkpoint is a whole module saved with ``torch.save(model, path)`` or a TorchScript
    file (``torch.jit.save``); it maps images [B, C, H, W] in [-1, 1] to logits [B, K] and is
    run in eval mode with its parameters frozen; the reward is differentiable when the model is
    (no torch.no_grad or detach inside). Pitfall: unpickling a ``torch.save`` file runs code
    from it and needs the model's class importable; load only files you trust, or prefer
    TorchScript, which needs neither.

    Args:
        checkpoint: path of the saved classifier.
        class_index: the class to reward, 0..K-1.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ValueError(f"classifier checkpoint {path} does not exist")
    if not isinstance(class_index, int) or class_index < 0:
        raise ValueError(f"class_index must be a non-negative integer, got {class_index!r}")
    try:
        model = (
            torch.jit.load(str(path), map_location="cpu")
            if _is_torchscript(path)
            else torch.load(path, map_location="cpu", weights_only=False)
        )
    except Exception as e:  # unpickling can fail in any way (missing class, foreign file)
        raise ValueError(f"cannot load classifier {path}: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{path} holds an object of type {type(model).__name__}, not a model; save the whole "
            f"module with torch.save(model, path) or torch.jit.save(torch.jit.script(model), path)"
        )
    return _class_log_prob(model, [class_index], f"classifier {path}")
