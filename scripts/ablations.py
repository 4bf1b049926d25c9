"""Run the ablation studies of docs/ablations.md and copy their figures there.

    python scripts/ablations.py [--runs runs/ablations] [--only lr,kl_coef] [--jobs 1]

Each study is one `rl-diffusion ablate` call (resumable: rerun to finish an interrupted
study). Pretraining studies vary one setting of the default dino run; fine-tuning studies
vary one setting of a DDPO-IS run (disc reward, DDIM 50 steps) from the default dino model.
Budgets are cut to fit 2 CPU cores: pretraining runs take 1,500 steps (half the default),
fine-tuning runs 15 epochs.
"""

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

from rl_diffusion.cli import main as cli  # noqa: E402

PRETRAIN_STUDIES = {
    "lr": "3e-4,1e-3,3e-3,1e-2",
    "dataset": "dino,moons,circle,line",
    "num_timesteps": "50,100,200,1000",
    "beta_schedule": "linear,quadratic,cosine,sigmoid",
    "hidden_size": "32,64,128,256",
    "hidden_layers": "1,2,3,5",
    "time_embedding": "sinusoidal,learnable,linear,zero",
    "input_embedding": "sinusoidal,identity,learnable",
}
FINETUNE_STUDIES = {
    "algo": "ddpo-sf,ddpo-is,rwr,sb3-ppo",
    "kl_coef": "0,0.03,0.1,1",
    "clip_range": "0.05,0.2,0.5",
    "chains": "64,256,1024",
}
FINETUNE_FLAGS = [
    "--reward",
    "in_region",
    "--reward-arg",
    "shape=disc",
    "--reward-arg",
    "center=[2.0, -1.0]",
    "--reward-arg",
    "radius=1.0",
    "--sampler",
    "ddim",
    "--sampling-steps",
    "50",
    "--epochs",
    "15",
    "--rwr-temperature",
    "0.1",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/ablations", help="where the run directories go")
    parser.add_argument("--docs", default="docs/ablations", help="where the figures are copied")
    parser.add_argument("--only", default="", help="comma-separated study names (default: all)")
    parser.add_argument("--jobs", default="1")
    args = parser.parse_args()
    runs, docs = Path(args.runs), Path(args.docs)
    only = set(filter(None, args.only.split(",")))
    studies = [("pretrain", k, v) for k, v in PRETRAIN_STUDIES.items()] + [
        ("finetune", k, v) for k, v in FINETUNE_STUDIES.items()
    ]
    pretrained = runs / "pretrained_dino"
    for kind, param, values in studies:
        if only and param not in only:
            continue
        flags = ["--steps", "1500", "--eval-every", "250", "--eval-samples", "1000"]
        if param != "dataset":
            flags += ["--dataset", "dino"]
        if kind == "finetune":
            if (
                not (pretrained / "metrics.json").exists()
                and cli(["pretrain", "--out", str(pretrained), "--overwrite", "--quiet"]) != 0
            ):
                return 2
            flags = ["--run", str(pretrained), *FINETUNE_FLAGS]
        out = runs / f"{kind}_{param}"
        print(f"== {kind} {param}: {values}", flush=True)
        if (
            cli(["ablate", kind, "--param", param, "--values", values, "--out", str(out), "--jobs", args.jobs, *flags])
            != 0
        ):
            return 2
        target = docs / f"{kind}_{param}"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("grid.png", "curves.png", "kl.png", "ablation.json"):
            if (out / name).exists():
                shutil.copy(out / name, target / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
