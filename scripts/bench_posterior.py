"""Posterior sampling on the digits: the relative trajectory balance paper's image task at CPU scale.

    python scripts/bench_posterior.py --run runs/digits-prior [--runs ddpo-is@1,ddpo-is@0,rtb@1,draft@1]
    python scripts/bench_posterior.py --run runs/digits-prior --digits 3 --out docs/benchmarks/digit3.json

An unconditional digits prior p_pre, the reward r(x) = log p(asked | x) of the digit classifier
(`digit_classifier digit=[0,2,4,6,8]` for --digits 0,2,4,6,8, the even digits) and beta = 1: the
KL-regularised optimum p_pre(x) p(asked | x) / Z is the prior restricted to the asked digits, in the
prior's own proportions and with its own variety. Each entry ALGO@BETA of --runs fine-tunes the prior
at that beta on the algorithm's image defaults (finetune.IMAGE_DEFAULTS: 50 DDIM steps with eta = 1,
128 chains, 30 epochs, under the algorithm's own), then draws --num-samples samples on the run's own
chain and reports, beside the prior's:

- E[log r] (0 when every sample is read as an asked digit) and the mean exact path KL to the prior;
- the Frechet distance (digit-CNN features) to half of the real asked digits, with its floor: the
  other half against the same half, what a perfect sampler of those digits scores at that size;
- the label entropy of the samples (nats; log 5 = 1.61 for five digits in equal shares) and the
  share read as an asked digit;
- the total-variation distance between the samples' digit distribution and the target's. The
  target's is the prior's, importance-weighted: --pool prior samples, each read as a digit and
  weighted by r = p(asked | x), so q(k) = sum_i w_i [label_i = k] / sum_i w_i;
- the variety within each asked digit: the mean pairwise distance of the samples read as that digit,
  over that of the real digits of it (metrics.within_class_diversity: 1 is the data's variety) and
  over the target's (the weighted pool's), averaged with the samples' shares.

ddpo-is without KL is the paper's collapse case (their Table 2: E[log r] near 0, one digit);
the KL-regularised methods should keep the even digits' variety. Any grey-image prior works:
pretrain one on MNIST (`--dataset mnist --data-root DIR --image-size 32 --no-class-conditional`)
and pass it as --run. Writes docs/benchmarks/posterior.json and a grid of each run's samples,
docs/figures/posterior_<algo>_beta<beta>.png (digit<D>_... for other --digits). Entries already in
--out are kept and not run again, so a second call with more --runs adds them.
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

from pretrain.data import data_of_checkpoint  # noqa: E402
from rewards import build_reward  # noqa: E402
from rl_diffusion import figures, finetune  # noqa: E402
from rl_diffusion.algos import trainer  # noqa: E402
from rl_diffusion.checkpoint import load_run, read_run_config  # noqa: E402
from rl_diffusion.config import saved_config  # noqa: E402
from rl_diffusion.evaluation import sample_with_path_kl  # noqa: E402
from rl_diffusion.image_metrics import classifier_features, frechet_distance  # noqa: E402
from rl_diffusion.metrics import entropy, within_class_diversity  # noqa: E402
from rl_diffusion.models.digit_classifier import load_digit_classifier  # noqa: E402
from rl_diffusion.run import setup  # noqa: E402
from rl_diffusion.sampling import draw_samples, sample_shape_and_labels  # noqa: E402


def label_shares(labels: torch.Tensor, weights: torch.Tensor | None = None) -> np.ndarray:
    """Fraction of (weighted) samples read as each of the 10 digits."""
    weights = torch.ones(len(labels), dtype=torch.float64) if weights is None else weights.double()
    shares = torch.zeros(10, dtype=torch.float64).index_add_(0, labels.cpu(), weights.cpu())
    return (shares / shares.sum()).numpy()


def setting_value(text: str):
    """A --set value: JSON (numbers, lists, true), else the text itself (sampler=ddpm)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="an unconditional pretrained run on grey digit images")
    parser.add_argument("--runs", default="ddpo-is@1,ddpo-is@0,rtb@1,draft@1", help="ALGO@BETA entries")
    parser.add_argument("--digits", default="0,2,4,6,8", help="the asked digits: the reward is log p(asked | x)")
    parser.add_argument("--epochs", type=int, help="default: the algorithm's own on images")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FLAG=VALUE", help="a finetune setting for every run (JSON value)"
    )
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--pool", type=int, default=4000, help="prior samples importance-weighted into the target")
    parser.add_argument("--out", default="docs/benchmarks/posterior.json")
    parser.add_argument("--figures", default="docs/figures")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    started_all, load_before = time.perf_counter(), os.getloadavg()
    prior = load_run(Path(args.run), device)
    if prior.checkpoint["model_config"].get("num_classes"):
        print("error: --run must be an unconditional prior (pretrain --no-class-conditional)", file=sys.stderr)
        return 2
    classifier = load_digit_classifier().to(device)
    asked = [int(d) for d in args.digits.split(",")]
    prefix = "posterior" if args.digits == "0,2,4,6,8" else "digit" + "".join(map(str, asked))  # figures' names
    if bad := [item for item in args.set if "=" not in item]:
        print(f"error: --set takes FLAG=VALUE, got {bad[0]!r}", file=sys.stderr)
        return 2
    settings = {k.replace("-", "_"): setting_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    spec = {"reward": "digit_classifier", "reward_args": {"digit": asked}}
    reward = build_reward(spec["reward"], spec["reward_args"])

    def read(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return classifier_features(images.float().cpu(), classifier)

    data = data_of_checkpoint(prior.checkpoint["data"])
    real = data.x[torch.isin(data.labels, torch.tensor(asked))]
    real = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))]
    half = len(real) // 2
    reference_feats, again_feats = read(real[:half])[0], read(real[half : 2 * half])[0]
    real_labels = read(real)[1]
    fd_floor = frechet_distance(again_feats, reference_feats)

    def report(samples: torch.Tensor, kl: torch.Tensor | None, target: dict) -> dict:
        feats, labels = read(samples)
        shares = label_shares(labels)
        keep = torch.isin(labels, torch.tensor(asked))
        return {
            "mean_log_r": float(reward(samples).mean()),
            "path_kl": None if kl is None else float(kl.mean()),
            "fd_to_asked": frechet_distance(feats[:half], reference_feats),
            "fd_floor": fd_floor,
            "label_entropy": entropy(shares),
            "share_asked": float(shares[asked].sum()),
            "tv_to_target": float(0.5 * np.abs(shares - target["shares"]).sum()),
            "digit_shares": shares.round(4).tolist(),
            "within_class_vs_real": within_class_diversity(samples[keep], labels[keep], real, real_labels),
            "within_class_vs_target": within_class_diversity(
                samples[keep], labels[keep], target["resampled"], target["resampled_labels"]
            ),
        }

    earlier = json.loads(Path(args.out).read_text())["results"] if Path(args.out).exists() else {}
    with tempfile.TemporaryDirectory() as work:
        results, target = dict(earlier), None
        for entry in args.runs.split(","):
            if entry in earlier:
                continue
            algo, beta = entry.split("@")
            flags = {"run": args.run, **spec, "algo": algo, "kl_coef": float(beta)}
            flags |= {} if args.epochs is None else {"epochs": args.epochs}
            flags |= settings
            config = finetune.config_for({**flags, "device": args.device})
            out = Path(work) / entry
            started = time.perf_counter()
            run = setup(config, out)
            trainer(algo)(run, progress=False)
            seconds = time.perf_counter() - started
            cfg, loaded = saved_config(finetune.FinetuneConfig, out), load_run(out, device)
            shape, c = sample_shape_and_labels(loaded.model, args.num_samples, device)
            if target is None:  # the prior on the same chain: its samples, and the target by importance weights
                pool = torch.from_numpy(
                    draw_samples(prior.diffusion, prior.model, args.pool, 1, device, **cfg.sampling)
                )
                with torch.no_grad():
                    weights = reward(pool).exp()
                pool_labels = read(pool)[1]
                # the target's own draws, for its variety: the pool resampled by weight, each sample once
                kept = torch.multinomial(weights.double(), len(pool), generator=torch.Generator().manual_seed(0))
                kept = kept.unique()
                target = {
                    "shares": label_shares(pool_labels, weights),
                    "resampled": pool[kept],
                    "resampled_labels": pool_labels[kept],
                }
                results["prior"] = report(pool[: args.num_samples], None, target)
                results["target"] = {
                    "digit_shares": target["shares"].round(4).tolist(),
                    "label_entropy": entropy(target["shares"]),
                    "importance_ess": float(weights.sum() ** 2 / (weights**2).sum()),
                    "within_class_vs_real": within_class_diversity(
                        target["resampled"], target["resampled_labels"], real, real_labels
                    ),
                }
                figures.save_image_grid(pool[:80].cpu().numpy(), Path(args.figures) / f"{prefix}_prior.png", 10)
            samples, kl = sample_with_path_kl(loaded.model, loaded, prior, cfg, shape, c, 0, device)
            warnings = json.loads((out / "metrics.json").read_text()).get("warnings", [])
            results[entry] = {**report(samples, kl, target), "seconds": seconds, "epochs": run.epochs}
            results[entry]["warnings"] = warnings
            name = f"{prefix}_{algo}_beta{beta}.png"
            figures.save_image_grid(samples[:80].cpu().numpy(), Path(args.figures) / name, 10)
            print(entry, json.dumps(results[entry]), flush=True)

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads, device {args.device}",
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "prior_run": {k: v for k, v in read_run_config(Path(args.run)).items() if k in ("dataset", "steps", "seed")},
        "reward": f"digit_classifier digit={asked}: log p(asked | x)",
        "settings": settings,
        "chain": {k: finetune.IMAGE_DEFAULTS[k] for k in ("sampler", "sampling_steps", "eta", "chains")},
        "results": results,
        "seconds_total": time.perf_counter() - started_all,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    header = "| run | E[log r] | path KL | FD (floor) | label entropy | asked | TV to target | variety: real, target |"
    print(header + "\n|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if name == "target":
            continue
        kl = "-" if r["path_kl"] is None else f"{r['path_kl']:.1f}"
        print(
            f"| {name} | {r['mean_log_r']:.3f} | {kl} | {r['fd_to_asked']:.2f} ({r['fd_floor']:.2f}) | "
            f"{r['label_entropy']:.2f} | {r['share_asked']:.3f} | {r['tv_to_target']:.3f} | "
            f"{r.get('within_class_vs_real', float('nan')):.2f}, {r.get('within_class_vs_target', float('nan')):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
