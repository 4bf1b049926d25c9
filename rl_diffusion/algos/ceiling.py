"""What one epoch of a native algorithm costs against the machine's ceiling: the epoch's collect and update
timed, then its matrix products and convolutions replayed back to back (rl_diffusion/flops.py). The benchmark
scripts (bench_rl.py, bench_cost.py) report it."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rl_diffusion.algos import algorithm, loop
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.flops import attainment, record_matmuls, replay_seconds
from rl_diffusion.run import setup


def epoch_ceiling(cfg: FinetuneConfig, out: Path, epochs: int) -> dict:
    """Achieved FLOP/s of the epoch's collect + update against the replay of its own products."""
    run = setup(cfg, out)
    algo = algorithm(cfg.algo)(run)
    generator = torch.Generator(device=run.device).manual_seed(cfg.seed)

    def epoch(k: int) -> None:
        algo.epoch = k  # the clock of exploration schedules and moving windows, as the loop keeps it
        batch, _ = loop.collect(run, algo, generator, k)
        algo.update(batch, generator)

    epoch(0)  # warm-up
    started = time.perf_counter()
    for k in range(1, epochs + 1):
        epoch(k)
    seconds = (time.perf_counter() - started) / epochs
    _, matmuls = record_matmuls(lambda: epoch(epochs + 1))
    products = replay_seconds(matmuls)
    run.writer.close()
    return {
        "epoch_seconds": seconds,
        **attainment(matmuls, seconds, products),
        "products_seconds_at_replay_speed": products,
    }
