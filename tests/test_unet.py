"""The image U-Net: shapes, class conditioning, classifier-free guidance, label dropout."""

from __future__ import annotations

import json

import pytest
import torch

from rl_diffusion.models.unet import UNetEps, drop_labels, guided_eps


def _randomized(model: UNetEps, seed: int = 0) -> UNetEps:
    """The model with every parameter jittered: the zero output conv would hide all differences."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _inputs(batch: int, channels: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=generator)
    t = torch.randint(1, 101, (batch,), generator=generator)
    c = torch.randint(0, 10, (batch,), generator=generator)
    return x, t, c


@pytest.mark.parametrize("size,mults", [(8, (1, 2)), (16, (1, 2, 2)), (32, (1, 2, 2))])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_output_shape_and_zero_init(size: int, mults: tuple[int, ...], channels: int, num_classes: int) -> None:
    model = UNetEps(
        size, in_channels=channels, base_channels=8, channel_mults=mults, attention=size == 16, num_classes=num_classes
    )
    x, t, c = _inputs(3, channels, size)
    eps = model(x, t, c if num_classes else None)
    assert eps.shape == (3, channels, size, size)
    # The zero-initialised output conv makes the untrained prediction exactly 0.
    assert torch.count_nonzero(eps) == 0


def test_rebuilds_from_json_and_runs_other_divisible_sizes() -> None:
    kwargs = json.loads(
        json.dumps(
            {
                "image_size": 8,
                "base_channels": 8,
                "channel_mults": [1, 2, 2],
                "attention": True,
                "num_classes": 10,
                "dropout": 0.1,
            }
        )
    )
    model = _randomized(UNetEps(**kwargs))
    x, t, c = _inputs(2, 1, 12)
    assert model(x, t, c).shape == (2, 1, 12, 12)
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.zeros(2, 1, 10, 10), t, c)
    with pytest.raises(ValueError, match="image_size 10 must be a positive multiple of 4"):
        UNetEps(10, channel_mults=(1, 2, 2))


def test_time_and_class_change_the_prediction_and_none_means_null_label() -> None:
    model = _randomized(UNetEps(8, base_channels=8, num_classes=10))
    x, t, c = _inputs(4, 1, 8)
    eps = model(x, t, c)
    assert not torch.allclose(eps, model(x, t, (c + 1) % 10), atol=1e-4)
    assert not torch.allclose(eps, model(x, t % 100 + 1, c), atol=1e-4)
    assert torch.equal(model(x, t, None), model(x, t, torch.full_like(c, 10)))


def test_guidance_scale_0_is_unconditional_1_conditional_and_extrapolates_in_one_call() -> None:
    model = _randomized(UNetEps(8, base_channels=8, num_classes=10))
    x, t, c = _inputs(5, 1, 8)
    eps_cond, eps_uncond = model(x, t, c), model(x, t, None)
    assert not torch.allclose(eps_cond, eps_uncond, atol=1e-4)
    assert torch.equal(guided_eps(model, x, t, c, 0.0), eps_uncond)
    assert torch.equal(guided_eps(model, x, t, c, 1.0), eps_cond)
    batch_sizes: list[int] = []
    model.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    guided = guided_eps(model, x, t, c, 3.0)
    assert batch_sizes == [10]  # one call on [x; x]
    torch.testing.assert_close(guided, eps_uncond + 3.0 * (eps_cond - eps_uncond), atol=1e-5, rtol=1e-5)
    # Without labels both halves would be the same prediction: any scale gives it.
    assert torch.equal(guided_eps(model, x, t, None, 3.0), eps_uncond)


def test_drop_labels_rate_and_kept_labels() -> None:
    c = torch.arange(200_000) % 10
    generator = torch.Generator().manual_seed(0)
    dropped = drop_labels(c, 10, 0.2, generator)
    null = dropped == 10
    assert null.float().mean().item() == pytest.approx(0.2, abs=0.005)  # binomial std 0.0009
    assert torch.equal(dropped[~null], c[~null])
    assert torch.equal(drop_labels(c, 10, 0.0), c)
    assert bool((drop_labels(c, 10, 1.0) == 10).all())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        drop_labels(c, 10, 1.5)


def test_a_few_steps_fit_a_batch() -> None:
    torch.manual_seed(0)
    model = UNetEps(8, base_channels=8, num_classes=10)
    x, t, c = _inputs(8, 1, 8)
    noise = torch.randn_like(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = (model(x, t, c) - noise).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(noise.square().mean().item())  # eps = 0 at init
    assert losses[-1] < 0.5 * losses[0]
