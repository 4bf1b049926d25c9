"""rl-diffusion: pretrain DDPMs and fine-tune them with reinforcement learning.

Importing the package registers the Gymnasium environment `RLDiffusion/Denoise-v0`
(by string entry points, so nothing heavy is imported here).
"""

import gymnasium

__version__ = "0.1.0"
ENV_ID = "RLDiffusion/Denoise-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(
        ENV_ID,
        entry_point="rl_diffusion.env:DenoisingEnv",
        vector_entry_point="rl_diffusion.env:DenoisingVectorEnv",
    )
