"""Reward throughput in process vs served from another process (rewards/remote.py), in samples per second.

    python scripts/bench_rewards.py [--out docs/benchmarks/rewards.json] [--seconds 3] [--threads 1]

For each reward, a 2D one (in_region on points [B, 2]) and the digit classifier (digit_classifier digit=3 on
8x8 grey images [B, 1, 8, 8], the digits data set's shape), and each batch size (256 and 4096), it scores
the same random batch over and over for --seconds after one warm-up call:

- in process: ``build_reward(name)(x0)``, the call a fine-tuning run makes;
- served: ``build_reward("http://127.0.0.1:PORT")(x0)`` against `rl-diffusion serve-reward NAME` started by
  this script in a subprocess on the loopback address, with the client's default chunk of 4096 samples (one
  request per batch here). Served time includes encoding, HTTP on loopback, decoding and the reward itself.

Both sides run torch with --threads threads (OMP_NUM_THREADS for the server). The JSON records the
machine and its load average, since other jobs on the machine slow every figure down.
"""

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import time
from pathlib import Path

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

import torch  # noqa: E402

from rewards import build_reward  # noqa: E402

REWARDS = {"in_region": ({}, (2,)), "digit_classifier": ({"digit": 3}, (1, 8, 8))}
BATCHES = (256, 4096)


def throughput(reward, x0: torch.Tensor, seconds: float) -> tuple[float, int]:
    """(samples per second, calls) of reward(x0) repeated for at least `seconds` after one warm-up call."""
    with torch.no_grad():
        reward(x0)
        calls, started = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - started < seconds:
            reward(x0)
            calls += 1
        return calls * len(x0) / (time.perf_counter() - started), calls


def start_server(name: str, kwargs: dict, threads: int) -> tuple[subprocess.Popen, str]:
    args = [f"--reward-arg={k}={json.dumps(v)}" for k, v in kwargs.items()]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rl_diffusion.cli", "serve-reward", name, *args, "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    if not ready:
        proc.kill()
        raise SystemExit(f"serve-reward {name} printed nothing within 120 s")
    return proc, proc.stdout.readline().split(" on ")[1].split()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks/rewards.json")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the client and of the server")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for name, (kwargs, shape) in REWARDS.items():
        local = build_reward(name, kwargs)
        proc, url = start_server(name, kwargs, args.threads)
        try:
            served = build_reward(url)
            for batch in BATCHES:
                x0 = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
                assert torch.equal(served(x0), local(x0)), f"{name}: served scores differ from in-process ones"
                in_process, calls_local = throughput(local, x0, args.seconds)
                remote, calls_served = throughput(served, x0, args.seconds)
                row = {
                    "reward": name,
                    "input_shape": [batch, *shape],
                    "batch": batch,
                    "in_process_samples_per_s": round(in_process),
                    "served_samples_per_s": round(remote),
                    "served_over_in_process": round(remote / in_process, 3),
                    "calls": [calls_local, calls_served],
                }
                rows.append(row)
                print(
                    f"{name:17s} batch {batch:5d}: in process {in_process:12,.0f} samples/s, served "
                    f"{remote:12,.0f} samples/s ({remote / in_process:.2f}x)",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {
        "rows": rows,
        "seconds_per_measurement": args.seconds,
        "torch_threads": args.threads,
        "client_chunk": 4096,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
