"""rl-diffusion: pretrain DDPMs and fine-tune them with reinforcement learning."""

__version__ = "0.1.0"
