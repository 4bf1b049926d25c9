"""One fine-tuning run on this process's rank; launched by test_distributed.py, alone or under torchrun.

    python tests/ddp_finetune_worker.py PRETRAINED RUN_DIR DUMP_DIR [FLAG=VALUE ...]

Runs `setup` + `loop.train` as `rl-diffusion finetune` does, then saves what this rank saw (its
logged history and its policy's parameters) to DUMP_DIR/rank<R>.pt, so the test can compare
ranks with each other and with a one-process run.
"""

import json
import sys
from pathlib import Path

import torch

from rl_diffusion import distributed
from rl_diffusion.algos import loop
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.run import setup

pretrained, run_dir, dump_dir, *overrides = sys.argv[1:]
config = FinetuneConfig(run=pretrained, **{k: json.loads(v) for k, v in (o.split("=", 1) for o in overrides)})
s = setup(config, Path(run_dir))
loop.train(s, progress=False)
torch.save(
    {"history": s.history, "policy": s.policy.state_dict(), "world_size": s.ranks.world_size},
    Path(dump_dir) / f"rank{s.ranks.rank}.pt",
)
distributed.shutdown(completed=True)
