"""`rl-diffusion ablate`: one hyperparameter, several values, one ordinary run directory each, one figure.

    rl-diffusion ablate pretrain --param lr --values 1e-3,3e-3 --out ablations/lr [pretrain flags]
    rl-diffusion ablate finetune --param kl_coef --values 0,0.1 --run PRETRAINED --out ablations/kl [finetune flags]

Each setting runs as `rl-diffusion pretrain|finetune` in its own process (`--jobs N` runs N
at once), in OUT/<param>=<value>. A setting whose metrics.json exists is complete and
skipped; one with checkpoints is resumed; so rerunning an interrupted ablation finishes
it. `--ray ADDRESS` hands the same commands to a Ray cluster instead (`run_commands`).
Then OUT/grid.png (rows = values, columns = points during training, each cell the
samples of that moment) and OUT/curves.png (the metric against training steps) are drawn,
and OUT/ablation.json sums the numbers up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_diffusion import figures
from rl_diffusion.checkpoint import CheckpointManager, atomic_write_text
from rl_diffusion.config import finite_float
from rl_diffusion.errors import UserError, nearest

MAX_COLUMNS = 6


def parse_values(configs: list[type], param: str, values: str) -> list:
    """'a,b,c' as the type of the field `param` of one of the config dataclasses (finetune: the config and each
    algorithm's settings); unknown field -> UserError with suggestions."""
    types = {f.name: str(f.type) for cls in configs for f in dataclasses.fields(cls)}
    kinds = {
        "int": int,
        "float": finite_float(f"--values for {param}"),
        "str": str,
        "bool": lambda v: v.lower() in ("1", "true", "yes"),
    }
    if types.get(param) not in kinds or param in ("run", "device"):  # a dict (reward_args, ...) takes no one value
        raise UserError(f"--param '{param}' is not an ablatable setting{nearest(param, types)}")
    kind = kinds[types[param]]
    items = [v.strip() for v in values.split(",") if v.strip()]
    if len(items) < 1:
        raise UserError("--values needs at least one value, comma-separated")
    try:
        return [kind(v) for v in items]
    except ValueError as e:
        raise UserError(f"--values for {param}: {e}") from None


def setting_dir(out: Path, param: str, value) -> Path:
    return out / f"{param}={value}"


def setting_command(kind: str, run_dir: Path, param: str, value, flags: list[str]) -> list[str] | None:
    """The `rl-diffusion` arguments that run (or resume) one setting; None if it is complete."""
    if (run_dir / "metrics.json").exists():
        return None
    if CheckpointManager(run_dir).paths():
        return [kind, "--resume", str(run_dir), "--quiet"]
    return [kind, "--out", str(run_dir), "--overwrite", "--quiet", *flags, f"--{param.replace('_', '-')}", str(value)]


def run_command(args: list[str], threads: int, cwd: str) -> tuple[int, str]:
    """`python -m rl_diffusion.cli ARGS` in `cwd` on `threads` threads; (exit status, last stderr line)."""
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}  # a thread count the user set wins
    proc = subprocess.run(
        [sys.executable, "-m", "rl_diffusion.cli", *args], capture_output=True, text=True, env=env, cwd=cwd
    )
    return proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]


def run_commands(commands: list[list[str]], jobs: int, ray: str | None = None) -> list[tuple[int, str]]:
    """Run every command, `jobs` at once on this machine's cores, or as Ray tasks when `ray` names a cluster.

    Each run takes this machine's cores / jobs threads. A Ray task declares that many CPUs (at most a
    node's), so Ray runs as many at once as the cluster's free CPUs hold. Relative paths in the
    commands resolve against this process's working directory on whichever node runs them.
    """
    if not commands:
        return []
    threads, cwd = max(1, (os.cpu_count() or 1) // jobs), os.getcwd()
    if ray is None:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return list(pool.map(lambda args: run_command(args, threads, cwd), commands))
    with ray_cluster(ray) as ray_module:
        largest_node = max(node["Resources"].get("CPU", 0) for node in ray_module.nodes() if node["Alive"])
        threads = max(1, min(threads, int(largest_node)))
        task = ray_module.remote(num_cpus=threads)(run_command)
        return ray_module.get([task.remote(args, threads, cwd) for args in commands])


@contextlib.contextmanager
def ray_cluster(address: str):
    """Ray, connected to the cluster `address` names for the duration: `auto` (the cluster `ray start` runs on
    this machine), `local` (a fresh one-machine instance, stopped afterwards) or HOST:PORT / ray://HOST:PORT.
    A process that is already connected (a notebook, a test) keeps its connection."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install -e .[ray]") from None
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(
            address=None if address == "local" else address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    except ConnectionError as e:
        raise UserError(
            f"--ray {address}: no Ray cluster reached ({e}); start one with `ray start --head`, "
            "or pass --ray local for a one-machine instance"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []
    return [e.step for e in events], [e.value for e in events]


def ablate(
    kind: str,
    param: str,
    values: list,
    out: Path,
    flags: list[str],
    jobs: int = 1,
    progress: bool = True,
    ray: str | None = None,
) -> dict:
    """Run every setting (as Ray tasks with `ray`), then draw the grid and the curves; returns the summary
    written to ablation.json."""
    if kind not in ("pretrain", "finetune"):
        raise UserError(f"ablate takes pretrain or finetune, got '{kind}'")
    if jobs < 1:
        raise UserError(f"--jobs must be positive, got {jobs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = [setting_dir(out, param, v) for v in values]
    commands = {d: setting_command(kind, d, param, v, flags) for d, v in zip(dirs, values, strict=True)}
    pending = [d for d, args in commands.items() if args is not None]
    ran = dict(zip(pending, run_commands([commands[d] for d in pending], jobs, ray), strict=True))
    results = [(d, *ran.get(d, (0, "complete, skipped"))) for d in dirs]
    for run_dir, code, last in results:
        if progress:
            print(f"{run_dir.name}: {'ok' if code == 0 else 'failed'} ({last})", file=sys.stderr)
    failed = [(d, last) for d, code, last in results if code != 0]
    if failed:
        raise UserError(f"{len(failed)} setting(s) failed, first {failed[0][0].name}: {failed[0][1]}")
    return draw_grid(kind, param, values, dirs, out)


def draw_grid(kind: str, param: str, values: list, dirs: list[Path], out: Path) -> dict:
    """grid.png, curves.png (and kl.png for fine-tuning) and ablation.json from finished setting directories."""
    from pretrain.data import EVAL_DATA_SEED, data_of_checkpoint, reference_draws

    rows, histories, summary = [], {}, {"kind": kind, "param": param, "values": values, "settings": {}}
    for value, run_dir in zip(values, dirs, strict=True):
        ckpt = CheckpointManager(run_dir).load_latest()
        frames = ckpt["train_state"]["frames"]
        picks = np.unique(np.linspace(0, len(frames) - 1, min(MAX_COLUMNS, len(frames))).round().astype(int))
        data, _ = reference_draws(data_of_checkpoint(ckpt["data"]), 1000, EVAL_DATA_SEED)
        rows.append((f"{param}={value}", [frames[i] for i in picks], data))
        state = ckpt["train_state"]
        histories[f"{param}={value}"] = state.get("history", [])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        summary["settings"][str(value)] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    summary["cells"] = figures.plot_grid(rows, out / "grid.png", title=f"{kind}: {param}")
    if kind == "pretrain":
        curves = {f"{param}={v}": scalars(d, "eval/sw2") for v, d in zip(values, dirs, strict=True)}
        figures.plot_curves(curves, out / "curves.png", "step", "sliced W2 to the data", f"{kind}: {param}", log_y=True)
    else:
        for tag, name in (("reward/mean", "curves.png"), ("kl/to_pretrained", "kl.png")):
            curves = {label: ([h["epoch"] for h in hist], [h[tag] for h in hist]) for label, hist in histories.items()}
            figures.plot_curves(curves, out / name, "epoch", tag, f"{kind}: {param}")
    atomic_write_text(out / "ablation.json", json.dumps(summary, indent=2))
    return summary
