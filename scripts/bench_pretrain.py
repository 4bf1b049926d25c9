"""Pretraining benchmark: where the default dino run's time goes, old defaults against new, flow matching
against the DDPM, and the ceiling.

    python scripts/bench_pretrain.py [--seeds 3] [--out docs/benchmarks/pretrain.json] [--skip-levers] [--device cuda]

1. Side by side: `rl-diffusion pretrain --dataset dino` as a user runs it (a fresh process, torch's own thread
   count), on today's defaults, on the defaults before issue 17 (given as flags, OLD_DEFAULTS) and on
   today's defaults with `--model-type flow` (rectified flow, Euler ODE over the same T steps), seed by seed
   alternating so that all three see the same machine state. Per run: the wall time from launch to exit,
   split by phase: start-up (launch to pretrain()'s first line: interpreter and imports), then the run's own
   timing.json (timers in the code path: setup, optimizer steps, logging, in-training evaluations,
   checkpoints, final evaluation, figures and GIFs), then exit (pretrain()'s return to process exit). And
   the final model's quality: the run's own final-evaluation draw (5,000 samples of the full chain,
   seed + 1, drawn again here from its checkpoint) against 5,000 data points: sliced W2 (500 projections)
   and MMD^2 (V-statistic, so that the floor is positive), each over its floor, an independent draw of the
   data against the same points.
2. Levers, one at a time against the new defaults (one seed each unless --lever-seeds): one torch thread,
   the old in-training evaluation, the old schedule with the new evaluation, a cheaper schedule, and
   torch.compile of the network (a whole run, compile time included, with a cold compile cache).
3. The ceiling, in this process at torch's default thread count (as the runs above): for the dino MLP and
   the digits U-Net, on their default configs, a pretraining step, DDPM sampling (the final evaluation's
   draw) and DDIM sampling (the in-training evaluation's). FLOPs are the matrix products and convolutions
   each ran, counted by torch.utils.flop_counter.FlopCounterMode (rl_diffusion/flops.py); the ceiling is
   the same products replayed back to back. Each workload's time is split into those products at the
   replay's speed, per-call overhead (the same workload on a batch of 8, whose products cost nothing:
   Python, dispatch, the optimizer's and sampler's small ops) and the rest (elementwise kernels over the
   full batch: memory traffic). The machine's peak is a 2048 x 2048 float32 product, on 1 and 2 threads.

Prints and writes the JSON, with the markdown tables as fields.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

import torch  # noqa: E402

from pretrain.data import EVAL_DATA_SEED, reference_draws  # noqa: E402
from pretrain.datasets import sample_2d  # noqa: E402
from pretrain.train import PHASES, PretrainConfig, config_for, eval_sampling, optimizer_step, start_run  # noqa: E402
from rl_diffusion.checkpoint import load_run  # noqa: E402
from rl_diffusion.flops import attainment, peak_flops_per_sec, record_matmuls, replay_seconds  # noqa: E402
from rl_diffusion.metrics import mmd_rbf, sliced_wasserstein2  # noqa: E402
from rl_diffusion.sampling import draw_samples  # noqa: E402

N = 5000  # samples and data points of the final evaluation
# The defaults before issue 17 that it changed: 3,000 steps of 1,024, in-training evaluations on the full
# DDPM chain.
OLD_DEFAULTS = {"steps": 3000, "batch_size": 1024, "eval_sampling_steps": 0}
TINY_BATCH = 8  # a batch whose products cost nothing: what is left is the per-call overhead
ALL_PHASES = ("startup", *PHASES, "other", "exit")


def flags_of(values: dict) -> list[str]:
    return [arg for k, v in values.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def changed_defaults() -> dict:
    """OLD_DEFAULTS next to today's values of the same fields."""
    new = PretrainConfig(dataset="dino")
    return {k: {"old": v, "new": getattr(new, k)} for k, v in OLD_DEFAULTS.items()}


class Quality:
    """Sliced W2 and MMD^2 (V) of a run's final-evaluation draw against the reference, over their floors."""

    def __init__(self):
        self.reference = sample_2d("dino", N, EVAL_DATA_SEED)
        again = sample_2d("dino", N, EVAL_DATA_SEED + 1)
        self.sw2_floor = sliced_wasserstein2(again, self.reference)
        self.mmd_floor = mmd_rbf(again, self.reference, statistic="v")

    def __call__(self, run: Path, seed: int) -> dict:
        loaded = load_run(run)
        samples = draw_samples(loaded.diffusion, loaded.model, N, seed=seed + 1, device=torch.device("cpu"))
        sw2, mmd = sliced_wasserstein2(samples, self.reference), mmd_rbf(samples, self.reference, statistic="v")
        return {
            "sw2": sw2,
            "sw2_floor": self.sw2_floor,
            "sw2_over_floor": sw2 / self.sw2_floor,
            "mmd_v": mmd,
            "mmd_v_floor": self.mmd_floor,
            "mmd_over_floor": mmd / self.mmd_floor,
            # the run's own final evaluation (its thread count may round differently: equal to ~1e-6)
            "run_metrics_sw2": json.loads((run / "metrics.json").read_text())["sw2"],
        }


def cli_run(tmp: Path, name: str, flags: dict, seed: int, quality: Quality, env: dict | None = None, driver=None):
    """One `rl-diffusion pretrain --dataset dino` in a fresh process: wall time, its phases, quality."""
    out = tmp / f"{name}-seed{seed}"
    command = driver or [sys.executable, "-m", "rl_diffusion.cli", "pretrain"]
    command = [*command, "--dataset", "dino", "--out", str(out), "--seed", str(seed), *flags_of(flags)]
    launched, started = time.time(), time.perf_counter()
    done = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{name} failed: {done.stderr[-2000:]}")
    timing = json.loads((out / "timing.json").read_text())
    phases = {"startup": timing["started_unix"] - launched, **timing["seconds"]}
    phases["exit"] = wall - phases["startup"] - timing["total_seconds"]
    result = {
        "seed": seed,
        "wall_seconds": wall,
        "phases": phases,
        "torch_threads": timing["torch_threads"],
        "steps_per_sec": flags.get("steps", PretrainConfig.steps) / timing["seconds"]["optimizer_steps"],
        **quality(out, seed),
    }
    log(
        f"{name} seed {seed}: {wall:.1f} s, SW2 {result['sw2_over_floor']:.2f}x floor, "
        f"MMD {result['mmd_over_floor']:.2f}x floor"
    )
    return result


def summarize(runs: list[dict]) -> dict:
    """Means over seeds, with the spread (min, max) of wall time and quality."""

    def spread(key: str) -> dict:
        values = [r[key] for r in runs]
        return {"mean": statistics.mean(values), "min": min(values), "max": max(values)}

    return {
        "seeds": [r["seed"] for r in runs],
        "wall_seconds": spread("wall_seconds"),
        "steps_per_sec": spread("steps_per_sec"),
        "sw2_over_floor": spread("sw2_over_floor"),
        "mmd_over_floor": spread("mmd_over_floor"),
        "phases_mean_seconds": {p: statistics.mean(r["phases"][p] for r in runs) for p in ALL_PHASES},
        "runs": runs,
    }


# The CLI with every network's forward compiled (training, EMA, sampling); compiling the method, not the
# module, keeps the checkpoint's parameter names.
COMPILE_DRIVER = """
import sys, torch
import pretrain.train as train
from rl_diffusion.cli import main
build = train.build_model
def compiled(config):
    model = build(config)
    model.forward = torch.compile(model.forward)
    return model
train.build_model = compiled
sys.exit(main(sys.argv[1:]))
"""


def levers(tmp: Path, quality: Quality, seeds: list[int]) -> dict:
    """Each lever alone against the new defaults: its wall time and quality (means over `seeds`)."""
    same_points_bigger_batches = {"steps": 1000, "batch_size": 1024}
    runs = {
        "new defaults, 1 torch thread": ({}, {"OMP_NUM_THREADS": "1"}, None),
        "new defaults, old in-training evaluation (full DDPM chain)": ({"eval_sampling_steps": 0}, None, None),
        "old schedule (3,000 x 1,024), new evaluation": (
            {k: OLD_DEFAULTS[k] for k in ("steps", "batch_size")},
            None,
            None,
        ),
        "the same points in bigger batches: 1,000 x 1,024": (same_points_bigger_batches, None, None),
        "fewer steps: 1,500 x 512": ({"steps": 1500}, None, None),
        "new defaults, torch.compile (cold compile cache)": (
            {},
            {"TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor")},
            [sys.executable, "-c", COMPILE_DRIVER, "pretrain"],
        ),
    }
    result = {}
    for name, (flags, env, driver) in runs.items():
        slug = "".join(c if c.isalnum() else "-" for c in name)[:40]
        result[name] = summarize([cli_run(tmp, slug, flags, s, quality, env, driver) for s in seeds])
        result[name]["flags"] = flags
    return result


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def workload(name: str, fn: Callable[[], object], tiny: Callable[[], object], repeats: int) -> dict:
    """Achieved FLOP/s of fn against the replay of its own products, and where the rest of its time goes."""
    seconds = timed(fn, repeats)
    overhead = timed(tiny, repeats)
    _, matmuls = record_matmuls(fn)
    products = replay_seconds(matmuls)
    result = {
        "seconds": seconds,
        **attainment(matmuls, seconds, products),
        "split_seconds": {
            "products_at_replay_speed": products,
            "per_call_overhead": overhead,
            "elementwise_and_memory": seconds - products - overhead,
        },
    }
    log(
        f"{name}: {result['achieved_gflops']:.1f} GFLOP/s of {result['attainable_gflops']:.1f} attainable "
        f"({result['fraction_of_attainable']:.0%})"
    )
    return result


def ceiling(tmp: Path) -> dict:
    """Pretraining step, DDPM and DDIM sampling of the dino MLP and the digits U-Net on their defaults."""
    default_threads, peak = torch.get_num_threads(), {}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        peak[str(threads)] = {"matmul_2048": peak_flops_per_sec() / 1e9, "conv_3x3_64ch": conv_peak() / 1e9}
    torch.set_num_threads(default_threads)
    workloads = {**dataset_workloads("dino", 50, tmp), **dataset_workloads("digits", 5, tmp)}
    return {"threads": default_threads, "peak_gflops_by_threads": peak, "workloads": workloads}


def conv_peak() -> float:
    """FLOP/s of a large 3x3 convolution (64 channels, 32 x 32, batch 64): oneDNN's kernels, where the
    matrix products go through the BLAS."""
    x, conv = torch.randn(64, 64, 32, 32), torch.nn.Conv2d(64, 64, 3, padding=1)
    with torch.no_grad():
        _, matmuls = record_matmuls(lambda: conv(x))
    return matmuls.flops / replay_seconds(matmuls, min_seconds=0.5)


def dataset_workloads(dataset: str, repeats: int, tmp: Path) -> dict:
    """The three workloads of one data set's default run, each with its ceiling and split."""
    config = config_for({"dataset": dataset})
    run = start_run(config, tmp / f"ceiling-{dataset}", True, False)
    tiny = start_run(config_for({"dataset": dataset, "batch_size": TINY_BATCH}), tmp / "tiny", True, False)
    T = config.num_timesteps
    final_n = len(reference_draws(run.data, N, EVAL_DATA_SEED)[0])  # the final evaluation's draw
    ddim = eval_sampling(config.eval_sampling_steps, run.diffusion)

    def sample(n: int, **sampling) -> Callable[[], object]:
        return lambda: draw_samples(run.diffusion, run.ema, n, seed=0, device=run.device, **sampling)

    cases = {
        f"pretraining step (batch {config.batch_size})": (
            lambda: optimizer_step(run),
            lambda: optimizer_step(tiny),
            repeats,
        ),
        f"DDPM sampling ({final_n} samples x {T} steps)": (sample(final_n), sample(TINY_BATCH), 1),
        f"DDIM sampling ({config.eval_samples} x {ddim.get('sampling_steps', T)} steps, eta 0)": (
            sample(config.eval_samples, **ddim),
            sample(TINY_BATCH, **ddim),
            3,
        ),
    }
    return {f"{dataset}: {case}": workload(f"{dataset}: {case}", *args) for case, args in cases.items()}


def markdown_side_by_side(runs: dict[str, dict]) -> str:
    """Wall time and quality (mean, min-max over seeds) of each named configuration, then its phases."""

    def cell(s: dict, key: str, spec: str) -> str:
        return f"{format(s[key]['mean'], spec)} ({format(s[key]['min'], spec)}-{format(s[key]['max'], spec)})"

    lines = [
        "| defaults | wall s | SW2 / floor | MMD / floor |",
        "|---|---|---|---|",
        *(
            f"| {name} | {cell(s, 'wall_seconds', '.1f')} | {cell(s, 'sw2_over_floor', '.2f')} "
            f"| {cell(s, 'mmd_over_floor', '.2f')} |"
            for name, s in runs.items()
        ),
        "",
        "| phase | " + " | ".join(f"{name} s" for name in runs) + " |",
        "|---|" + "---|" * len(runs),
        *(
            f"| {p} | " + " | ".join(f"{s['phases_mean_seconds'][p]:.2f}" for s in runs.values()) + " |"
            for p in ALL_PHASES
        ),
    ]
    return "\n".join(lines)


def markdown_ceiling(c: dict) -> str:
    lines = [
        "| workload | s | GFLOP | achieved GFLOP/s | attainable (same products) | fraction | products s "
        "| per-call overhead s | elementwise / memory s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in c["workloads"].items():
        split = w["split_seconds"]
        lines.append(
            f"| {name} | {w['seconds']:.3f} | {w['flops'] / 1e9:.2f} | {w['achieved_gflops']:.1f} "
            f"| {w['attainable_gflops']:.1f} | {w['fraction_of_attainable']:.0%} "
            f"| {split['products_at_replay_speed']:.3f} | {split['per_call_overhead']:.3f} "
            f"| {split['elementwise_and_memory']:.3f} |"
        )
    return "\n".join(lines)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/benchmarks/pretrain.json")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the side-by-side runs")
    parser.add_argument("--lever-seeds", type=int, default=1, help="seeds of each lever's runs")
    parser.add_argument("--skip-levers", action="store_true")
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--device", default="cpu", help="where the side-by-side runs train (levers, ceiling: CPU)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    quality = Quality()
    result: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average_1_5_15min_before": load_before,
        "changed_defaults": changed_defaults(),
        "quality": "the run's final-evaluation draw (5,000 samples of the full chain, seed + 1) against 5,000 "
        "data points (seed 12345): sliced W2 (500 projections, seed 0) and MMD^2 (V-statistic, RBF bandwidths "
        "0.1-5, 2,000 points a side) over their floors (data seed 12346 against the same points)",
        "timing": "wall: launch to exit of `python -m rl_diffusion.cli pretrain --dataset dino` (progress bar on, "
        "torch's default threads); phases from the run's timing.json, startup = launch to pretrain()'s start, "
        "exit = pretrain()'s return to process exit",
    }
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        old, new, flow = [], [], []
        for seed in range(args.seeds):
            old.append(cli_run(tmp, "old", {**OLD_DEFAULTS, "device": args.device}, seed, quality))
            new.append(cli_run(tmp, "new", {"device": args.device}, seed, quality))
            flow.append(cli_run(tmp, "flow", {"model_type": "flow", "device": args.device}, seed, quality))
        result["old_defaults"], result["new_defaults"] = summarize(old), summarize(new)
        result["flow_new_defaults"] = summarize(flow)
        wall = {name: result[name]["wall_seconds"]["mean"] for name in ("old_defaults", "new_defaults")}
        result["new_over_old_wall"] = wall["new_defaults"] / wall["old_defaults"]
        result["flow_over_ddpm_wall"] = result["flow_new_defaults"]["wall_seconds"]["mean"] / wall["new_defaults"]
        result["markdown_side_by_side"] = markdown_side_by_side(
            {"old": result["old_defaults"], "new": result["new_defaults"], "flow": result["flow_new_defaults"]}
        )
        if not args.skip_levers:
            result["levers"] = levers(tmp, quality, list(range(args.lever_seeds)))
        if not args.skip_ceiling:
            result["ceiling"] = ceiling(tmp)
            result["markdown_ceiling"] = markdown_ceiling(result["ceiling"])
    result["load_average_1_5_15min_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print()
    print(result["markdown_side_by_side"])
    if "markdown_ceiling" in result:
        print()
        print(result["markdown_ceiling"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
