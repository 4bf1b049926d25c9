"""iw-distill on the known answers at its own defaults: distance to the exact target against reward queries.

    python scripts/bench_distill.py [--runs runs/bench_distill] [--seeds 3] [--only gmm25_posterior]

For each target (data set, reward, beta), the default pretraining run, then `finetune --algo iw-distill`
with nothing but the target's reward and beta, one run per seed, checkpointed every epoch; each epoch's
checkpoint is evaluated against the exact target (`rl-diffusion evaluate`), so one run gives the curve of
mode-mass L1, MMD^2 and sliced W2 (each with its floor), outside mass and path KL against reward queries.
Writes docs/benchmarks/distill.json and docs/figures/distill.png (mode-mass L1 against reward queries, seeds
as a band, beside the reference relative-trajectory-balance code's curve on the 9-mode posterior as measured
on a 2-core CPU at batch 100). Resumable: finished runs and evaluations are read, not redone.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

SEVEN_MODES = [[-10, -10, 1], [10, 10, 6], [-10, 10, 2], [10, -10, 3], [0, 10, 1], [-10, 0, 4], [5, 5, 2]]
TARGETS = {
    "gmm25_posterior": {"dataset": "gmm25", "reward": "gmm_posterior", "reward_args": {}, "beta": 1.0},
    "gmm25_posterior_7": {
        "dataset": "gmm25",
        "reward": "gmm_posterior",
        "reward_args": {"modes": SEVEN_MODES},
        "beta": 1.0,
    },
    # beta = 0.1 is a sharp tilt (ESS of the pretrained chains ~1e-3): tempering needs more than the default 3 stages
    "8gaussians_linear": {
        "dataset": "8gaussians",
        "reward": "linear",
        "reward_args": {"a": [0.0, 1.0]},
        "beta": 0.1,
        "epochs": 6,
    },
    "checkerboard_bump": {
        "dataset": "checkerboard",
        "reward": "gaussian_bump",
        "reward_args": {"center": [0.5, 0.5], "width": 0.5, "scale": 10.0},
        "beta": 1.0,
    },
}
# The reference RTB code (GFNOrg/diffusion-finetuning, rtb_diffusion, method rtb, batch 100) on the 9-mode
# posterior, run on a 2-core CPU: (reward queries, mode-mass L1 over the 25 modes).
REFERENCE_RTB = [(5_000, 0.885), (20_000, 0.544), (42_500, 0.334), (85_000, 0.199), (297_500, 0.116)]
REFERENCE_RTB += [(382_500, 0.061), (500_000, 0.073)]
MAJOR_MODE = 0.01  # target mass from which a mode counts in min_mode_share
KEYS = (
    "target_mode_mass_l1",
    "target_mode_mass_l1_floor",
    "outside_mass",
    "target_mmd",
    "target_mmd_floor",
    "target_sw2",
    "target_sw2_floor",
    "far_fraction",
    "kl_to_pretrained",
    "reward_mean",
    "target_reward_mean",
)


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "rl_diffusion.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"rl-diffusion {' '.join(args)}: {proc.stderr.strip().splitlines()[-1]}")
    return proc.stdout


def epoch_metrics(run: Path, epoch: int) -> dict:
    """`rl-diffusion evaluate` of the run's checkpoint after `epoch` (a directory holding only that one)."""
    at = run.parent / f"{run.name}_epoch{epoch}"
    cached = at / "metrics.json"
    if not cached.exists():
        (at / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "config.json", at / "config.json")
        name = f"step_{epoch:08d}.pt"
        shutil.copy(run / "checkpoints" / name, at / "checkpoints" / name)
        cached.write_text(cli("evaluate", "--run", str(at)))
    return json.loads(cached.read_text())


def run_target(runs: Path, name: str, target: dict, seed: int) -> list[dict]:
    """One iw-distill run at its defaults; the metrics of every epoch's checkpoint."""
    pretrained = runs / f"pretrained_{target['dataset']}"
    if not (pretrained / "metrics.json").exists():
        cli("pretrain", "--dataset", target["dataset"], "--out", str(pretrained), "--overwrite", "--quiet")
    run = runs / name / f"seed{seed}"
    started = time.perf_counter()
    if not (run / "metrics.json").exists():
        reward_args = [a for k, v in target["reward_args"].items() for a in ("--reward-arg", f"{k}={json.dumps(v)}")]
        cli(
            *("finetune", "--run", str(pretrained), "--out", str(run), "--overwrite", "--algo", "iw-distill"),
            *("--reward", target["reward"], *reward_args, "--kl-coef", str(target["beta"])),
            *("--seed", str(seed), "--checkpoint-every", "1", "--keep-checkpoints", "100", "--quiet"),
            *(("--epochs", str(target["epochs"])) if "epochs" in target else ()),
        )
    wall = time.perf_counter() - started
    from rl_diffusion.checkpoint import CheckpointManager

    history = CheckpointManager(run).load_latest()["train_state"]["history"]
    curve = []
    for h in history:
        metrics = epoch_metrics(run, h["epoch"])
        masses, target_masses = (np.array(metrics.get(k, [])) for k in ("mode_masses", "target_mode_masses"))
        major = target_masses >= MAJOR_MODE  # a mode of the target with next to no mass has no share to keep
        held = masses[major] / target_masses[major] if len(target_masses) else []
        curve.append(
            {
                "epoch": h["epoch"],
                "reward_queries": h["reward_queries"],
                "train_seconds": sum(e["perf/epoch_seconds"] for e in history[: h["epoch"]]),
                "ess_fraction": h["iw/ess_fraction"],
                "lambda": h["iw/lambda"],
                "min_mode_share": float(np.min(held)) if len(held) else None,
                **{k: metrics.get(k) for k in KEYS},
            }
        )
    print(f"{name} seed {seed}: {json.dumps(curve[-1])} ({wall:.0f} s)", flush=True)
    return curve


def spread(curves: list[list[dict]], key: str) -> list[dict]:
    """Mean and standard deviation over seeds of `key` at each epoch."""
    out = []
    for at_epoch in zip(*curves, strict=True):
        values = [c[key] for c in at_epoch if c.get(key) is not None]
        out.append({"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None)
    return out


def markdown(results: dict) -> str:
    head = (
        "| target | beta | reward queries | mode L1 (floor) | outside | min mode share | MMD^2 (floor) | path KL | s |"
    )
    lines = [head, "|" + "---|" * 9]
    for name, r in results.items():
        for e, q in enumerate(r["reward_queries"]):

            def cell(key: str, spec: str = ".3f", e: int = e, r: dict = r) -> str:
                s = r["by_epoch"][key][e]
                return "-" if s is None else f"{s['mean']:{spec}} +- {s['std']:{spec}}"

            floor = r["by_epoch"]["target_mode_mass_l1_floor"][e]
            mmd_floor = r["by_epoch"]["target_mmd_floor"][e]
            lines.append(
                f"| {name} | {r['beta']:g} | {q:,} | {cell('target_mode_mass_l1')}"
                f" ({'-' if floor is None else format(floor['mean'], '.3f')}) | {cell('outside_mass')} "
                f"| {cell('min_mode_share', '.2f')} | {cell('target_mmd', '.4f')} ({mmd_floor['mean']:.4f}) "
                f"| {cell('kl_to_pretrained', '.2f')} | {r['by_epoch']['train_seconds'][e]['mean']:.0f} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, stages) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(3, 2))
    colors = dict(zip(TARGETS, plt.cm.tab10.colors, strict=False))  # one color per target in both panels
    for name, r in results.items():
        epochs = np.arange(1, len(r["reward_queries"]) + 1)
        color = colors[name]
        stages.plot(epochs, np.array(r["lambda"]).T * r["beta"], "o-", lw=1, alpha=0.7, color=color)
        stages.plot(epochs, [e["mean"] for e in r["by_epoch"]["ess_fraction"]], "x:", color=color, label=name)
    stages.axhline(1.0, color="black", lw=0.5)
    stages.set(xlabel="epoch", ylabel="lambda_e beta (o, per seed); pool ESS fraction (x, mean)", ylim=(0, 1.05))
    stages.set_title("tempering stages (lambda_e beta = 1: the full tilt)")
    stages.legend(fontsize=8)
    for name, r in results.items():
        if r["by_epoch"]["target_mode_mass_l1"][0] is None:
            continue
        q = np.array(r["reward_queries"])
        mean = np.array([s["mean"] for s in r["by_epoch"]["target_mode_mass_l1"]])
        std = np.array([s["std"] for s in r["by_epoch"]["target_mode_mass_l1"]])
        (line,) = ax.plot(q, mean, "o-", color=colors[name], label=f"iw-distill, {name}")
        ax.fill_between(q, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.axhline(r["by_epoch"]["target_mode_mass_l1_floor"][-1]["mean"], color=line.get_color(), ls=":", lw=1)
    ref = np.array(REFERENCE_RTB)
    ax.plot(ref[:, 0], ref[:, 1], "s--", color="grey", label="reference RTB code, gmm25_posterior (one run)")
    ax.set(xscale="log", yscale="log", xlabel="reward queries", ylabel="mode-mass L1 to the exact target")
    ax.set_title("iw-distill at its defaults, 3 seeds (dotted: the metric's floor)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/bench_distill")
    parser.add_argument("--out", default="docs/benchmarks/distill.json")
    parser.add_argument("--figure", default="docs/figures/distill.png")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated target names (default: all)")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    results = json.loads(Path(args.out).read_text())["targets"] if Path(args.out).exists() else {}
    for name, target in TARGETS.items():
        if only and name not in only:
            continue
        curves = [run_target(Path(args.runs), name, target, seed) for seed in range(args.seeds)]
        results[name] = {
            **target,
            "seeds": args.seeds,
            "reward_queries": [c["reward_queries"] for c in curves[0]],
            "by_epoch": {k: spread(curves, k) for k in (*KEYS, "min_mode_share", "train_seconds", "ess_fraction")},
            "lambda": [[c["lambda"] for c in curve] for curve in curves],
        }
    table = markdown(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"targets": results, "reference_rtb": REFERENCE_RTB, "markdown": table}, indent=2)
    )
    plot(results, Path(args.figure))
    print(table)
    print(f"wrote {args.out} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
