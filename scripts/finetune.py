"""Fine-tune a pretrained DDPM with RL: the same command and flags as `rl-diffusion finetune`."""

import os
import sys

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

from rl_diffusion.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
