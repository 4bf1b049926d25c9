"""The demo behind `make demo`: pretrain on dino, evaluate, fine-tune with RL, report.

    python scripts/demo.py [--runs runs]

1. pretrains a DDPM on the Datasaurus dino (the defaults of `rl-diffusion pretrain`),
2. fine-tunes it with DDPO-IS towards a disc region, regularised by the exact path KL,
3. prints the reward before/after, the KL to the pretrained model and where everything is.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

from rl_diffusion.cli import main as cli  # noqa: E402

DEMO_REWARD = [
    "--reward",
    "in_region",
    "--reward-arg",
    "shape=disc",
    "--reward-arg",
    "center=[2.0, -1.0]",
    "--reward-arg",
    "radius=1.0",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs", help="folder for the run directories")
    args = parser.parse_args()
    runs = Path(args.runs)
    pretrained, finetuned = runs / "demo_pretrain_dino", runs / "demo_finetune_dino"

    print("== 1/2 pretraining a DDPM on dino", flush=True)
    if cli(["pretrain", "--dataset", "dino", "--out", str(pretrained), "--overwrite"]) != 0:
        return 2
    print("== 2/2 fine-tuning it with DDPO-IS towards a disc (kl_coef 0.1)", flush=True)
    if (
        cli(
            [
                "finetune",
                "--run",
                str(pretrained),
                "--out",
                str(finetuned),
                "--overwrite",
                "--algo",
                "ddpo-is",
                *DEMO_REWARD,
                "--kl-coef",
                "0.1",
                "--sampler",
                "ddim",
                "--sampling-steps",
                "50",
                "--epochs",
                "30",
            ]
        )
        != 0
    ):
        return 2
    quality = json.loads((pretrained / "metrics.json").read_text())
    rl = json.loads((finetuned / "metrics.json").read_text())
    print("\n== summary")
    print(
        f"pretraining: sliced W2 / spread {quality['sw2_over_spread']:.3f} "
        f"(floor {quality['sw2_floor_over_spread']:.3f})"
    )
    print(
        f"fine-tuning: mean reward {rl['reward_mean_pretrained']:.3f} -> {rl['reward_mean']:.3f}, "
        f"path KL to pretrained {rl['kl_to_pretrained']:.2f} nats, "
        f"diversity {rl['diversity_pretrained']:.2f} -> {rl['diversity']:.2f}"
    )
    if "target_sw2" in rl:
        print(
            f"distance to the KL-regularised optimum p_data exp(r / 0.1) / Z (exact samples): "
            f"sliced W2 {rl['target_sw2_pretrained']:.3f} "
            f"(pretrained) -> {rl['target_sw2']:.3f} (fine-tuned), floor {rl['target_sw2_floor']:.3f}; MMD^2 "
            f"{rl['target_mmd_pretrained']:.4f} -> {rl['target_mmd']:.4f}, floor {rl['target_mmd_floor']:.4f}; "
            f"optimum's mean reward {rl['target_reward_mean']:.3f}"
        )
        print(
            f"the pretrained model against its own data (the yardstick): sliced W2 {rl['pretrained_data_sw2']:.3f}, "
            f"floor {rl['pretrained_data_sw2_floor']:.3f}; samples beyond {rl['far_radius']:.1f} from the origin: "
            f"{rl['far_fraction']:.2%} (pretrained {rl['far_fraction_pretrained']:.2%})"
        )
    print(f"figures: {pretrained / 'figures'} and {finetuned / 'figures'}")
    print(f"TensorBoard: tensorboard --logdir {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
