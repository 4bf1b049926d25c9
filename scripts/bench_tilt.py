"""Known answers: every native fine-tuning algorithm against tilted targets whose samples are exact.

    python scripts/bench_tilt.py [--runs runs/bench_tilt] [--seeds 3] [--jobs 2] [--only gmm25_posterior]

Each target is a (data set, reward) pair whose KL-regularised optimum p_data(x) exp(r(x) / beta) / Z
`rl_diffusion.targets` samples exactly (a mixture tilted in closed form, or rejection sampling).
For each target: the default pretraining run on its data set; then, for each beta, algorithm and
seed, one fine-tuning run with the same budget of reward queries (chains x epochs), evaluated
(`metrics.json`) against the exact target. Writes docs/benchmarks/tilt.json (every run and the
mean and spread over seeds) and docs/figures/tilt.png (seed 0's samples over the exact target).
Resumable: a run whose metrics.json exists is read, not redone.

rwr has no KL weight: each epoch fits p_old exp(r / T), so after E epochs it aims at about
p_pre exp(E r / T). It runs with T = E beta, the temperature whose compounded tilt is the
target's; nothing holds it to the pretrained model, so that match is only nominal.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

from rl_diffusion import figures  # noqa: E402
from rl_diffusion.checkpoint import CheckpointManager  # noqa: E402
from rl_diffusion.targets import exact_target  # noqa: E402

TARGETS = {
    "gmm25_posterior": {"dataset": "gmm25", "reward": "gmm_posterior", "reward_args": {}},
    "8gaussians_linear": {"dataset": "8gaussians", "reward": "linear", "reward_args": {"a": [0.0, 1.0]}},
    "checkerboard_bump": {
        "dataset": "checkerboard",
        "reward": "gaussian_bump",
        "reward_args": {"center": [0.5, 0.5], "width": 0.5, "scale": 10.0},
    },
}
BETAS = (1.0, 0.5, 0.3, 0.1)
ALGOS = ("ddpo-sf", "ddpo-is", "rwr")
CHAINS, EPOCHS = 256, 40
SAMPLING = [
    "--sampler",
    "ddim",
    "--sampling-steps",
    "50",
    "--eta",
    "1",
]  # eta = 1: memoryless, so the optimum is reachable
# Per-run numbers kept in tilt.json, each averaged over seeds with its spread.
KEYS = (
    "target_sw2",
    "target_sw2_floor",
    "target_mmd",
    "target_mmd_floor",
    "target_mode_mass_l1",
    "target_mode_mass_l1_floor",
    "outside_mass",
    "target_outside_mass",
    "far_fraction",
    "reward_mean",
    "target_reward_mean",
    "kl_to_pretrained",
    "diversity",
    "train_seconds",
    "tilted_sw2",
    "tilted_sw2_floor",
)


def cli(args: list[str], threads: int) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}
    proc = subprocess.run([sys.executable, "-m", "rl_diffusion.cli", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"rl-diffusion {' '.join(args)}: {proc.stderr.strip().splitlines()[-1]}")
    return proc


def train_seconds(run: Path) -> float:
    """Seconds spent in epochs (sampling, reward, update, logging), from the run's per-epoch throughput."""
    history = CheckpointManager(run).load_latest()["train_state"]["history"]
    steps_per_epoch = CHAINS * 50
    return float(sum(steps_per_epoch / h["perf/steps_per_sec"] for h in history))


def finetune(pretrained: Path, out: Path, target: dict, algo: str, beta: float, seed: int, threads: int) -> dict:
    """One fine-tuning run (skipped when finished) and its metrics against the exact target."""
    if not (out / "metrics.json").exists():
        reward_args = [
            arg for k, v in target["reward_args"].items() for arg in ("--reward-arg", f"{k}={json.dumps(v)}")
        ]
        strength = ["--rwr-temperature", str(EPOCHS * beta)] if algo == "rwr" else ["--kl-coef", str(beta)]
        cli(
            [
                "finetune",
                "--run",
                str(pretrained),
                "--out",
                str(out),
                "--overwrite",
                "--algo",
                algo,
                "--reward",
                target["reward"],
                *reward_args,
                *strength,
                *SAMPLING,
                "--chains",
                str(CHAINS),
                "--epochs",
                str(EPOCHS),
                "--seed",
                str(seed),
                "--quiet",
            ],
            threads,
        )
    metrics_path = out / "metrics.json"
    if algo == "rwr":  # trained without a KL term: measured against the tilt at this beta
        metrics_path = out / f"metrics_beta{beta}.json"
        if not metrics_path.exists():
            metrics_path.write_text(cli(["evaluate", "--run", str(out), "--kl-coef", str(beta)], threads).stdout)
    metrics = json.loads(metrics_path.read_text())
    return {**{k: metrics.get(k) for k in KEYS if k != "train_seconds"}, "train_seconds": train_seconds(out)}


def summarise(runs: list[dict]) -> dict:
    """Mean and spread (standard deviation over seeds) of every number."""
    out = {}
    for key in KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/bench_tilt", help="where the run directories go")
    parser.add_argument("--out", default="docs/benchmarks/tilt.json")
    parser.add_argument("--figure", default="docs/figures/tilt.png")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, each in its own process")
    parser.add_argument("--only", default="", help="comma-separated target names (default: all)")
    args = parser.parse_args()
    runs, threads = Path(args.runs), max(1, (os.cpu_count() or 1) // args.jobs)
    only = set(filter(None, args.only.split(",")))
    results: dict = {
        "settings": {
            "chains": CHAINS,
            "epochs": EPOCHS,
            "reward_queries": CHAINS * EPOCHS,
            "sampling": " ".join(SAMPLING),
            "seeds": args.seeds,
            "threads_per_run": threads,
        },
        "targets": {},
    }
    rows = []
    for name, target in TARGETS.items():
        if only and name not in only:
            continue
        pretrained = runs / f"pretrained_{target['dataset']}"
        if not (pretrained / "metrics.json").exists():
            print(f"== pretraining {target['dataset']}", flush=True)
            cli(
                ["pretrain", "--dataset", target["dataset"], "--out", str(pretrained), "--overwrite", "--quiet"],
                os.cpu_count() or 1,
            )
        jobs = [(algo, beta, seed) for beta in BETAS for algo in ALGOS for seed in range(args.seeds)]
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            done = list(
                pool.map(
                    lambda j, pretrained=pretrained, name=name, target=target: finetune(
                        pretrained, runs / name / f"{j[0]}_beta{j[1]}_seed{j[2]}", target, *j, threads
                    ),
                    jobs,
                )
            )
        print(f"== {name}: {len(jobs)} runs in {time.perf_counter() - started:.0f} s", flush=True)
        table = {}
        for beta in BETAS:
            for algo in ALGOS:
                per_seed = [r for (a, b, _), r in zip(jobs, done, strict=True) if a == algo and b == beta]
                table[f"{algo} beta={beta}"] = summarise(per_seed)
                l1, sw2 = (
                    table[f"{algo} beta={beta}"].get("target_mode_mass_l1"),
                    table[f"{algo} beta={beta}"]["target_sw2"],
                )
                print(
                    f"  {algo:8s} beta={beta:<4} SW2 {sw2['mean']:.3f} +- {sw2['std']:.3f}"
                    + (f"  mode L1 {l1['mean']:.3f} +- {l1['std']:.3f}" if l1 else ""),
                    flush=True,
                )
        pre = json.loads((runs / name / "ddpo-is_beta1.0_seed0" / "metrics.json").read_text())
        results["targets"][name] = {
            **target,
            "yardstick": {
                k: pre.get(k)
                for k in (
                    "pretrained_data_sw2",
                    "pretrained_data_sw2_floor",
                    "pretrained_data_mmd",
                    "pretrained_data_mmd_floor",
                )
            },
            "pretrained": {k: pre.get(f"{k}_pretrained") for k in ("target_sw2", "target_mmd", "target_mode_mass_l1")},
            "runs": table,
        }
        # the figure: at beta = 1, seed 0's samples of each algorithm over the exact target
        exact = exact_target(target["dataset"], target["reward"], target["reward_args"], 1.0, 1000, seed=0)
        cells = [("pretrained", sample_of(runs / name / "ddpo-is_beta1.0_seed0", pretrained=True))]
        cells += [(algo, sample_of(runs / name / f"{algo}_beta1.0_seed0")) for algo in ALGOS]
        rows.append((f"{name}, beta = 1", [("exact target", exact.samples), *cells], exact.samples))
    results["markdown"] = "\n\n".join(markdown(name, r) for name, r in results["targets"].items())
    print(results["markdown"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    if rows:
        figures.plot_grid(rows, args.figure, title="samples (black) over the exact tilted target (grey)")
    print(f"wrote {args.out} and {args.figure}")
    return 0


def markdown(name: str, result: dict) -> str:
    """One README table per target: mean +- spread over seeds of the main numbers, by beta and algorithm."""

    def cell(stats: dict | None, spec: str = ".3f") -> str:
        return "-" if stats is None else f"{stats['mean']:{spec}} +- {stats['std']:{spec}}"

    runs = result["runs"]
    first = next(iter(runs.values()))
    modes = "target_mode_mass_l1" in first
    head = (
        ["beta", "algorithm", "SW2 (floor)", "MMD^2 (floor)"]
        + (["mode L1 (floor)", "outside modes"] if modes else [])
        + ["E[r] (optimum)", "path KL", "train s"]
    )
    lines = [
        f"**{name}** ({result['dataset']}, reward {result['reward']}): pretrained model SW2 "
        f"{result['pretrained']['target_sw2']:.3f}, MMD^2 {result['pretrained']['target_mmd']:.4f}"
        + (f", mode L1 {result['pretrained']['target_mode_mass_l1']:.3f}" if modes else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for label, r in runs.items():
        algo, beta = label.split(" beta=")
        row = [
            beta,
            algo,
            f"{cell(r['target_sw2'])} ({r['target_sw2_floor']['mean']:.3f})",
            f"{cell(r['target_mmd'], '.4f')} ({r['target_mmd_floor']['mean']:.4f})",
        ]
        if modes:
            row += [
                f"{cell(r['target_mode_mass_l1'])} ({r['target_mode_mass_l1_floor']['mean']:.3f})",
                cell(r.get("outside_mass")),
            ]
        row += [
            f"{cell(r['reward_mean'], '.2f')} ({r['target_reward_mean']['mean']:.2f})",
            cell(r.get("kl_to_pretrained"), ".2f"),
            f"{r['train_seconds']['mean']:.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sample_of(run: Path, pretrained: bool = False) -> np.ndarray:
    """1,000 samples of a fine-tuning run (or of the model it started from), DDIM as it was trained."""
    import torch

    from pretrain.train import draw_samples
    from rl_diffusion.checkpoint import load_run, read_run_config

    config = read_run_config(run)
    loaded = load_run(Path(config["run"]) if pretrained else run, torch.device("cpu"))
    return draw_samples(
        loaded.diffusion,
        loaded.model,
        1000,
        seed=0,
        device=torch.device("cpu"),
        sampler="ddim",
        sampling_steps=50,
        eta=1.0,
    )


if __name__ == "__main__":
    sys.exit(main())
