"""This project's algorithms beside the reference relative-trajectory-balance code, on its own 9-mode posterior.

    python scripts/bench_reference.py --reference PATH/TO/diffusion-finetuning [--reference-python PYTHON]
        [--algos rtb iw-distill] [--seeds 3] [--queries 340000] [--samples 2000] [--out docs/benchmarks/reference.json]
    python scripts/bench_reference.py --algos rtb --keep-curves docs/benchmarks/reference.json   # earlier curves kept

The reference is the authors' code (GitHub GFNOrg/diffusion-finetuning, folder rtb_diffusion), in a checkout the
user made; nothing of it is in this repository. It runs in its own process (its folder as the working directory,
`--reference-python`, which must import torch and einops) under a driver written here that calls its model, its
optimiser and its loss as its `finetune_posterior.py --method rtb` does (its pretrained prior and optimiser state,
batch --reference-batch, exploration std 0.5 for 500 iterations then decayed to 0 at 4,500) and saves samples of
its policy every --every reward queries. It takes 12 to 19 minutes a seed on 2 cores; `--keep-curves` keeps the
curves of an earlier JSON of this script that this run does not make (the reference's, earlier settings' under
the names they were given there), scored with the same --every and --samples (their --queries may differ: the
table reads each curve where it reaches).

Ours: the default `pretrain` of gmm25, then `finetune --reward gmm_posterior --kl-coef 1` per algorithm with the
flags of RECIPES, checkpointed as often; each checkpoint's policy draws --samples samples with the run's own chain.

Both sides' samples are scored by the same function against exact posterior samples (in this project's
coordinates, the reference's divided by 5): mode-mass L1 over the 25 grid modes with its floor (two exact draws),
mass outside every mode, MMD^2 with its floor. Wall seconds are training seconds (sampling, reward, update), not
the evaluation's. Writes the JSON (every curve, seeds apart) and docs/figures/reference.png: L1 against reward
queries and against seconds, mean over seeds with a band of one standard deviation. Runs are kept under --runs and
reused when complete.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

import numpy as np  # noqa: E402

from rl_diffusion.metrics import mmd_rbf, mode_mass_l1, mode_masses  # noqa: E402
from rl_diffusion.targets import exact_target  # noqa: E402

REFERENCE_SCALE = 5.0  # its grid is {-10, ..., 10}; gmm25's is {-2, ..., 2}
TARGET_SEED = 2024
RECIPES = {  # flags over the CLI's defaults
    # the reference's batch (100 chains a step) and a chain of its length (100 DDIM steps); rtb's own defaults are
    # the rest (lr 1e-3, log Z lr 0.1, no clipping, exploration sigma x 2.45 held 250 epochs then decayed to
    # on-policy over 750, Huber's balance at 3 nats; docs/design.md, section 8); measured with the learning rate
    # falling over the last 40%
    "rtb": ["--chains", "100", "--sampler", "ddim", "--sampling-steps", "100", "--lr-decay", "0.4"],
    "iw-distill": [],
    # ddpo-is on rtb's chain, batch and step schedule (one gradient step per epoch, no clipping, the same exploration):
    # the whole-chain soft return less a running log Z, clipped at rtb's Huber threshold (docs/design.md, section 8)
    "ddpo-is": [
        *("--chains", "100", "--sampler", "ddim", "--sampling-steps", "100", "--lr-decay", "0.4"),
        *("--kl-return", "path", "--explore-scale", "2.45", "--adv-clip", "3", "--minibatch-size", "10000"),
        *("--grad-clip", "0"),
    ],
}

DRIVER = r"""
import copy, json, sys, time
import numpy as np, torch
sys.path.insert(0, ".")
from energies import Posterior2DGaussianMixture
from models import GFN
from utils import get_exploration_std, get_finetuning_loss, get_gfn_optimizer

out, seed, batch, iterations, every, samples = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(seed)
np.random.seed(seed)
torch.set_num_threads(1)
energy = Posterior2DGaussianMixture(device="cpu")
model = GFN(2, 64, 64, 64, 64, trajectory_length=100, clipping=True, lgv_clip=1e2, gfn_clip=1e4, langevin=False,
            learned_variance=False, partial_energy=False, log_var_range=4.0, pb_scale_range=0.1, t_scale=5.0,
            langevin_scaling_per_dimension=False, conditional_flow_model=False, learn_pb=False,
            pis_architectures=True, lgv_layers=3, joint_layers=2, zero_init=True, device="cpu")
optimizer = get_gfn_optimizer(model, 1e-3, 0.1, 1e-3, False, False, False, False)
state = torch.load("pretrained/prior.pt", map_location="cpu")
model.load_state_dict(state.get("model_state_dict", state))
if "optimizer_state_dict" in state:
    optimizer.load_state_dict(state["optimizer_state_dict"])
prior = copy.deepcopy(model)
prior.eval()
model.train()
seconds, curve = 0.0, []
for i in range(iterations + 1):
    if i % every == 0 or i == iterations:
        drawn = model.sample(samples, energy.log_reward).detach().numpy()
        np.save(f"{out}/iter{i:06d}.npy", drawn)
        curve.append({"iteration": i, "reward_queries": i * batch, "train_seconds": seconds})
        json.dump(curve, open(f"{out}/curve.json", "w"))
    started = time.perf_counter()
    model.zero_grad()
    exploration = get_exploration_std(i, True, 0.5, True)
    init = torch.zeros(batch, 2)
    loss, _ = get_finetuning_loss("rtb", init, prior, model, energy.log_reward, beta=1.0, exploration_std=exploration)
    loss.backward()
    optimizer.step()
    seconds += time.perf_counter() - started
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "rl_diffusion.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"rl-diffusion {' '.join(args[:3])}: {proc.stderr.strip().splitlines()[-1]}")


class Scorer:
    """Samples [N, 2] in gmm25's coordinates against exact posterior samples, with the floors."""

    def __init__(self, samples: int):
        target = exact_target("gmm25", "gmm_posterior", {}, 1.0, 2 * samples, TARGET_SEED)
        self.modes = target.modes
        self.draw, again = np.split(target.samples, 2)
        self.floor = self.score(again, floor=False)

    def score(self, points: np.ndarray, floor: bool = True) -> dict:
        masses, outside = mode_masses(points, self.modes.means, self.modes.radius)
        held = masses[self.modes.masses >= 0.01] / self.modes.masses[self.modes.masses >= 0.01]
        out = {
            "mode_mass_l1": mode_mass_l1(masses, self.modes.masses),
            "outside": outside,
            "min_mode_share": float(held.min()),
            "mmd": mmd_rbf(points, self.draw, statistic="v"),
        }
        return {**out, **({f"{k}_floor": self.floor[k] for k in ("mode_mass_l1", "mmd")} if floor else {})}


def reference_curve(args, seed: int, scorer: Scorer) -> list[dict]:
    out = args.runs / "reference" / f"seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    iterations = args.queries // args.reference_batch
    every = max(1, args.every // args.reference_batch)
    if not (out / f"iter{iterations:06d}.npy").exists():
        log(f"reference rtb, seed {seed}: {iterations} iterations of {args.reference_batch}")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [args.reference_python, "-c", DRIVER, str(out.resolve()), str(seed), str(args.reference_batch)]
        command += [str(iterations), str(every), str(args.samples)]
        proc = subprocess.run(command, cwd=args.reference / "rtb_diffusion", env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the reference run failed: {proc.stderr.strip().splitlines()[-1]}")
    curve = json.loads((out / "curve.json").read_text())
    return [{**c, **scorer.score(np.load(out / f"iter{c['iteration']:06d}.npy") / REFERENCE_SCALE)} for c in curve]


def our_curve(args, algo: str, seed: int, pretrained: Path, scorer: Scorer) -> list[dict]:
    import torch

    from rl_diffusion.checkpoint import CheckpointManager, load_run
    from rl_diffusion.evaluation import checkpoint_samples
    from rl_diffusion.sampling import draw_samples

    run = args.runs / algo / f"seed{seed}"
    chains = int(RECIPES[algo][RECIPES[algo].index("--chains") + 1]) if "--chains" in RECIPES[algo] else None
    per_epoch = chains or (10_000 if algo == "iw-distill" else 256)
    every = max(1, args.every // per_epoch)
    if not (run / "metrics.json").exists():
        log(f"{algo}, seed {seed}: {args.queries // per_epoch} epochs")
        cli(
            *("finetune", "--run", str(pretrained), "--out", str(run), "--overwrite", "--algo", algo, *RECIPES[algo]),
            *("--reward", "gmm_posterior", "--kl-coef", "1", "--seed", str(seed), "--epochs"),
            str(args.queries // per_epoch),
            *("--checkpoint-every", str(every), "--keep-checkpoints", "1000", "--no-final-eval", "--quiet"),
        )
    config, cpu = json.loads((run / "config.json").read_text()), torch.device("cpu")
    chain = {"sampler": config["sampler"], "sampling_steps": config["sampling_steps"], "eta": 1.0}
    history = CheckpointManager(run).load_latest()["train_state"]["history"]
    prior = load_run(pretrained, cpu)
    drawn = draw_samples(prior.diffusion, prior.model, args.samples, 0, cpu, **chain)
    curve = [{"epoch": 0, "reward_queries": 0, "train_seconds": 0.0, **scorer.score(drawn)}]
    for epoch, drawn in checkpoint_samples(run, args.samples, 0, cpu, **chain):
        seconds = sum(h["perf/epoch_seconds"] for h in history[:epoch])
        queries = history[epoch - 1]["reward_queries"]
        curve.append({"epoch": epoch, "reward_queries": queries, "train_seconds": seconds, **scorer.score(drawn)})
    return curve


def earlier_curves(path: Path, samples: int, every: int) -> dict[str, list[list[dict]]]:
    """Every curve of an earlier JSON of this script, by name, if it was scored as this run scores: the same
    --samples and --every (ValueError if not; a JSON that does not record --every was written at the default)."""
    try:
        earlier = json.loads(path.read_text())
        curves = earlier["curves"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"--keep-curves {path}: no curves in it ({e})") from None
    if (earlier.get("samples"), earlier.get("every", 25_000)) != (samples, every):
        raise ValueError(f"--keep-curves {path} was scored at other --samples or --every")
    return curves


def spread(curves: list[list[dict]], key: str) -> dict:
    """Mean and standard deviation over seeds at each point the seeds share."""
    n = min(len(c) for c in curves)
    values = np.array([[c[i][key] for i in range(n)] for c in curves])
    return {"mean": values.mean(0).tolist(), "std": values.std(0).tolist()}


def first_below(curve: list[dict], level: float) -> int | None:
    """Reward queries of the first scored point at or below `level` of mode-mass L1, or None."""
    return next((c["reward_queries"] for c in curve if c["mode_mass_l1"] <= level), None)


def markdown(results: dict) -> str:
    """One row per method: L1 at a few budgets up to the longest curve's (mean +- sd over seeds, the seeds'
    values; blank where a method's curves stop short of it), the last point's queries, mode shares, outside mass
    and MMD^2, and the queries each seed took to 0.1."""
    longest = max(curve[-1]["reward_queries"] for curves in results["curves"].values() for curve in curves)
    marks = [q for q in (100_000, 200_000) if q < longest] + [longest]
    head = " | ".join(f"L1 at {q:,}" for q in marks)
    lines = [
        f"| method | seeds | {head} | last point | smallest mode share | outside | MMD^2 | queries to 0.1 |",
        "|---|---|" + "---|" * (len(marks) + 5),
    ]
    for name, curves in results["curves"].items():
        cells = []
        for q in marks:
            if any(curve[-1]["reward_queries"] < q for curve in curves):
                cells.append("")
                continue
            values = [min(curve, key=lambda c, q=q: abs(c["reward_queries"] - q))["mode_mass_l1"] for curve in curves]
            seeds = ", ".join(f"{v:.3f}" for v in values)
            cells.append(f"{np.mean(values):.3f} +- {np.std(values):.3f} ({seeds})")
        last = [curve[-1] for curve in curves]
        share = ", ".join(f"{c['min_mode_share']:.2f}" for c in last)
        outside = ", ".join(f"{100 * c['outside']:.1f}%" for c in last)
        mmd = f"{np.mean([c['mmd'] for c in last]):.4f}"
        reached = ", ".join(f"{r:,}" if (r := first_below(curve, 0.1)) is not None else "not" for curve in curves)
        cells.append(f"{last[0]['reward_queries']:,}")
        lines.append(f"| {name} | {len(curves)} | {' | '.join(cells)} | {share} | {outside} | {mmd} | {reached} |")
    floor = results["floor"]
    cells = [
        "floor (two exact draws)",
        "",
        f"{floor['mode_mass_l1']:.3f}",
        *[""] * (len(marks) + 2),
        f"{floor['mmd']:.4f}",
        "",
    ]
    lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, curves in results["curves"].items():
        n = min(len(c) for c in curves)
        l1 = spread(curves, "mode_mass_l1")
        mean, std = np.array(l1["mean"]), np.array(l1["std"])
        for ax, x_key in zip(axes, ("reward_queries", "train_seconds"), strict=True):
            x = np.array(spread(curves, x_key)["mean"])
            label = f"{name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
            ax.plot(x[:n], mean, label=label)
            ax.fill_between(x[:n], mean - std, mean + std, alpha=0.2)
    floor = results["floor"]["mode_mass_l1"]
    for ax, xlabel in zip(axes, ("reward queries", "training seconds (2-core CPU)"), strict=True):
        ax.axhline(floor, color="grey", linestyle=":", label=f"floor ({floor:.3f})")
        ax.axhline(0.1, color="grey", linestyle="--", linewidth=0.8)
        ax.set(xlim=(0, None), yscale="log", xlabel=xlabel, ylabel="mode-mass L1 to the posterior")
    axes[0].legend(fontsize=8)
    fig.suptitle("9-mode posterior at beta = 1: this project against the reference RTB code")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, default=None, help="checkout of GFNOrg/diffusion-finetuning (optional)")
    p.add_argument("--reference-python", default=sys.executable, help="interpreter for the reference (torch, einops)")
    p.add_argument("--reference-batch", type=int, default=100, help="the reference's chains per step (its own: 500)")
    p.add_argument("--keep-curves", type=Path, default=None, help="an earlier JSON whose other curves are kept")
    p.add_argument("--algos", nargs="*", default=["rtb", "iw-distill"], choices=sorted(RECIPES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--reference-seeds", type=int, default=None, help="seeds of the reference (default: --seeds)")
    p.add_argument("--queries", type=int, default=340_000, help="reward queries per run")
    p.add_argument("--every", type=int, default=25_000, help="reward queries between scored checkpoints")
    p.add_argument("--samples", type=int, default=2000, help="samples scored per checkpoint")
    p.add_argument("--runs", type=Path, default=Path("runs/bench_reference"))
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/reference.json"))
    p.add_argument("--figure", type=Path, default=Path("docs/figures/reference.png"))
    args = p.parse_args()
    if args.reference is not None and not (args.reference / "rtb_diffusion" / "finetune_posterior.py").exists():
        print(f"error: {args.reference} is not a checkout of GFNOrg/diffusion-finetuning", file=sys.stderr)
        return 2
    kept = {}
    if args.keep_curves is not None:
        try:
            kept = earlier_curves(args.keep_curves, args.samples, args.every)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    scorer = Scorer(args.samples)
    pretrained = args.runs / "pretrained_gmm25"
    if not (pretrained / "metrics.json").exists():
        cli("pretrain", "--dataset", "gmm25", "--out", str(pretrained), "--overwrite", "--quiet")
    results = {"queries": args.queries, "samples": args.samples, "every": args.every, "floor": scorer.floor}
    results["curves"] = {}
    started = time.perf_counter()
    for algo in args.algos:
        name = f"{algo} (this project)"
        results["curves"][name] = [our_curve(args, algo, seed, pretrained, scorer) for seed in range(args.seeds)]
    if args.reference is not None:
        seeds = args.seeds if args.reference_seeds is None else args.reference_seeds
        name = f"reference rtb (batch {args.reference_batch})"
        results["curves"][name] = [reference_curve(args, seed, scorer) for seed in range(seeds)]
    results["curves"] = {**{k: v for k, v in kept.items() if k not in results["curves"]}, **results["curves"]}
    for name, curves in results["curves"].items():
        last = [c[-1] for c in curves]
        l1 = ", ".join(f"{c['mode_mass_l1']:.3f}" for c in last)
        log(f"{name}: L1 {l1} at {last[0]['reward_queries']:,} queries (floor {scorer.floor['mode_mass_l1']:.3f})")
    results["wall_seconds"] = time.perf_counter() - started
    results["table"] = markdown(results)
    print(results["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
