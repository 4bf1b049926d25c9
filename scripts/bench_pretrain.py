"""Pretraining benchmark on dino: time to match the data, and sampling throughput.

    python scripts/bench_pretrain.py [--out docs/benchmarks/pretrain.json]

Runs the default `rl-diffusion pretrain` on dino, evaluating every 250 steps with
5,000 samples against 5,000 data points (sliced Wasserstein-2, 500 projections,
projection seed 0), and reports the first evaluation whose SW2 is within 1.25x of
the floor (data vs an independent draw of the data), with the wall time up to it.
Then it times DDPM sampling of 5,000 samples at 50 and 1,000 steps.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

import torch  # noqa: E402

from pretrain.data import load_training_data  # noqa: E402
from pretrain.datasets import data_spread, sample_2d  # noqa: E402
from pretrain.train import EVAL_DATA_SEED, PretrainConfig, pretrain  # noqa: E402
from rl_diffusion.ablate import scalars  # noqa: E402
from rl_diffusion.diffusion import GaussianDiffusion  # noqa: E402
from rl_diffusion.metrics import sliced_wasserstein2  # noqa: E402
from rl_diffusion.models import build_model  # noqa: E402

N = 5000


def sampling_throughput(config: PretrainConfig, num_timesteps: int, device: str) -> float:
    """Samples per second of DDPM sampling with the default network at T = num_timesteps."""
    data = load_training_data(config.dataset, config.seed)
    model = build_model({**config.model_config(data), "num_timesteps": num_timesteps}).to(device).eval()
    diffusion = GaussianDiffusion(config.beta_schedule, num_timesteps)
    with torch.inference_mode():
        diffusion.sample(model, (256, 2), device=device)  # warm-up
        started = time.perf_counter()
        diffusion.sample(model, (N, 2), device=device)
    return N / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks/pretrain.json")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    config = PretrainConfig(dataset="dino", eval_every=250, eval_samples=N, device=args.device)
    data = sample_2d("dino", N, EVAL_DATA_SEED)
    spread = data_spread(data)
    floor = sliced_wasserstein2(data, sample_2d("dino", N, EVAL_DATA_SEED + 1))
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "dino"
        started = time.perf_counter()
        pretrain(config, run, progress=False)
        total_seconds = time.perf_counter() - started
        sw2, wall, train = (
            dict(zip(*scalars(run, tag), strict=True))
            for tag in ("eval/sw2", "perf/wall_seconds", "perf/train_seconds")
        )
        final = json.loads((run / "metrics.json").read_text())
    reached = [step for step in sorted(sw2) if sw2[step] <= 1.25 * floor]
    first = reached[0] if reached else None
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, device {args.device}",
        "config": {
            k: getattr(config, k)
            for k in ("steps", "batch_size", "lr", "num_timesteps", "beta_schedule", "hidden_size", "hidden_layers")
        },
        "spread": spread,
        "sw2_floor": floor,
        "sw2_floor_over_spread": floor / spread,
        "curve": [
            {
                "step": s,
                "sw2_over_spread": sw2[s] / spread,
                "ratio_to_floor": sw2[s] / floor,
                "wall_seconds": wall[s],
                "train_seconds": train[s],
            }
            for s in sorted(sw2)
        ],
        "target": "sw2 <= 1.25 x floor",
        "reached_at_step": first,
        "wall_seconds_to_target": wall[first] if first else None,
        "train_seconds_to_target": train[first] if first else None,
        "final_sw2_over_spread": final["sw2_over_spread"],
        "run_total_seconds_with_figures": total_seconds,
        "sampling_samples_per_sec": {f"T={T}": sampling_throughput(config, T, args.device) for T in (50, 1000)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
