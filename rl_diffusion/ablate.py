"""`rl-diffusion ablate`: one hyperparameter, several values, one ordinary run directory each, one figure.

    rl-diffusion ablate pretrain --param lr --values 1e-3,3e-3 --out ablations/lr [pretrain flags]
    rl-diffusion ablate finetune --param kl_coef --values 0,0.1 --run PRETRAINED --out ablations/kl [finetune flags]

Each setting runs as `rl-diffusion pretrain|finetune` in its own process (`--jobs N` runs N
at once), in OUT/<param>=<value>. A setting whose metrics.json exists is complete and
skipped; one with checkpoints is resumed; so rerunning an interrupted ablation finishes
it. Then OUT/grid.png (rows = values, columns = points during training, each cell the
samples of that moment) and OUT/curves.png (the metric against training steps) are drawn,
and OUT/ablation.json sums the numbers up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_diffusion import figures
from rl_diffusion.checkpoint import CheckpointManager, atomic_write_text
from rl_diffusion.errors import UserError, nearest

MAX_COLUMNS = 6


def parse_values(cls: type, param: str, values: str) -> list:
    """'a,b,c' as the config field's type; unknown field -> UserError with suggestions."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if param not in fields or param in ("run", "reward_args", "device"):
        raise UserError(f"--param '{param}' is not an ablatable setting{nearest(param, fields)}")
    kind = {"int": int, "float": float, "str": str, "bool": lambda v: v.lower() in ("1", "true", "yes")}[
        str(fields[param].type)
    ]
    items = [v.strip() for v in values.split(",") if v.strip()]
    if len(items) < 1:
        raise UserError("--values needs at least one value, comma-separated")
    try:
        return [kind(v) for v in items]
    except ValueError as e:
        raise UserError(f"--values for {param}: {e}") from None


def setting_dir(out: Path, param: str, value) -> Path:
    return out / f"{param}={value}"


def run_setting(kind: str, run_dir: Path, param: str, value, flags: list[str], threads: int) -> tuple[Path, int, str]:
    """Run (or resume, or skip) one setting in a subprocess; returns (dir, exit status, last stderr line)."""
    if (run_dir / "metrics.json").exists():
        return run_dir, 0, "complete, skipped"
    if CheckpointManager(run_dir).paths():
        args = [kind, "--resume", str(run_dir), "--quiet"]
    else:
        args = [
            kind,
            "--out",
            str(run_dir),
            "--overwrite",
            "--quiet",
            *flags,
            f"--{param.replace('_', '-')}",
            str(value),
        ]
    env = {"OMP_NUM_THREADS": str(threads), **os.environ}  # a thread count the user set wins
    proc = subprocess.run([sys.executable, "-m", "rl_diffusion.cli", *args], capture_output=True, text=True, env=env)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return run_dir, proc.returncode, last


def scalars(run_dir: Path, tag: str) -> tuple[list[int], list[float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []
    return [e.step for e in events], [e.value for e in events]


def ablate(
    kind: str, param: str, values: list, out: Path, flags: list[str], jobs: int = 1, progress: bool = True
) -> dict:
    """Run every setting, then draw the grid and the curves; returns the summary written to ablation.json."""
    if kind not in ("pretrain", "finetune"):
        raise UserError(f"ablate takes pretrain or finetune, got '{kind}'")
    if jobs < 1:
        raise UserError(f"--jobs must be positive, got {jobs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    dirs = [setting_dir(out, param, v) for v in values]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(
            pool.map(lambda dv: run_setting(kind, dv[0], param, dv[1], flags, threads), zip(dirs, values, strict=True))
        )
    for run_dir, code, last in results:
        if progress:
            print(f"{run_dir.name}: {'ok' if code == 0 else 'failed'} ({last})", file=sys.stderr)
    failed = [(d, last) for d, code, last in results if code != 0]
    if failed:
        raise UserError(f"{len(failed)} setting(s) failed, first {failed[0][0].name}: {failed[0][1]}")
    return draw(kind, param, values, dirs, out)


def draw(kind: str, param: str, values: list, dirs: list[Path], out: Path) -> dict:
    """grid.png, curves.png (and kl.png for fine-tuning) and ablation.json from finished setting directories."""
    from pretrain.data import data_of_checkpoint, reference_draws
    from pretrain.train import EVAL_DATA_SEED

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
