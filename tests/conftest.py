"""Shared fixtures: one tiny pretrained run per test session (seconds on 2 CPU cores)."""

from pathlib import Path

import pytest

from rl_diffusion.cli import main

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
