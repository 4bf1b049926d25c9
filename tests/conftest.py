"""Shared fixtures: tiny pretrained runs, each built once per test session (seconds on 2 CPU cores), and the
session's own cache for the digit classifier."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rl_diffusion.cli import main
from rl_diffusion.models.digit_classifier import CACHE_ENV, load_digit_classifier

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one thread each, inherited by the processes a test starts, since
    # OpenMP threads oversubscribing the cores spin against each other and slow small networks many times over
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY_PRETRAIN = [
    "--dataset",
    "moons",
    "--steps",
    "1500",
    "--num-timesteps",
    "20",
    "--hidden-size",
    "64",
    "--batch-size",
    "512",
    "--input-embedding",
    "identity",
    "--eval-every",
    "1500",
    "--eval-samples",
    "500",
    "--quiet",
]


@pytest.fixture(scope="session")
def pretrained_moons(tmp_path_factory) -> Path:
    """A small DDPM on `moons` (T = 20), trained through the real CLI."""
    out = tmp_path_factory.mktemp("runs") / "moons"
    assert main(["pretrain", "--out", str(out), *TINY_PRETRAIN]) == 0
    return out


DIGITS_STEPS = 200
TINY_DIGITS = [
    "--dataset",
    "digits",
    "--steps",
    str(DIGITS_STEPS),
    "--num-timesteps",
    "20",
    "--base-channels",
    "16",
    "--batch-size",
    "64",
    "--lr",
    "4e-3",
    "--warmup-steps",
    "30",
    "--ema-decay",
    "0.98",
    "--eval-every",
    str(DIGITS_STEPS),
    "--eval-samples",
    "64",
    "--checkpoint-every",
    str(DIGITS_STEPS),
    "--quiet",
]


@pytest.fixture(scope="session", autouse=True)
def digit_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$RL_DIFFUSION_CACHE at a fresh directory for the whole session: the digit classifier (image rewards, image
    metrics, the label-entropy monitor) is trained there once, on first use, and never in the home directory."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(CACHE_ENV, str(cache))
        yield cache


@pytest.fixture(scope="session")
def classifier(digit_cache: Path) -> torch.nn.Module:
    return load_digit_classifier()


@pytest.fixture(scope="session")
def digits_run(digit_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional DDPM on the digits (label dropout 0.1, so guidance works)."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["pretrain", "--out", str(out), *TINY_DIGITS]) == 0
    return out


@pytest.fixture(scope="session")
def unconditional_run(digit_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny unconditional DDPM on the digits: every digit comes out, about a tenth each."""
    out = tmp_path_factory.mktemp("runs") / "digits_unconditional"
    assert main(["pretrain", "--out", str(out), *TINY_DIGITS, "--no-class-conditional", "--no-final-eval"]) == 0
    return out
