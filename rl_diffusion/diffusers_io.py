"""diffusers pipelines in and out: a local DDPM/DDIM pipeline becomes a pretrain run, and a run on it goes back.

`import_diffusers` takes over, from a directory that `save_pretrained` wrote (model_index.json, unet/,
scheduler/), the UNet2DModel's config and weights (model kind "diffusers-unet": it feeds the network
t - 1, as diffusers counts timesteps from 0), the scheduler's betas exactly (`GaussianDiffusion(betas=...)`)
and its clip_sample as `x0_range`. `export_diffusers` writes a run with a "diffusers-unet" network
(imported, possibly fine-tuned) as a DDPMPipeline with the run's betas (`trained_betas`) and clip range.
Nothing is ever downloaded: every load is `local_files_only`.

Sampling the imported run is the pipeline's sampling up to two conventions, the DDPM's last step (the
sigma floor) and DDIM's spacing of timesteps; those, the unknown data set and what the export carries:
docs/design.md, section 1.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.data import IMPORTED
from rl_diffusion.algos import AGENT_ALGOS
from rl_diffusion.checkpoint import CheckpointManager, load_run, prepare_run_dir
from rl_diffusion.diffusion import GaussianDiffusion
from rl_diffusion.errors import UserError
from rl_diffusion.models import build_model
from rl_diffusion.models.diffusers_unet import require_diffusers

KIND = "diffusers-unet"
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
# the variances of an eps-only network that are the DDPM posterior's (Ho et al. eq. 7): what the reverse step uses
VARIANCE_TYPES = ("fixed_small", "fixed_small_log")


def import_diffusers(path: Path, out: Path, overwrite: bool = False) -> Path:
    """Turn the local diffusers pipeline at `path` into the pretrain run directory `out`; returns `out`."""
    path, out = Path(path), Path(out)
    scheduler_class = _check_pipeline(path)
    diffusers = require_diffusers()
    scheduler = _load(getattr(diffusers, scheduler_class), path, "scheduler")
    _check_scheduler(scheduler.config, path)
    unet = _load(diffusers.UNet2DModel, path, "unet", low_cpu_mem_usage=False)  # the default asks for `accelerate`
    model_config = {"kind": KIND, "unet": {k: v for k, v in unet.config.items() if not k.startswith("_")}}
    model = build_model(model_config)
    model.unet.load_state_dict(unet.state_dict())
    clip = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
    diffusion = GaussianDiffusion(
        None,
        scheduler.config.num_train_timesteps,
        x0_range=None if clip is None else (-clip, clip),
        betas=scheduler.betas.double().tolist(),
    )
    prepare_run_dir(out, json.dumps({"kind": "pretrain", "imported_from": str(path)}, indent=2), overwrite)
    checkpoint = {
        "kind": "pretrain",
        "model_config": model_config,
        "diffusion_config": diffusion.config,
        "data": {"dataset": IMPORTED, "shape": [model.in_channels, model.image_size, model.image_size]},
        "model": model.state_dict(),
        "train_state": {"step": 0},  # nothing to resume: the training happened elsewhere
    }
    CheckpointManager(out).save(checkpoint, step=0)
    return out


def export_diffusers(run: Path, out: Path) -> Path:
    """Write the network and schedule of `run` as a diffusers DDPMPipeline directory `out`; returns `out`."""
    run, out = Path(run), Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already holds files; pick another --out")
    loaded = load_run(run)
    kind = loaded.checkpoint["model_config"]["kind"]
    if kind != KIND:
        raise UserError(
            f"{run} has the native '{kind}' network; only diffusers-based runs export: import a pipeline with "
            "`rl-diffusion import-diffusers PATH --out RUN` and fine-tune that run"
        )
    if loaded.config.get("algo") in AGENT_ALGOS:
        raise UserError(
            f"{run} was fine-tuned by --algo {loaded.config['algo']}, whose policy is an agent beside the network; "
            "only the network exports, so export the pretrained run"
        )
    diffusers = require_diffusers()
    diffusion = loaded.diffusion
    clip = _clip_sample_range(diffusion.x0_range, run)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=diffusion.num_timesteps,
        trained_betas=diffusion.np["betas"][1:].tolist(),
        clip_sample=clip is not None,
        clip_sample_range=1.0 if clip is None else clip,
    )
    diffusers.DDPMPipeline(unet=loaded.model.unet, scheduler=scheduler).save_pretrained(out)
    return out


def _check_pipeline(path: Path) -> str:
    """The scheduler class of the local UNet2DModel pipeline at `path`; anything else is refused in one line
    naming what is missing."""
    if not path.is_dir():
        raise UserError(f"no directory {path}; give the folder a diffusers pipeline's save_pretrained wrote")
    for name in ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json"):
        if not (path / name).is_file():
            raise UserError(f"{path} is not a diffusers pipeline: no {name}")
    unet = _read_json(path / "model_index.json").get("unet")
    if not isinstance(unet, list) or unet[-1] != "UNet2DModel":
        raise UserError(
            f"{path}: the pipeline has no UNet2DModel 'unet' (found {unet}); only DDPM/DDIM pipelines import"
        )
    scheduler_class = _read_json(path / "scheduler" / "scheduler_config.json").get("_class_name")
    if scheduler_class not in SCHEDULERS:
        raise UserError(f"{path}: scheduler {scheduler_class} is not supported; only {' and '.join(SCHEDULERS)} import")
    return scheduler_class


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def _load(cls: type, path: Path, subfolder: str, **options):
    """cls.from_pretrained of a pipeline's component, from disk only; a failure is one UserError line."""
    try:
        return cls.from_pretrained(path, subfolder=subfolder, local_files_only=True, **options)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {path / subfolder}: {first_line}") from None


def _check_scheduler(config, path: Path) -> None:
    """Refuse a scheduler whose step this project's reverse step does not take."""
    if config.prediction_type != "epsilon":
        raise UserError(f"{path}: the network predicts '{config.prediction_type}'; only eps-prediction imports")
    if config.thresholding:
        raise UserError(f"{path}: dynamic thresholding is not supported; only clip_sample is taken over")
    variance_type = config.get("variance_type", "fixed_small")  # DDIM has none: its sigma is eta's
    if variance_type not in VARIANCE_TYPES:
        raise UserError(
            f"{path}: variance_type '{variance_type}' is not supported; the reverse step uses the posterior "
            f"variance ({' or '.join(VARIANCE_TYPES)})"
        )


def _clip_sample_range(x0_range: tuple | None, run: Path) -> float | None:
    """The r of a symmetric scalar x0_range (-r, r), as diffusers' clip_sample_range; None without a range."""
    if x0_range is None:
        return None
    low, high = x0_range
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low == -high):
        raise UserError(f"{run} clips x_0 to {list(x0_range)}; diffusers clips to a symmetric [-r, r] only")
    return float(high)
