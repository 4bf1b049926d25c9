"""Mixed precision (--precision): the network's forward under torch.autocast, everything after it in float32.

`autocast_forward` is the one place it is applied. It hooks the network itself, so every caller (the
sampler, the rescoring of actions, the path KL's reference, the training loss, DDP) runs the forward in
the lower precision without knowing it, and the parameters, state dicts and optimizer stay float32.
The network's output is cast back to float32 before anything else sees it: the reverse step's mean,
the Gaussian log-probs, the PPO ratios and the path KL are all computed in float32.

fp16 runs without a loss scaler, on CUDA as on a CPU (torch's CPU autocast supports it): a gradient
under fp16's smallest subnormal (6e-8) is lost. bf16 has float32's range and needs none; prefer it.
"""

from __future__ import annotations

import torch
from torch import nn

from rl_diffusion.errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown --precision '{precision}'; choose one of {', '.join(PRECISIONS)}")


def autocast_forward(model: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """Run model's forward under torch.autocast(device.type, the precision's dtype) and return its output as
    float32; fp32 leaves the model alone. Returns `model`."""
    check_precision(precision)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return model
    contexts = []  # a stack: each forward leaves the autocast it entered, even when forwards nest

    def enter(module, args):
        contexts.append(torch.autocast(device.type, dtype=dtype))
        contexts[-1].__enter__()

    def leave(module, args, output):
        contexts.pop().__exit__(None, None, None)
        return output.float() if isinstance(output, torch.Tensor) else output  # not a tensor: forward raised

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)  # always: an exception must not leave autocast on
    return model
