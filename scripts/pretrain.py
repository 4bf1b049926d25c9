"""Pretrain a DDPM: the same command and flags as `rl-diffusion pretrain`."""

import sys

from rl_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
