"""`rl-diffusion evaluate`: the metrics of a run's samples, each next to its floor."""

from __future__ import annotations

from pathlib import Path

from pretrain.datasets import sample_2d
from pretrain.train import EVAL_DATA_SEED, draw_samples, resolve_device
from rl_diffusion.checkpoint import load_run
from rl_diffusion.metrics import sample_quality


def evaluate_run(run_dir: Path, num_samples: int = 5000, seed: int = 0, device: str = "cpu") -> dict:
    """Sample quality against the run's data set (sliced W2, MMD, energy distance with floors)."""
    device = resolve_device(device)
    run = load_run(run_dir, device)
    dataset = run.checkpoint["data"]["dataset"]
    samples = draw_samples(run.diffusion, run.model, num_samples, seed=seed, device=device)
    data = sample_2d(dataset, num_samples, EVAL_DATA_SEED)
    metrics = sample_quality(samples, data, sample_2d(dataset, num_samples, EVAL_DATA_SEED + 1))
    return {"run": str(run_dir), "kind": run.checkpoint["kind"], "dataset": dataset, "num_samples": num_samples, **metrics}
