"""Known answers: every native fine-tuning algorithm raced on tilted targets whose samples are exact.

    python scripts/bench_tilt.py [--runs runs/bench_tilt] [--seeds 3] [--jobs 2] [--only gmm25_posterior]

Each target is a (data set, reward) pair whose KL-regularised optimum p_data(x) exp(r(x) / beta) / Z
`rl_diffusion.targets` samples exactly (a mixture tilted in closed form, or rejection sampling).
For each target: the default pretraining run on its data set; then three passes of fine-tuning
runs, each evaluated (`metrics.json`) against the exact target:
  - matched reward queries: every algorithm, beta and seed with the same chains x epochs;
  - matched wall time (beta = 1): every algorithm for the epochs that take it as long as ddpo-is's
    run took (its seconds per epoch measured in the first pass);
  - half the queries (beta = 1): adjoint and rtb with half of ddpo-is's reward queries.
Writes docs/benchmarks/tilt.json (every run, the mean and spread over seeds) and one figure per
target, docs/figures/tilt_<target>.png (seed 0's samples at beta = 1 over the exact target).
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
BETAS = (1.0, 0.3, 0.1)
ALGOS = ("ddpo-sf", "ddpo-is", "rwr", "awm", "adjoint", "rtb", "draft")
# each algorithm's own settings (the rest are the CLI's defaults)
ALGO_FLAGS: dict[str, list[str]] = {
    "ddpo-sf": [],
    "ddpo-is": [],
    "rwr": [],
    "awm": [],
    "adjoint": [],
    "rtb": ["--lr", "3e-3", "--log-z-lr", "0.3", "--explore-scale", "1.5", "--replay-size", "1024"],
    "draft": [],
}
REFERENCE = "ddpo-is"  # the algorithm whose wall time and reward queries the other passes are matched to
FAST = ("adjoint", "rtb")  # run again with half the reference's reward queries
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
    "peak_memory_mb",
    "epochs",
    "tilted_sw2",
    "tilted_sw2_floor",
)


def cli(args: list[str], threads: int) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}
    proc = subprocess.run([sys.executable, "-m", "rl_diffusion.cli", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"rl-diffusion {' '.join(args)}: {proc.stderr.strip().splitlines()[-1]}")
    return proc


def training_record(run: Path) -> dict:
    """Seconds spent in epochs (sampling, reward, update, logging), peak memory and epochs, from the run's history."""
    history = CheckpointManager(run).load_latest()["train_state"]["history"]
    return {
        "train_seconds": float(sum(h["perf/epoch_seconds"] for h in history)),
        "peak_memory_mb": history[-1]["perf/peak_memory_mb"],
        "epochs": len(history),
    }


def finetune(
    pretrained: Path, out: Path, target: dict, algo: str, beta: float, seed: int, threads: int, epochs: int = EPOCHS
) -> dict:
    """One fine-tuning run (skipped when finished) and its metrics against the exact target."""
    if not (out / "metrics.json").exists():
        reward_args = [
            arg for k, v in target["reward_args"].items() for arg in ("--reward-arg", f"{k}={json.dumps(v)}")
        ]
        strength = ["--rwr-temperature", str(epochs * beta)] if algo == "rwr" else ["--kl-coef", str(beta)]
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
                *ALGO_FLAGS[algo],
                "--chains",
                str(CHAINS),
                "--epochs",
                str(epochs),
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
    return {**{k: metrics.get(k) for k in KEYS}, **training_record(out)}


def summarise(runs: list[dict]) -> dict:
    """Mean and spread (standard deviation over seeds) of every number."""
    out = {}
    for key in KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    return out


def run_pass(pool, jobs: list[tuple], run) -> list[dict]:
    """Every job of a pass, `jobs` at a time; their results in order."""
    return list(pool.map(lambda job: run(*job), jobs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/bench_tilt", help="where the run directories go")
    parser.add_argument("--out", default="docs/benchmarks/tilt.json")
    parser.add_argument("--figures", default="docs/figures", help="folder of the tilt_<target>.png figures")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, each in its own process")
    parser.add_argument("--only", default="", help="comma-separated target names (default: all)")
    parser.add_argument("--betas", default=",".join(map(str, BETAS)), help="comma-separated betas of the first pass")
    parser.add_argument("--no-matched", action="store_true", help="skip the matched-time and half-query passes")
    args = parser.parse_args()
    betas = [float(b) for b in args.betas.split(",")]
    runs, threads = Path(args.runs), max(1, (os.cpu_count() or 1) // args.jobs)
    only = set(filter(None, args.only.split(",")))
    results: dict = {
        "settings": {
            "chains": CHAINS,
            "epochs": EPOCHS,
            "reward_queries": CHAINS * EPOCHS,
            "sampling": " ".join(SAMPLING),
            "algorithm_flags": ALGO_FLAGS,
            "seeds": args.seeds,
            "threads_per_run": threads,
        },
        "targets": {},
    }
    seeds = range(args.seeds)
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

        def run(algo, beta, seed, epochs=EPOCHS, suffix="", pretrained=pretrained, name=name, target=target):
            out = runs / name / f"{algo}_beta{beta}_seed{seed}{suffix}"
            return finetune(pretrained, out, target, algo, beta, seed, threads, epochs)

        started = time.perf_counter()
        table: dict[str, dict] = {}
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            jobs = [(algo, beta, seed) for beta in betas for algo in ALGOS for seed in seeds]
            done = run_pass(pool, jobs, run)
            for beta in betas:
                for algo in ALGOS:
                    per_seed = [r for (a, b, _), r in zip(jobs, done, strict=True) if a == algo and b == beta]
                    table[f"{algo} beta={beta}"] = summarise(per_seed)
            # matched wall time at beta = 1: each algorithm's epochs scaled by the reference's seconds over its own
            seconds = {algo: table[f"{algo} beta=1.0"]["train_seconds"]["mean"] for algo in ALGOS}
            epochs = {algo: max(1, round(EPOCHS * seconds[REFERENCE] / seconds[algo])) for algo in ALGOS}
            timed = [(algo, 1.0, seed, epochs[algo], "_time") for algo in ALGOS if algo != REFERENCE for seed in seeds]
            half = [(algo, 1.0, seed, EPOCHS // 2, "_half") for algo in FAST for seed in seeds]
            if args.no_matched:
                timed, half = [], []
            done = run_pass(pool, timed + half, run)
            for algo in ALGOS:
                per_seed = [r for job, r in zip(timed, done, strict=False) if job[0] == algo]
                if per_seed:
                    table[f"{algo} beta=1.0 matched time"] = summarise(per_seed)
            for algo in FAST if half else ():
                per_seed = [
                    r for job, r in zip(timed + half, done, strict=True) if job[4] == "_half" and job[0] == algo
                ]
                table[f"{algo} beta=1.0 half queries"] = summarise(per_seed)
        print(f"== {name}: {len(jobs) + len(timed) + len(half)} runs in {time.perf_counter() - started:.0f} s")
        pre = json.loads((runs / name / f"{REFERENCE}_beta1.0_seed0" / "metrics.json").read_text())
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
        print(markdown(name, results["targets"][name]), flush=True)
        # the figure: at beta = 1, seed 0's samples of each algorithm over the exact target
        exact = exact_target(target["dataset"], target["reward"], target["reward_args"], 1.0, 1000, seed=0)
        cells = [("pretrained", sample_of(runs / name / f"{REFERENCE}_beta1.0_seed0", pretrained=True))]
        cells += [(algo, sample_of(runs / name / f"{algo}_beta1.0_seed0")) for algo in ALGOS]
        figure = Path(args.figures) / f"tilt_{name}.png"
        row = [(f"{name}, beta = 1", [("exact target", exact.samples), *cells], exact.samples)]
        figures.plot_grid(row, figure, title="samples (blue) over the exact tilted target (grey), equal reward queries")
    if Path(args.out).exists():  # targets run earlier (another --only) are kept
        results["targets"] = {**json.loads(Path(args.out).read_text())["targets"], **results["targets"]}
    results["markdown"] = "\n\n".join(markdown(name, r) for name, r in results["targets"].items())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out} and the figures in {args.figures}")
    return 0


def markdown(name: str, result: dict) -> str:
    """One README table per target: mean +- spread over seeds of the main numbers, by beta and algorithm."""

    def cell(stats: dict | None, spec: str = ".3f") -> str:
        return "-" if stats is None else f"{stats['mean']:{spec}} +- {stats['std']:{spec}}"

    runs = result["runs"]
    first = next(iter(runs.values()))
    modes = "target_mode_mass_l1" in first
    head = (
        ["beta", "algorithm", "budget", "SW2 (floor)", "MMD^2 (floor)"]
        + (["mode L1 (floor)", "outside modes"] if modes else [])
        + ["E[r] (optimum)", "path KL", "train s", "peak MiB"]
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
        algo, rest = label.split(" beta=")
        beta, _, budget = rest.partition(" ")
        row = [
            beta,
            algo,
            f"{budget or 'equal queries'} ({r['epochs']['mean'] * CHAINS:.0f})",
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
            f"{r['peak_memory_mb']['mean']:.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def sample_of(run: Path, pretrained: bool = False) -> np.ndarray:
    """1,000 samples of a fine-tuning run (or of the model it started from), DDIM as it was trained."""
    import torch

    from rl_diffusion.checkpoint import load_run, read_run_config
    from rl_diffusion.sampling import draw_samples

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
