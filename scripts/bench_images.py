"""Image benchmark on the 8x8 digits: time to match the data, sampling throughput, fine-tuning speed.

    python scripts/bench_images.py [--out docs/benchmarks/images.json] [--figures docs/figures]
    python scripts/bench_images.py --finetune-defaults runs/digits-prior [--old-epochs 30]

1. Runs `rl-diffusion pretrain --dataset digits` on the image defaults (2,000 steps of 128, lr 2e-3,
   T = 100, U-Net of 32 base channels, class-conditional), keeping the EMA checkpoint of every 250th
   step (--checkpoint-every 250 and enough --keep-checkpoints). Its in-loop evaluation runs at the same
   steps with only 16 samples: it is there for the TensorBoard scalars perf/wall_seconds (since the loop
   started, evaluations and checkpoints included) and perf/train_seconds (optimizer steps only) at each
   of those steps. After the run, every kept checkpoint draws 500 samples (DDPM, seed 0, labels 0..9 in
   turn) and their Frechet distance to 500 digits is computed in the digit classifier's features; the
   floor is the FD between the disjoint other 500 digits and the same 500, what a perfect sampler scores
   at this sample size. Reports the first step whose FD is within 3x the floor (or, if none is, the best
   ratio reached) with the wall time up to it. Those draws are timed: sampling throughput at T = 100.
2. Fine-tunes the final model with ddpo-is on digit_classifier digit=3 (64 chains, 4 epochs):
   denoising steps per second (sampling, scoring and update of each epoch, from the run's history),
   the share of samples the classifier calls a 3 before and after (500 samples each, same seed, same
   labels), and image grids of the first 80 of them (column j has label j):
   docs/figures/digits_before.png and docs/figures/digits_after.png. The run's own final evaluation
   (500 samples with the path KL: about 100 s on one CPU thread, longer than the 4 epochs) is skipped:
   it is not what is timed, and the share before/after is measured here instead.

With --finetune-defaults RUN (a pretrained digits run; the README uses an unconditional one), it does
only this instead: the default `finetune --reward digit_classifier --reward-arg digit=3` before and after
images got their own defaults (finetune.IMAGE_DEFAULTS: now 50 DDIM steps, 20 when it was measured, eta = 1, 128 chains,
beta = 1, lr 3e-4; before: the 2D defaults, DDPM over all T steps, 256 chains, no KL, lr 1e-3), one after the other in
this process on the same model: seconds per epoch, the reward curve, the monitors of reward hacking
(share of the digit, label entropy, distance to the nearest training digit, the run's warnings) and
grids of the last epoch's samples (docs/figures/digits_default_{before,after}_change.png). The old
defaults run --old-epochs epochs (their 30 take about 16 minutes), the new ones all 30; each run's
own final evaluation is skipped, its per-epoch monitors are what is compared.
Writes docs/benchmarks/image_finetune.json.

Everything runs in one process with torch's thread count as set (OMP_NUM_THREADS); the JSON records
it and the load average, since other jobs on the machine slow every figure down.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pretrain.data import EVAL_DATA_SEED, load_training_data, reference_draws  # noqa: E402
from pretrain.train import config_for, pretrain  # noqa: E402
from rl_diffusion import (
    figures,  # noqa: E402
    finetune,  # noqa: E402
)
from rl_diffusion.ablate import scalars  # noqa: E402
from rl_diffusion.algos import loop  # noqa: E402
from rl_diffusion.checkpoint import load_run, load_weights, read_run_config  # noqa: E402
from rl_diffusion.finetune import FinetuneConfig  # noqa: E402
from rl_diffusion.image_metrics import classifier_features, frechet_distance  # noqa: E402
from rl_diffusion.models import build_model  # noqa: E402
from rl_diffusion.models.digit_classifier import load_digit_classifier  # noqa: E402
from rl_diffusion.run import hacking_warnings, setup  # noqa: E402
from rl_diffusion.sampling import draw_samples  # noqa: E402

N = 500  # samples per FD evaluation, and digits in each reference half (the data set has 1,797)
EVAL_EVERY = 250
TARGET_RATIO = 3.0
DIGIT = 3
FT_CHAINS = 64


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="JSON (default docs/benchmarks/images.json, image_finetune.json)")
    parser.add_argument("--figures", default="docs/figures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the image default, 2000)")
    parser.add_argument("--ft-epochs", type=int, default=4, help="fine-tuning epochs")
    parser.add_argument("--finetune-defaults", metavar="RUN", help="only compare the image fine-tuning defaults")
    parser.add_argument("--old-epochs", type=int, default=30, help="--finetune-defaults: epochs of the old defaults")
    args = parser.parse_args()
    if args.finetune_defaults:
        return compare_finetune_defaults(Path(args.finetune_defaults), args)
    device = torch.device(args.device)
    load_before = os.getloadavg()
    started_all = time.perf_counter()

    flags = {
        "dataset": "digits",
        "eval_every": EVAL_EVERY,
        "eval_samples": 16,
        "checkpoint_every": EVAL_EVERY,
        "keep_checkpoints": 1000,
        "device": args.device,
    }
    if args.steps:
        flags["steps"] = args.steps
    config = config_for(flags)
    classifier = load_digit_classifier()  # trained and cached first if absent (a few seconds)
    reference, again = reference_draws(load_training_data("digits", config.seed), N, EVAL_DATA_SEED)
    reference_feats = classifier_features(torch.from_numpy(reference), classifier)[0]

    def fd(images: np.ndarray) -> float:
        return frechet_distance(classifier_features(torch.from_numpy(images), classifier)[0], reference_feats)

    def share_of_digit(images: np.ndarray) -> float:
        return float((classifier_features(torch.from_numpy(images), classifier)[1] == DIGIT).float().mean())

    floor = fd(again)
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = Path(tmp) / "digits"
        started = time.perf_counter()
        pretrain(config, pretrained, progress=False)
        pretrain_total = time.perf_counter() - started
        wall, train = (
            dict(zip(*scalars(pretrained, tag), strict=True)) for tag in ("perf/wall_seconds", "perf/train_seconds")
        )
        final_metrics = json.loads((pretrained / "metrics.json").read_text())

        # FD of every kept checkpoint, each from the same noise (seed 0) and labels; the draws are timed.
        loaded = load_run(pretrained, device)
        model = build_model(loaded.checkpoint["model_config"]).to(device).eval()
        curve, draw_seconds, samples = [], [], None
        for path in sorted((pretrained / "checkpoints").glob("step_*.pt")):
            ckpt = torch.load(path, map_location=device, weights_only=False)
            step = ckpt["train_state"]["step"]
            load_weights(model, ckpt["model"], source=str(path))
            t0 = time.perf_counter()
            samples = draw_samples(loaded.diffusion, model, N, seed=0, device=device)
            draw_seconds.append(time.perf_counter() - t0)
            value = fd(samples)
            curve.append(
                {
                    "step": step,
                    "fd": value,
                    "ratio_to_floor": value / floor,
                    "wall_seconds": wall.get(step),
                    "train_seconds": train.get(step),
                }
            )
            print(f"step {step}: FD {value:.3f} ({value / floor:.2f}x floor)", flush=True)
        before = samples  # the final checkpoint's draws: the pretrained model the fine-tuning starts from

        # Fine-tuning towards one digit.
        ft_config = FinetuneConfig(
            run=str(pretrained),
            reward="digit_classifier",
            reward_args={"digit": DIGIT},
            algo="ddpo-is",
            chains=FT_CHAINS,
            epochs=args.ft_epochs,
            device=args.device,
            final_eval=False,  # the benchmark draws its own samples (see the docstring)
        )
        run = setup(ft_config, Path(tmp) / "finetuned")
        started = time.perf_counter()
        loop.train(run, progress=False)
        ft_total = time.perf_counter() - started
        finetuned = load_run(Path(tmp) / "finetuned", device)
        after = draw_samples(finetuned.diffusion, finetuned.model, N, seed=0, device=device)

    figures_dir = Path(args.figures)
    figures.save_image_grid(before[:80], figures_dir / "digits_before.png", columns=10)
    figures.save_image_grid(after[:80], figures_dir / "digits_after.png", columns=10)
    reached = [point for point in curve if point["ratio_to_floor"] <= TARGET_RATIO]
    best = min(curve, key=lambda point: point["ratio_to_floor"])
    ft_rates = [h["perf/steps_per_sec"] for h in run.history]
    T = config.num_timesteps
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, device {args.device}",
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "gpu": "none here (CPU only); no GPU figures"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "config": {
            k: getattr(config, k)
            for k in (
                "steps",
                "batch_size",
                "lr",
                "num_timesteps",
                "beta_schedule",
                "base_channels",
                "channel_mults",
                "num_res_blocks",
                "attention",
                "class_conditional",
                "label_dropout",
                "ema_decay",
            )
        },
        "fd_method": f"{N} DDPM samples (seed 0, labels 0..9 in turn) of each EMA checkpoint vs {N} digits, "
        f"digit-classifier features; floor: FD of the disjoint other {N} digits vs the same {N}",
        "fd_floor": floor,
        "curve": curve,
        "target": f"fd <= {TARGET_RATIO:g} x floor",
        "reached_at_step": reached[0]["step"] if reached else None,
        "wall_seconds_to_target": reached[0]["wall_seconds"] if reached else None,
        "train_seconds_to_target": reached[0]["train_seconds"] if reached else None,
        "best_ratio_to_floor": best["ratio_to_floor"],
        "best_at_step": best["step"],
        "pretrain_total_seconds_with_final_metrics_and_figures": pretrain_total,
        "final_metrics_of_the_run": {
            k: final_metrics[k] for k in ("fd", "fd_floor", "kid", "kid_floor", "mode_coverage")
        },
        "sampling_images_per_sec": {f"T={T}, batch {N}, DDPM": N / float(np.median(draw_seconds))},
        "finetune": {
            "algo": "ddpo-is",
            "reward": f"digit_classifier digit={DIGIT}",
            "chains": FT_CHAINS,
            "epochs": run.epochs,
            "steps_per_chain": run.steps_per_chain,
            "denoising_steps_per_sec_per_epoch": ft_rates,
            "denoising_steps_per_sec_median": float(np.median(ft_rates)),
            "epochs_per_sec_median": float(np.median(ft_rates)) / (FT_CHAINS * run.steps_per_chain),
            "total_seconds_without_final_evaluation": ft_total,
            "reward_mean_per_epoch": [h["reward/mean"] for h in run.history],
            f"share_of_{DIGIT}s_before": share_of_digit(before),
            f"share_of_{DIGIT}s_after": share_of_digit(after),
            "share_method": f"{N} DDPM samples (seed 0, labels 0..9 in turn), classified by the digit classifier",
            "path_kl_to_pretrained_per_epoch": [h["kl/to_pretrained"] for h in run.history],
            "figures": [str(figures_dir / "digits_before.png"), str(figures_dir / "digits_after.png")],
        },
        "benchmark_total_seconds": time.perf_counter() - started_all,
    }
    out = Path(args.out or "docs/benchmarks/images.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


# The digits fine-tuning defaults before images got their own (finetune.IMAGE_DEFAULTS): the 2D ones.
OLD_IMAGE_DEFAULTS = {"sampler": "ddpm", "sampling_steps": 0, "eta": 1.0, "kl_coef": 0.0, "chains": 256, "lr": 1e-3}
MONITORS = ("reward/mean", "kl/to_pretrained", "diversity/label_entropy", "realism/nearest_data", "perf/epoch_seconds")


def compare_finetune_defaults(pretrained: Path, args: argparse.Namespace) -> int:
    """`--finetune-defaults RUN`: the old and the new image fine-tuning defaults on one model (module docstring)."""
    load_before = os.getloadavg()
    classifier = load_digit_classifier()
    results = {}
    for name, overrides, epochs in (("before", OLD_IMAGE_DEFAULTS, args.old_epochs), ("after", {}, 30)):
        config = finetune.config_for(
            {
                "run": str(pretrained),
                "reward": "digit_classifier",
                "reward_args": {"digit": DIGIT},
                "epochs": epochs,
                "device": args.device,
                "final_eval": False,  # the benchmark reads the last epoch's samples (module docstring)
                **overrides,
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            run = setup(config, Path(tmp) / "finetuned")
            started = time.perf_counter()
            loop.train(run, progress=False)
            total = time.perf_counter() - started
        last = run.frames[-1][1]
        labels = classifier_features(torch.from_numpy(last), classifier)[1]
        path = Path(args.figures) / f"digits_default_{name}_change.png"
        figures.save_image_grid(last[:80], path, columns=10)
        results[name] = {
            "config": {k: getattr(config, k) for k in ("sampler", "sampling_steps", "eta", "kl_coef", "chains", "lr")},
            "epochs": run.epochs,
            "seconds_total_without_final_evaluation": total,
            "seconds_per_epoch_median": float(np.median([h["perf/epoch_seconds"] for h in run.history])),
            "per_epoch": {tag: [h[tag] for h in run.history] for tag in MONITORS},
            f"share_of_{DIGIT}s_first_epoch": float(
                (classifier_features(torch.from_numpy(run.frames[0][1]), classifier)[1] == DIGIT).float().mean()
            ),
            f"share_of_{DIGIT}s_last_epoch": float((labels == DIGIT).float().mean()),
            "warnings": hacking_warnings(run.history, run.eval_data),
            "figure": str(path),
        }
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "per_epoch"}), flush=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, device {args.device}",
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "pretrained_run": {
            k: v
            for k, v in read_run_config(pretrained).items()
            if k in ("dataset", "class_conditional", "steps", "seed")
        },
        "reward": f"digit_classifier digit={DIGIT}, algo ddpo-is",
        "shares_method": "the epoch's own samples (first epoch: the pretrained model's), read by the digit classifier",
        **results,
    }
    out = Path(args.out or "docs/benchmarks/image_finetune.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
