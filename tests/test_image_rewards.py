"""Image rewards: JPEG size, brightness, the cached digit classifier, user classifiers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

import rewards.builtin_images  # registers the image rewards
from pretrain.images import load_digits_images
from rewards import RewardError, build_reward
from rl_diffusion.errors import UserError
from rl_diffusion.models.digit_classifier import (
    CACHE_ENV,
    CACHE_FILE,
    DigitCNN,
    accuracy,
    load_digit_classifier,
    split_digits,
)


class TinyClassifier(nn.Module):
    """Logits [B, 3] from per-channel means: module level, so torch.save(model) can pickle it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(1, 2, 3))[:, None])


def _noise(batch: int, channels: int, size: int) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("channels,size,header_kb", [(1, 8, 0.33), (3, 16, 0.63)])
def test_jpeg_rewards_prefer_flat_or_noisy_images(channels: int, size: int, header_kb: float) -> None:
    x0 = torch.cat([torch.zeros(1, channels, size, size), _noise(1, channels, size)])
    compressible = build_reward("jpeg_compressibility")(x0)
    assert compressible[0] > compressible[1]
    # Sizes in kB: a flat image is little more than its headers.
    assert -compressible[0].item() == pytest.approx(header_kb, abs=0.03)
    assert torch.equal(build_reward("jpeg_incompressibility")(x0), -compressible)
    lower_quality = build_reward("jpeg_incompressibility", {"quality": 30})(x0)
    assert lower_quality[1] < -compressible[1]
    with pytest.raises(UserError, match="quality must be an integer in 1..100"):
        build_reward("jpeg_compressibility", {"quality": 0})


def test_brightness_in_unit_range_and_clipped() -> None:
    r = build_reward("brightness")
    x0 = torch.stack(
        [
            torch.ones(3, 4, 4),
            -torch.ones(3, 4, 4),
            torch.full((3, 4, 4), 3.0),
            torch.cat([torch.ones(3, 2, 4), -torch.ones(3, 2, 4)], dim=1),
        ]
    )
    assert r(x0).tolist() == [1.0, 0.0, 1.0, 0.5]
    with pytest.raises(RewardError, match="reward 'brightness' raised ValueError: .*\\[B, C, H, W\\]"):
        r(torch.zeros(4, 2))


@pytest.fixture(scope="module")
def digit_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache directory, named by the environment variable, where the classifier is trained once."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(CACHE_ENV, str(cache))
        start = time.perf_counter()
        load_digit_classifier()
        print(f"digit classifier trained in {time.perf_counter() - start:.1f} s")
        yield cache


def test_digit_classifier_is_cached_and_accurate_on_held_out_digits(digit_cache: Path) -> None:
    assert (digit_cache / CACHE_FILE).is_file()
    model = load_digit_classifier()  # now loaded from the file
    _, _, held_x, held_y = split_digits(seed=0)
    held_out = accuracy(model, held_x, held_y)
    print(f"held-out accuracy {held_out:.4f}")
    assert held_out > 0.9
    assert model.held_out_accuracy.item() == pytest.approx(held_out)
    # 16x16 digits (bilinear upsamples, blurred by the round trip) are resized back inside the model.
    big, labels = load_digits_images(16)
    assert accuracy(model, torch.from_numpy(big), torch.from_numpy(labels)) > 0.85


def test_digit_reward_ranks_each_class_first(digit_cache: Path) -> None:
    _, _, held_x, held_y = split_digits(seed=0)
    # mean_log_prob[k, j]: mean reward for digit=k over held-out images of class j.
    mean_log_prob = torch.stack(
        [
            torch.stack([build_reward("digit_classifier", {"digit": k})(held_x[held_y == j]).mean() for j in range(10)])
            for k in range(10)
        ]
    )
    assert bool((mean_log_prob <= 0).all())
    assert mean_log_prob.argmax(dim=1).tolist() == list(range(10))
    off_diagonal = mean_log_prob[~torch.eye(10, dtype=torch.bool)].view(10, 9).mean(dim=1)
    assert bool((mean_log_prob.diagonal() > off_diagonal + 2.0).all())  # nats
    with pytest.raises(UserError, match="digit must be an integer 0..9"):
        build_reward("digit_classifier", {"digit": 10})
    # a set of digits: log of the summed probabilities, here by a second path (exp of each single-digit reward)
    even = build_reward("digit_classifier", {"digit": [0, 2, 4, 6, 8]})(held_x)
    singles = torch.stack([build_reward("digit_classifier", {"digit": k})(held_x) for k in (0, 2, 4, 6, 8)])
    assert torch.allclose(even, singles.exp().sum(dim=0).log(), atol=1e-5)
    assert (even[held_y % 2 == 0].mean() > -0.1) and (even[held_y % 2 == 1].mean() < -2.0)
    with pytest.raises(UserError, match="list of distinct ones"):
        build_reward("digit_classifier", {"digit": [2, 2]})


def test_damaged_cache_is_reported_with_its_path(tmp_path: Path) -> None:
    (tmp_path / CACHE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=f"{tmp_path / CACHE_FILE}.*delete it"):
        load_digit_classifier(tmp_path)


def test_features_for_metrics() -> None:
    feats = DigitCNN().features(torch.zeros(5, 1, 16, 16))
    assert feats.shape == (5, 64) and bool((feats >= 0).all())


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("script", [False, True])
def test_classifier_reward_loads_saved_module_or_torchscript(tmp_path: Path, script: bool) -> None:
    torch.manual_seed(0)
    model = TinyClassifier().eval()
    path = tmp_path / "clf.pt"
    if script:
        torch.jit.save(torch.jit.script(model), str(path))
    else:
        torch.save(model, path)
    x0 = _noise(6, 3, 8)
    r = build_reward("classifier", {"checkpoint": str(path), "class_index": 2})
    with torch.no_grad():
        expected = torch.log_softmax(model(x0), dim=1)[:, 2]
    torch.testing.assert_close(r(x0), expected)
    too_far = build_reward("classifier", {"checkpoint": str(path), "class_index": 3})
    with pytest.raises(RewardError, match="class_index 3 is out of range: .* has 3 classes"):
        too_far(x0)


def test_classifier_reward_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError, match=f"reward 'classifier': classifier checkpoint {missing} does not exist"):
        build_reward("classifier", {"checkpoint": str(missing)})
    torch.save(TinyClassifier().state_dict(), tmp_path / "weights.pt")
    with pytest.raises(UserError, match="holds an object of type OrderedDict, not a model"):
        build_reward("classifier", {"checkpoint": str(tmp_path / "weights.pt")})


# Gradients d r / d x0, for fine-tuning through the reward.


def test_brightness_gradient_matches_central_differences() -> None:
    r = build_reward("brightness")
    x0 = _noise(3, 3, 4).double() * 1.2  # some pixels beyond [-1, 1], clipped, so gradient 0 there
    _, grad = r.gradient(x0)
    h = 1e-6
    steps = torch.eye(x0[0].numel(), dtype=torch.float64).view(-1, *x0.shape[1:]) * h
    fd = torch.stack([(r.fn(x + steps, None) - r.fn(x - steps, None)) / (2 * h) for x in x0]).view_as(x0)
    torch.testing.assert_close(grad, fd, atol=1e-8, rtol=1e-6)
    inside = x0.abs() < 1
    assert bool((grad[inside] == 1 / (2 * 3 * 4 * 4)).all()) and bool((grad[~inside] == 0).all())


def test_classifier_gradient_is_the_closed_form(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TinyClassifier().double()
    path = tmp_path / "clf.pt"
    torch.save(model, path)
    r = build_reward("classifier", {"checkpoint": str(path), "class_index": 1})
    x0 = _noise(4, 3, 4).double() * 0.9
    _, grad = r.gradient(x0)
    # r = log_softmax(w m + b)_1 with m the image's mean, so every pixel gets (w_1 - E_softmax[w]) / (C H W).
    w = model.linear.weight[:, 0].detach()
    probs = torch.softmax(model(x0).detach(), dim=1)
    expected = (w[1] - probs @ w) / x0[0].numel()
    assert bool((expected.abs() > 1e-4).all())
    torch.testing.assert_close(grad, expected[:, None, None, None].expand_as(x0), atol=1e-9, rtol=1e-5)


def test_digit_gradient_matches_differences_and_leaves_classifier_frozen(
    digit_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []

    def load() -> DigitCNN:
        built.append(load_digit_classifier())
        return built[0]

    monkeypatch.setattr(rewards.builtin_images, "load_digit_classifier", load)
    r = build_reward("digit_classifier", {"digit": 3})
    _, _, held_x, held_y = split_digits(seed=0)
    # Eights, which the classifier finds somewhat like threes, so the gradient is large; shrunk off
    # the clipping bounds, where the gradient jumps to 0, and jittered off the ties of max-pooling.
    eights = held_x[held_y == 8][:4]
    x0 = 0.9 * eights + 0.05 * torch.randn(eights.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # as in a sampling loop
        values, grad = r.gradient(x0)
    assert grad.shape == x0.shape and bool(torch.isfinite(grad).all())
    # The classifier is float32 and piecewise linear (ReLU, max-pooling): compare directional
    # derivatives along random unit directions, with a step small against the kinks.
    h = 1e-3
    directions = torch.randn((3, *x0.shape), generator=torch.Generator().manual_seed(1))
    directions /= directions.flatten(2).norm(dim=2)[:, :, None, None, None]
    for v in directions:
        along = (grad * v).sum(dim=(1, 2, 3))
        assert along.abs().min() > 1e-2
        torch.testing.assert_close(along, (r(x0 + h * v) - r(x0 - h * v)) / (2 * h), atol=2e-3, rtol=5e-2)
    # Gradient ascent on the score raises it: the gradient is useful, not only correct.
    assert bool((r(x0 + 0.05 * grad / grad.flatten(1).norm(dim=1)[:, None, None, None]) > values).all())
    (model,) = built
    assert not model.training
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
