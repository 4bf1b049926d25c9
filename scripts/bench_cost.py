"""What each fine-tuning algorithm costs at the CLI's own defaults, side by side in one run: a table to plan by.

    python scripts/bench_cost.py [--datasets 8gaussians dino digits] [--epochs 4] [--out docs/benchmarks/cost.json]

For each data set, a pretrained model is made here (8gaussians and dino with `pretrain`'s defaults; digits with
20 steps, since speed, not quality, is measured: the U-Net and the chain are the defaults). Then every algorithm
runs as `rl-diffusion finetune --run PRETRAINED --algo A --epochs E --no-final-eval`, one fresh process each
(its peak resident set is its own), with no other flag: the CLI's reward (target_point) on points, and
digit_classifier (digit 3) on digits. Both are differentiable, so every algorithm runs.

Per run:
- seconds per epoch: the run's own perf/epoch_seconds (sampling, scoring, the path KL and the update; not the
  logging or checkpoints), the median over the epochs after the first, which warms up;
- seconds per 1,000 reward queries: the same over the samples the epoch scored (perf/reward_queries);
- peak resident MiB of the process (perf/peak_memory_mb; on a GPU the allocated peak);
- for the native algorithms on points, the share of the ceiling (rl_diffusion/algos/ceiling.py): one more
  epoch's matrix products replayed back to back, against the epoch's wall time (on images bench_rl.py's
  epoch split measures it for ddpo-is);
- the run's wall seconds, start to end, and its `error:` line if the run refused the defaults.

A run that takes longer than --timeout is stopped and reported as such. On images the stable-baselines3 agents
(an MLP policy over every pixel) are not run. Prints the markdown table, and writes it with the JSON to --out
after every run, with the machine, the thread count and the load average before and after; a second call with
fewer --datasets or --algos updates those entries and keeps the rest.
"""

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

import torch  # noqa: E402

from rl_diffusion.algos import NATIVE, SB3  # noqa: E402
from rl_diffusion.algos.ceiling import epoch_ceiling  # noqa: E402
from rl_diffusion.finetune import config_for  # noqa: E402

PRETRAIN_FLAGS = {"digits": ["--steps", "20", "--eval-every", "20", "--eval-samples", "16"]}
REWARD_FLAGS = {"digits": ["--reward", "digit_classifier", "--reward-arg", "digit=3"]}
CLI = "import sys; from rl_diffusion.cli import main; sys.exit(main(sys.argv[1:]))"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rl_diffusion(args: list[str], timeout: float) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def history(run: Path) -> list[dict]:
    newest = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    return torch.load(newest, weights_only=False, map_location="cpu")["train_state"]["history"]


def measure(pretrained: Path, dataset: str, algo: str, epochs: int, out: Path, timeout: float) -> dict:
    """One run of `algo` at the defaults, in its own process."""
    args = ["finetune", "--run", str(pretrained), "--out", str(out), "--algo", algo, "--epochs", str(epochs)]
    args += [*REWARD_FLAGS.get(dataset, []), "--no-final-eval", "--quiet"]
    started = time.perf_counter()
    done = rl_diffusion(args, timeout)
    wall = time.perf_counter() - started
    if done is None:
        return {"error": f"stopped after {timeout:.0f} s", "wall_seconds": wall}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1], "wall_seconds": wall}
    epochs_logged = history(out)
    after_first = epochs_logged[1:] or epochs_logged
    seconds = statistics.median(e["perf/epoch_seconds"] for e in after_first)
    queries = [b["perf/reward_queries"] - a["perf/reward_queries"] for a, b in itertools.pairwise(epochs_logged)]
    per_epoch_queries = statistics.median(queries) if queries else epochs_logged[0]["perf/reward_queries"]
    return {
        "epoch_seconds": seconds,
        "seconds_per_1000_queries": seconds / per_epoch_queries * 1000,
        "reward_queries_per_epoch": per_epoch_queries,
        "peak_memory_mib": max(e["perf/peak_memory_mb"] for e in epochs_logged),
        "wall_seconds": wall,
        "epochs": len(epochs_logged),
    }


def ceiling(pretrained: Path, dataset: str, algo: str, out: Path) -> dict:
    """The share of the ceiling of one epoch at the same defaults (native algorithms)."""
    flags = {"run": str(pretrained), "algo": algo}
    if dataset in REWARD_FLAGS:
        flags |= {"reward": "digit_classifier", "reward_args": {"digit": 3}}
    result = epoch_ceiling(config_for(flags), out, epochs=1)
    return {k: result[k] for k in ("fraction_of_attainable", "achieved_gflops", "attainable_gflops")}


def markdown(results: dict) -> str:
    lines = [
        "| data | algorithm | s / epoch | vs ddpo-is | s / 1,000 queries | peak MiB | ceiling share |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset, runs in results.items():
        base = runs.get("ddpo-is", {}).get("epoch_seconds")
        for algo, r in runs.items():
            if "error" in r:
                lines.append(f"| {dataset} | {algo} | {r['error']} | | | | |")
                continue
            ratio = f"{r['epoch_seconds'] / base:.1f}x" if base else ""
            share = f"{r['ceiling']['fraction_of_attainable']:.0%}" if "ceiling" in r else ""
            lines.append(
                f"| {dataset} | {algo} | {r['epoch_seconds']:.2f} | {ratio} | {r['seconds_per_1000_queries']:.3f} "
                f"| {r['peak_memory_mib']:.0f} | {share} |"
            )
    return "\n".join(lines)


def write(out: Path, results: dict, load_before: tuple) -> str:
    """The JSON report with its table, written after every run, so an interrupted call keeps what it measured."""
    table = markdown(results)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "load_average_1_5_15min_before": load_before,
        "load_average_1_5_15min_after": os.getloadavg(),
        "results": results,
        "table": table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["8gaussians", "dino", "digits"])
    parser.add_argument("--algos", nargs="+", default=[*NATIVE, *SB3])
    parser.add_argument("--image-algos", nargs="+", default=[*NATIVE, "sb3-ppo"])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run on points (the first warms up)")
    parser.add_argument("--image-epochs", type=int, default=2, help="epochs per run on images")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the ceiling share (three more epochs each)")
    parser.add_argument("--out", default="docs/benchmarks/cost.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    out = Path(args.out)
    # a run with fewer --datasets or --algos updates those entries of an existing --out and keeps the others
    results: dict[str, dict] = json.loads(out.read_text())["results"] if out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            pretrained = Path(tmp) / dataset
            log(f"pretraining {dataset} ...")
            done = rl_diffusion(
                ["pretrain", "--dataset", dataset, "--out", str(pretrained), "--quiet"]
                + PRETRAIN_FLAGS.get(dataset, []),
                timeout=3600,
            )
            if done is None or done.returncode != 0:
                sys.exit(f"pretraining {dataset} failed: {done.stderr if done else 'timed out'}")
            image = dataset in PRETRAIN_FLAGS
            epochs = args.image_epochs if image else args.epochs
            results.setdefault(dataset, {})
            for algo in args.image_algos if image else args.algos:
                log(f"{dataset}: {algo} ...")
                run = Path(tmp) / f"{dataset}-{algo}"
                r = measure(pretrained, dataset, algo, epochs, run, args.timeout)
                if "error" not in r and algo in NATIVE and not image and not args.no_ceiling:
                    r["ceiling"] = ceiling(pretrained, dataset, algo, Path(tmp) / f"{dataset}-{algo}-ceiling")
                results[dataset][algo] = r
                log(f"  {json.dumps(r)}")
                table = write(out, results, load_before)
    print(table)


if __name__ == "__main__":
    main()
