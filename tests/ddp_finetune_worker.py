"""Fine-tuning runs on this process's rank; launched by test_distributed.py, alone or under torchrun.

    python tests/ddp_finetune_worker.py PRETRAINED RUNS_JSON OUT_DIR

RUNS_JSON maps a name to FinetuneConfig overrides. For each, in one launch (a torchrun start costs seconds):
`setup` + `loop.train` as `rl-diffusion finetune` does, in OUT_DIR/NAME/run, then what this rank saw (its
logged history and its policy's parameters) saved to OUT_DIR/NAME/rank<R>.pt, so the test can compare ranks
with each other and with a one-process run.
"""

import json
import sys
from pathlib import Path

import torch

from rl_diffusion import distributed
from rl_diffusion.algos import loop
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.run import setup

pretrained, runs, out = sys.argv[1:]
for name, overrides in json.loads(Path(runs).read_text()).items():
    run = setup(FinetuneConfig(run=pretrained, **overrides), Path(out) / name / "run")
    loop.train(run, progress=False)
    torch.save(
        {"history": run.history, "policy": run.policy.state_dict(), "world_size": run.ranks.world_size},
        Path(out) / name / f"rank{run.ranks.rank}.pt",
    )
distributed.shutdown(completed=True)
