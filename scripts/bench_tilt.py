"""Known answers: every native fine-tuning algorithm raced on tilted targets whose samples are exact, from a
DDPM prior and from a flow-matching prior of the same data set.

    python scripts/bench_tilt.py [--runs runs/bench_tilt] [--seeds 3] [--jobs 2] [--only gmm25_posterior]
        [--model-types ddpm,flow] [--betas 1.0,0.3,0.1] [--no-matched] [--race 8gaussians_linear]

Each target is a (data set, reward) pair whose KL-regularised optimum p_data(x) exp(r(x) / beta) / Z
`rl_diffusion.targets` samples exactly (a mixture tilted in closed form, or rejection sampling).
For each target and model type: the default pretraining run on its data set (`--model-type flow` for the
flow prior); then passes of fine-tuning runs, each evaluated (`metrics.json`) against the exact target, on
a memoryless chain of 50 steps (DDIM eta = 1 on the DDPM, the SDE with the ODE's marginals at eta = 1 on
the flow):
  - matched reward queries: every algorithm, beta and seed with the same chains x epochs;
  - matched wall time (beta = 1): every algorithm for the epochs that take it as long as ddpo-is's
    run took (its seconds per epoch measured in the first pass);
  - half the queries (beta = 1): adjoint and rtb with half of ddpo-is's reward queries;
  - the race to a distance (targets named by --race, beta = 1): RACE_ALGOS for RACE_EPOCHS epochs,
    checkpointed every RACE_EVERY; each checkpoint draws 2,000 samples (seed 0, the run's chain) whose
    mode-mass L1 to the exact target is read; the reward queries each seed took to reach --race-level.
Writes docs/benchmarks/tilt.json (every run, the mean and spread over seeds) and one figure per
target, docs/figures/tilt_<target>.png (seed 0's samples at beta = 1 over the exact target, a row per model
type), and for a raced target docs/figures/race_<target>.png (mode-mass L1 against reward queries).
Resumable: a run whose metrics.json exists is read, not redone.

rwr has no KL weight: each epoch fits p_old exp(r / T), so after E epochs it aims at about
p_pre exp(E r / T). It runs with T = E beta, the temperature whose compounded tilt is the
target's; nothing holds it to the pretrained model, so that match is only nominal.
"""

import argparse
import functools
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
from rl_diffusion.metrics import mode_mass_l1, mode_masses  # noqa: E402
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
ALGOS = ("ddpo-sf", "ddpo-is", "rwr", "awm", "adjoint", "rtb", "draft", "flow-grpo", "nft")
# each algorithm's own settings (the rest are the CLI's defaults)
ALGO_FLAGS: dict[str, list[str]] = {
    "ddpo-sf": [],
    "ddpo-is": [],
    "rwr": [],
    "awm": [],
    "adjoint": ["--no-check-targets"],  # the race measures what it does where it would refuse (gmm25)
    "rtb": [
        *("--lr", "3e-3", "--log-z-lr", "0.3", "--explore-scale", "1.5", "--replay-size", "1024"),
        *("--delta-clip", "0", "--grad-clip", "1", "--lr-decay", "0"),  # as measured, before rtb's new defaults
    ],
    "draft": [],
    "flow-grpo": [],
    "nft": [],
}
REFERENCE = "ddpo-is"  # the algorithm whose wall time and reward queries the other passes are matched to
FAST = ("adjoint", "rtb")  # run again with half the reference's reward queries
CHAINS, EPOCHS = 256, 40
RACE_EPOCHS, RACE_EVERY, RACE_SAMPLES = 80, 4, 2000
RACE_ALGOS = ("ddpo-sf", "ddpo-is", "adjoint", "flow-grpo", "nft")  # the best DDPM one, and the flow methods' claims
# each model type's pretraining flags and fine-tuning chain; eta = 1: memoryless, so the optimum is reachable
MODEL_TYPES = {
    "ddpm": {"pretrain": [], "sampling": ["--sampler", "ddim", "--sampling-steps", "50", "--eta", "1"]},
    "flow": {
        "pretrain": ["--model-type", "flow"],
        "sampling": ["--sampler", "sde", "--sampling-steps", "50", "--eta", "1"],
    },
}
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


def tilt_run(
    runs: Path,
    target: dict,
    model_type: str,
    pretrained: Path,
    threads: int,
    algo: str,
    beta: float,
    seed: int,
    epochs: int = EPOCHS,
    suffix: str = "",
    extra: tuple[str, ...] = (),
) -> dict:
    """The fine-tuning run of one job of a pass, in runs/<algo>_beta<beta>_seed<seed><suffix>."""
    out = runs / f"{algo}_beta{beta}_seed{seed}{suffix}"
    return finetune(pretrained, out, target, model_type, algo, beta, seed, threads, epochs, extra)


def finetune(
    pretrained: Path,
    out: Path,
    target: dict,
    model_type: str,
    algo: str,
    beta: float,
    seed: int,
    threads: int,
    epochs: int = EPOCHS,
    extra: tuple[str, ...] = (),
) -> dict:
    """One fine-tuning run (skipped when finished) and its metrics against the exact target."""
    if not (out / "metrics.json").exists():
        reward_args = [
            arg for k, v in target["reward_args"].items() for arg in ("--reward-arg", f"{k}={json.dumps(v)}")
        ]
        strength = ["--rwr-temperature", str(epochs * beta)] if algo == "rwr" else ["--kl-coef", str(beta)]
        cli(
            [
                *("finetune", "--run", str(pretrained), "--out", str(out), "--overwrite", "--algo", algo),
                *("--reward", target["reward"], *reward_args, *strength, *MODEL_TYPES[model_type]["sampling"]),
                *ALGO_FLAGS[algo],
                *("--chains", str(CHAINS), "--epochs", str(epochs), "--seed", str(seed), "--quiet", *extra),
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


class RaceScorer:
    """Mode-mass L1 of a run's checkpoints against the exact target at beta = 1, and the floor (two exact
    draws of RACE_SAMPLES)."""

    def __init__(self, target: dict):
        exact = exact_target(target["dataset"], target["reward"], target["reward_args"], 1.0, 2 * RACE_SAMPLES, 0)
        self.modes = exact.modes
        self.floor = self.l1(exact.samples[RACE_SAMPLES:])

    def l1(self, points: np.ndarray) -> float:
        masses, _ = mode_masses(points, self.modes.means, self.modes.radius)
        return mode_mass_l1(masses, self.modes.masses)

    def curve(self, run: Path) -> list[dict]:
        """(reward queries, mode-mass L1) at every checkpoint of the run, each scored on the run's own chain."""
        import torch

        from rl_diffusion.evaluation import checkpoint_samples

        config, cpu = json.loads((run / "config.json").read_text()), torch.device("cpu")
        chain = {"sampler": config["sampler"], "sampling_steps": config["sampling_steps"], "eta": config["eta"]}
        history = CheckpointManager(run).load_latest()["train_state"]["history"]
        return [
            {"reward_queries": history[epoch - 1]["reward_queries"], "mode_mass_l1": self.l1(points)}
            for epoch, points in checkpoint_samples(run, RACE_SAMPLES, 0, cpu, **chain)
        ]


def race_summary(curves: list[list[dict]], level: float) -> dict:
    """Per seed: the reward queries of the first checkpoint at or below `level` (None: never), the L1 at
    the equal-queries budget and at the end; with their means over the seeds."""
    reached = [next((c["reward_queries"] for c in curve if c["mode_mass_l1"] <= level), None) for curve in curves]
    at_budget = [next(c["mode_mass_l1"] for c in curve if c["reward_queries"] >= CHAINS * EPOCHS) for curve in curves]
    final = [curve[-1]["mode_mass_l1"] for curve in curves]
    hit = [q for q in reached if q is not None]
    return {
        "level": level,
        "queries_to_level": reached,
        "seeds_reaching": len(hit),
        "mean_queries_of_those_reaching": float(np.mean(hit)) if hit else None,
        "l1_at_equal_queries": {"mean": float(np.mean(at_budget)), "std": float(np.std(at_budget))},
        "l1_at_end": {"mean": float(np.mean(final)), "std": float(np.std(final)), "values": final},
        "mean_curve": {
            "reward_queries": [c["reward_queries"] for c in curves[0]],
            "mode_mass_l1": np.mean([[c["mode_mass_l1"] for c in curve] for curve in curves], 0).tolist(),
        },
        "curves": curves,
    }


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


def pretrained_run(runs: Path, dataset: str, model_type: str) -> Path:
    """The default pretraining run of a data set (and model type), made once."""
    pretrained = runs / (f"pretrained_{dataset}" + ("" if model_type == "ddpm" else f"_{model_type}"))
    if not (pretrained / "metrics.json").exists():
        print(f"== pretraining {dataset} ({model_type})", flush=True)
        flags = MODEL_TYPES[model_type]["pretrain"]
        cli(
            ["pretrain", "--dataset", dataset, *flags, "--out", str(pretrained), "--overwrite", "--quiet"],
            os.cpu_count() or 1,
        )
    return pretrained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/bench_tilt", help="where the run directories go")
    parser.add_argument("--out", default="docs/benchmarks/tilt.json")
    parser.add_argument("--figures", default="docs/figures", help="folder of the tilt_<target>.png figures")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, each in its own process")
    parser.add_argument("--only", default="", help="comma-separated target names (default: all)")
    parser.add_argument("--model-types", default=",".join(MODEL_TYPES), help="comma-separated priors: ddpm, flow")
    parser.add_argument("--betas", default=",".join(map(str, BETAS)), help="comma-separated betas of the first pass")
    parser.add_argument("--no-matched", action="store_true", help="skip the matched-time and half-query passes")
    parser.add_argument("--race", default="8gaussians_linear", help="comma-separated targets of the race pass")
    parser.add_argument("--race-level", type=float, default=0.10, help="the race's mode-mass L1 to reach")
    args = parser.parse_args()
    betas = [float(b) for b in args.betas.split(",")]
    runs, threads = Path(args.runs), max(1, (os.cpu_count() or 1) // args.jobs)
    only = set(filter(None, args.only.split(",")))
    model_types = [m for m in args.model_types.split(",") if m]
    results: dict = {
        "settings": {
            "chains": CHAINS,
            "epochs": EPOCHS,
            "reward_queries": CHAINS * EPOCHS,
            "sampling": {m: " ".join(MODEL_TYPES[m]["sampling"]) for m in model_types},
            "algorithm_flags": ALGO_FLAGS,
            "seeds": args.seeds,
            "threads_per_run": threads,
            "race": {"epochs": RACE_EPOCHS, "checkpoint_every": RACE_EVERY, "samples": RACE_SAMPLES},
        },
        "targets": {},
    }
    seeds = range(args.seeds)
    for name, target in TARGETS.items():
        if only and name not in only:
            continue
        started, table, race, n_runs = time.perf_counter(), {}, {}, 0
        for model_type in model_types:
            pretrained = pretrained_run(runs, target["dataset"], model_type)

            run = functools.partial(tilt_run, runs / name / model_type, target, model_type, pretrained, threads)
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                jobs = [(algo, beta, seed) for beta in betas for algo in ALGOS for seed in seeds]
                done = run_pass(pool, jobs, run)
                for beta in betas:
                    for algo in ALGOS:
                        per_seed = [r for (a, b, _), r in zip(jobs, done, strict=True) if a == algo and b == beta]
                        table[f"{model_type} {algo} beta={beta}"] = summarise(per_seed)
                timed, half = [], []
                if not args.no_matched:  # matched wall time at beta = 1: epochs scaled by the reference's seconds
                    seconds = {a: table[f"{model_type} {a} beta=1.0"]["train_seconds"]["mean"] for a in ALGOS}
                    epochs = {a: max(1, round(EPOCHS * seconds[REFERENCE] / seconds[a])) for a in ALGOS}
                    timed = [(a, 1.0, s, epochs[a], "_time") for a in ALGOS if a != REFERENCE for s in seeds]
                    half = [(a, 1.0, s, EPOCHS // 2, "_half") for a in FAST for s in seeds]
                done = run_pass(pool, timed + half, run)
                for job, label in ((timed, "matched time"), (half, "half queries")):
                    for algo in ALGOS:
                        per_seed = [r for j, r in zip(timed + half, done, strict=True) if j in job and j[0] == algo]
                        if per_seed:
                            table[f"{model_type} {algo} beta=1.0 {label}"] = summarise(per_seed)
                n_runs += len(jobs) + len(timed) + len(half)
                if name in args.race.split(","):
                    extra = ("--checkpoint-every", str(RACE_EVERY), "--keep-checkpoints", "1000")
                    raced = [(algo, 1.0, seed, RACE_EPOCHS, "_race", extra) for algo in RACE_ALGOS for seed in seeds]
                    done = run_pass(pool, raced, run)
                    n_runs += len(raced)
                    scorer = RaceScorer(target)
                    for algo in RACE_ALGOS:
                        curves = [
                            scorer.curve(runs / name / model_type / f"{algo}_beta1.0_seed{s}_race") for s in seeds
                        ]
                        race[f"{model_type} {algo}"] = {**race_summary(curves, args.race_level), "floor": scorer.floor}
        print(f"== {name}: {n_runs} runs in {time.perf_counter() - started:.0f} s")
        first = model_types[0]
        pre = json.loads((runs / name / first / f"{REFERENCE}_beta1.0_seed0" / "metrics.json").read_text())
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
            "settings": results["settings"],  # kept with the target: other targets may come from earlier runs
            "runs": table,
            **({"race": race} if race else {}),
        }
        print(markdown(name, results["targets"][name]), flush=True)
        # the figure: at beta = 1, seed 0's samples of each algorithm over the exact target, a row per model type
        exact = exact_target(target["dataset"], target["reward"], target["reward_args"], 1.0, 1000, seed=0)
        rows = []
        for model_type in model_types:
            seed0 = runs / name / model_type / f"{REFERENCE}_beta1.0_seed0"
            cells = [("exact target", exact.samples), ("pretrained", sample_of(seed0, pretrained=True))]
            cells += [(algo, sample_of(runs / name / model_type / f"{algo}_beta1.0_seed0")) for algo in ALGOS]
            rows.append((f"{model_type} prior", cells, exact.samples))
        figure = Path(args.figures) / f"tilt_{name}.png"
        figures.plot_grid(
            rows, figure, title="samples (blue) over the exact tilted target (grey), equal reward queries"
        )
        if race:  # mode-mass L1 against reward queries, the mean over seeds of each model type and algorithm
            curves = {k: (r["mean_curve"]["reward_queries"], r["mean_curve"]["mode_mass_l1"]) for k, r in race.items()}
            floor = next(iter(race.values()))["floor"]
            figures.plot_curves(
                curves,
                Path(args.figures) / f"race_{name}.png",
                "reward queries",
                f"mode-mass L1 to the exact target (floor {floor:.3f})",
                title=f"{name}, beta = 1: the race to {args.race_level} (mean of {args.seeds} seeds)",
                log_y=True,
            )
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
        ["model", "beta", "algorithm", "budget", "SW2 (floor)", "MMD^2 (floor)"]
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
        model_algo, rest = label.split(" beta=")
        model_type, algo = model_algo.split(" ")
        beta, _, budget = rest.partition(" ")
        row = [
            model_type,
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
    if "race" in result:
        lines += ["", race_markdown(result["race"])]
    return "\n".join(lines)


def race_markdown(race: dict) -> str:
    """The race to a distance at beta = 1: reward queries to the level per seed, L1 at equal queries and at the end."""
    first = next(iter(race.values()))
    budget = CHAINS * RACE_EPOCHS
    lines = [
        f"Race to mode-mass L1 <= {first['level']} (floor {first['floor']:.3f}, {RACE_SAMPLES:,} samples per "
        f"checkpoint, one every {RACE_EVERY * CHAINS:,} queries, at most {budget:,}):",
        "",
        f"| model | algorithm | queries to {first['level']} (per seed) | seeds there | L1 at {CHAINS * EPOCHS:,} "
        f"| L1 at {budget:,} |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in race.items():
        model_type, algo = label.split(" ")
        per_seed = ", ".join("-" if q is None else f"{q:,}" for q in r["queries_to_level"])
        lines.append(
            f"| {model_type} | {algo} | {per_seed} | {r['seeds_reaching']}/{len(r['queries_to_level'])} "
            f"| {r['l1_at_equal_queries']['mean']:.3f} +- {r['l1_at_equal_queries']['std']:.3f} "
            f"| {r['l1_at_end']['mean']:.3f} +- {r['l1_at_end']['std']:.3f} |"
        )
    return "\n".join(lines)


def sample_of(run: Path, pretrained: bool = False) -> np.ndarray:
    """1,000 samples of a fine-tuning run (or of the model it started from) on the chain it was trained on."""
    import torch

    from rl_diffusion.checkpoint import load_run, read_run_config
    from rl_diffusion.sampling import draw_samples

    config = read_run_config(run)
    loaded = load_run(Path(config["run"]) if pretrained else run, torch.device("cpu"))
    chain = {"sampler": config["sampler"], "sampling_steps": config["sampling_steps"], "eta": config["eta"]}
    return draw_samples(loaded.diffusion, loaded.model, 1000, seed=0, device=torch.device("cpu"), **chain)


if __name__ == "__main__":
    sys.exit(main())
