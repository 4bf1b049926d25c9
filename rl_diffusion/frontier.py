"""`rl-diffusion frontier`: mean reward against path KL to the pretrained model, one fine-tuning run per beta.

    rl-diffusion frontier --run PRETRAINED --reward NAME --kl-coefs 0.03,0.1,0.3,1 --out DIR [--jobs N] [--ray ADDRESS]
        [finetune flags]

The runs are an `ablate finetune --param kl_coef` (DIR/kl_coef=<beta>, resumable the same way, local
processes or Ray tasks).
DIR/frontier.png draws each run's (path KL, mean reward) over its epochs, its end point labelled
with beta, and the curve traced by mixing the smallest beta's network with the pretrained one at
inference time, eps = (1 - lambda) eps_pre + lambda eps_ft (`rl-diffusion sample --mix`);
DIR/frontier.json holds the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from rl_diffusion import figures
from rl_diffusion.ablate import ablate, setting_dir
from rl_diffusion.checkpoint import CheckpointManager, LoadedRun, atomic_write_text, load_run, read_run_config
from rl_diffusion.config import saved_config
from rl_diffusion.errors import UserError
from rl_diffusion.evaluation import evaluation_samples, sample_with_path_kl

MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)  # the lambdas of the mixed curve
FINAL_METRICS = ("reward_mean", "kl_to_pretrained", "diversity")  # and every numeric target_* of metrics.json


class MixedEps(nn.Module):
    """eps = (1 - mix) eps_pre + mix eps_ft: the pretrained network at mix 0, the fine-tuned one at mix 1."""

    def __init__(self, pretrained: nn.Module, finetuned: nn.Module, mix: float):
        super().__init__()
        self.pretrained, self.finetuned, self.mix = pretrained, finetuned, mix
        # what rl_diffusion.sampling.sample_shape_and_labels reads to shape a batch
        for name in ("data_dim", "in_channels", "image_size", "num_classes"):
            if hasattr(finetuned, name):
                setattr(self, name, getattr(finetuned, name))

    def forward(self, x: Tensor, t: Tensor, c: Tensor | None = None) -> Tensor:
        return (1 - self.mix) * self.pretrained(x, t, c) + self.mix * self.finetuned(x, t, c)


def load_mixed(run_dir: Path, mix: float, device: torch.device) -> tuple[LoadedRun, LoadedRun, MixedEps]:
    """The fine-tuned run, its pretrained run and their mix; a pretrain run, an SB3 agent's run (no
    fine-tuned eps network) or a mix outside [0, 1] is a UserError."""
    from rl_diffusion.algos import AGENT_ALGOS

    if not 0 <= mix <= 1:
        raise UserError(f"--mix must be in [0, 1], got {mix}")
    config = read_run_config(run_dir)
    if config.get("kind") != "finetune":
        raise UserError(
            f"--mix blends a fine-tuned network with its pretrained one; {run_dir} is a {config.get('kind')} run"
        )
    if config["algo"] in AGENT_ALGOS:
        raise UserError(
            f"--mix needs a fine-tuned eps network; {run_dir} was fine-tuned by --algo {config['algo']}, "
            "an agent steering the frozen pretrained network"
        )
    run, pretrained = load_run(run_dir, device), load_run(Path(config["run"]), device)
    return run, pretrained, MixedEps(pretrained.model, run.model, mix)


def mixed_point(run_dir: Path, mix: float, num_samples: int, seed: int, device: torch.device) -> dict[str, float]:
    """Mean reward and exact mean path KL to the pretrained model of the mixed sampler, on the chain the
    run was trained on; the mixed eps is scored as a policy, as `evaluate` scores the fine-tuned one."""
    from rewards import build_reward, finite_mean
    from rl_diffusion.finetune import FinetuneConfig
    from rl_diffusion.sampling import sample_shape_and_labels

    run, pretrained, mixed = load_mixed(run_dir, mix, device)
    cfg = saved_config(FinetuneConfig, run_dir)
    shape, c = sample_shape_and_labels(run.model, num_samples, device)
    samples, kl = sample_with_path_kl(mixed, run, pretrained, cfg, shape, c, seed, device)
    rewards = build_reward(cfg.reward, cfg.reward_args, skip_nonfinite=True)(samples, c)
    return {"mix": mix, "reward_mean": finite_mean(rewards), "kl_to_pretrained": kl.mean().item()}


def frontier(
    kl_coefs: list[float],
    out: Path,
    flags: list[str],
    jobs: int = 1,
    device: str = "cpu",
    progress: bool = True,
    ray: str | None = None,
) -> dict:
    """Run (or resume, or skip) one fine-tuning run per beta, then write frontier.json and frontier.png."""
    from rl_diffusion.algos import AGENT_ALGOS
    from rl_diffusion.distributed import resolve_device

    if not kl_coefs or min(kl_coefs) <= 0:
        raise UserError(f"--kl-coefs needs positive betas, got {','.join(map(str, kl_coefs))}")
    out = Path(out)
    ablate("finetune", "kl_coef", kl_coefs, out, flags, jobs=jobs, progress=progress, ray=ray)
    dirs = [setting_dir(out, "kl_coef", beta) for beta in kl_coefs]
    runs = {}
    for beta, run_dir in zip(kl_coefs, dirs, strict=True):
        history = CheckpointManager(run_dir).load_latest()["train_state"]["history"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        final = {
            k: v
            for k, v in metrics.items()
            if k in FINAL_METRICS or (k.startswith("target_") and isinstance(v, (int, float)))
        }
        runs[str(beta)] = {
            "run": str(run_dir),
            **final,
            "curve": {
                "kl_to_pretrained": [h["kl/to_pretrained"] for h in history],
                "reward_mean": [h["reward/mean"] for h in history],
            },
        }
    smallest = dirs[kl_coefs.index(min(kl_coefs))]
    mix = None
    smallest_config = read_run_config(smallest)
    if smallest_config["algo"] not in AGENT_ALGOS:
        # as many chains per lambda as the run's evaluation drew: lambda = 1 reproduces it
        shape = tuple(CheckpointManager(smallest).load_latest()["data"]["shape"])
        count = evaluation_samples(smallest_config.get("eval_samples", 0), shape)
        points = [mixed_point(smallest, m, count, seed=0, device=resolve_device(device)) for m in MIXES]
        mix = {"run": str(smallest), "kl_coef": min(kl_coefs), "points": points}
    summary = {"kl_coefs": kl_coefs, "runs": runs, "mix": mix}
    figures.plot_frontier(summary, out / "frontier.png")
    atomic_write_text(out / "frontier.json", json.dumps(summary, indent=2))
    return summary
