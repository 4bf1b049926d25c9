"""The fine-tuning algorithms (`rl-diffusion finetune --algo NAME`), one module per family.

Native algorithms are `Algorithm` subclasses (base.py) that hold only their update rule; the
epoch loop that samples, scores, logs, checkpoints and stops is written once, in loop.py.
Adding one: write a module with an `Algorithm` subclass and add one line to NATIVE below
(docs/design.md, section 7). The sb3 family runs stable-baselines3's own loop (`train` in sb3.py
and agents.py) over the same run directory, logging and checkpoints.

This module imports nothing: each algorithm is loaded when named, so the registry costs nothing and
sits below everything that looks a name up in it (the config, the run's services, evaluation).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

NATIVE = {
    "ddpo-sf": "rl_diffusion.algos.ddpo:ScoreFunction",
    "ddpo-is": "rl_diffusion.algos.ddpo:ImportanceSampling",
    "flow-grpo": "rl_diffusion.algos.grpo:FlowGRPO",
    "rwr": "rl_diffusion.algos.rwr:RewardWeightedRegression",
    "awm": "rl_diffusion.algos.awm:AdvantageWeightedMatching",
    "nft": "rl_diffusion.algos.nft:DiffusionNFT",
    "adjoint": "rl_diffusion.algos.adjoint:AdjointMatching",
    "rtb": "rl_diffusion.algos.rtb:RelativeTrajectoryBalance",
    "draft": "rl_diffusion.algos.draft:DRaFT",
    "iw-distill": "rl_diffusion.algos.iw_distill:ImportanceWeightedDistillation",
}
AGENT_ALGOS = ("sb3-sac", "sb3-td3", "sb3-a2c", "sb3-ppo-mlp")  # SB3's MultiInputPolicy on the residual or noise env
SB3 = {"sb3-ppo": "rl_diffusion.algos.sb3", **dict.fromkeys(AGENT_ALGOS, "rl_diffusion.algos.agents")}
ALGOS = (*NATIVE, *SB3)
TRAINERS = {**dict.fromkeys(NATIVE, "rl_diffusion.algos.loop"), **SB3}  # --algo -> the module whose train() runs it


def algorithm(name: str):
    """The Algorithm subclass of a native --algo."""
    module, cls = NATIVE[name].split(":")
    return getattr(importlib.import_module(module), cls)


def trainer(name: str) -> Callable:
    """train(run, resume, progress) -> metrics of any --algo: the shared epoch loop, or SB3's own loop for sb3-*."""
    return importlib.import_module(TRAINERS[name]).train
