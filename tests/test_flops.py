"""FLOP counting of the networks' products and their replay (rl_diffusion/flops.py). Nothing here is timed."""

import torch

from rl_diffusion.flops import record_matmuls, replay_seconds
from rl_diffusion.models import MLPEps, UNetEps


def mlp_training_flops(batch: int, layers: list[tuple[int, int]]) -> int:
    """A training step's products from the layer shapes: every Linear's forward (2 B in out) and weight gradient,
    and every input gradient but the first layer's (its input, the embeddings, needs none)."""
    forward = sum(2 * batch * fan_in * fan_out for fan_in, fan_out in layers)
    return 2 * forward + sum(2 * batch * fan_in * fan_out for fan_in, fan_out in layers[1:])


def test_the_mlp_training_step_counts_what_its_layer_shapes_say():
    model = MLPEps(data_dim=2, num_timesteps=20, hidden_size=16, hidden_layers=2, emb_size=8)
    x, t = torch.randn(32, 2), torch.randint(1, 21, (32,))
    _, matmuls = record_matmuls(lambda: model(x, t).square().mean().backward())
    layers = [(3 * 8, 16), (16, 16), (16, 16), (16, 2)]  # t and both coordinates embedded in 8 each
    assert matmuls.flops == mlp_training_flops(32, layers)
    # the two residual blocks' products have the same shapes: recorded once each, counted twice
    assert matmuls.calls == 4 + 4 + 3 and len(matmuls.counts) < matmuls.calls


def test_sampling_counts_one_forward_per_step():
    model = MLPEps(data_dim=2, num_timesteps=10, hidden_size=16, hidden_layers=1, emb_size=8)
    x, t = torch.randn(64, 2), torch.full((64,), 5)

    def chain():
        with torch.inference_mode():
            for _ in range(10):
                model(x, t)

    _, matmuls = record_matmuls(chain)
    assert matmuls.flops == 10 * 2 * 64 * (24 * 16 + 16 * 16 + 16 * 2)


def test_unet_convolutions_are_counted_forward_and_backward_and_replay():
    model = UNetEps(image_size=8, base_channels=8, channel_mults=(1, 2), num_timesteps=10)
    x, t = torch.randn(4, 1, 8, 8), torch.randint(1, 11, (4,))
    _, forward = record_matmuls(lambda: model(x, t))
    _, step = record_matmuls(lambda: model(x, t).square().mean().backward())
    kinds = {op.func.__name__.split(".")[0] for op in step.counts}
    assert "convolution" in kinds and "convolution_backward" in kinds
    assert 2 * forward.flops < step.flops <= 3 * forward.flops
    assert replay_seconds(step, min_seconds=0.0) > 0
