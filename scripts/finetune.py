"""Fine-tune a pretrained DDPM with RL: the same command and flags as `rl-diffusion finetune`."""

import sys

from rl_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
