"""The processes a run's network reverses, by model type: a DDPM (`GaussianDiffusion`, what a checkpoint without a
model type holds) or flow matching (`FlowMatching`); and what can be said of a sampler before the run's process
is known, from its name (no two processes share one)."""

from __future__ import annotations

from rl_diffusion.diffusion import DenoisingProcess, GaussianDiffusion
from rl_diffusion.errors import UserError
from rl_diffusion.flow import FlowMatching

MODEL_TYPES: dict[str, type[DenoisingProcess]] = {"ddpm": GaussianDiffusion, "flow": FlowMatching}
_PROCESS_OF_SAMPLER = {sampler: process for process in MODEL_TYPES.values() for sampler in process.SAMPLERS}


def check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise UserError(f"unknown --model-type '{model_type}'; choose one of {', '.join(MODEL_TYPES)}")


def process_from_config(config: dict) -> DenoisingProcess:
    """The process a checkpoint's `diffusion_config` describes."""
    config = dict(config)
    model_type = config.pop("model_type", "ddpm")
    check_model_type(model_type)
    return MODEL_TYPES[model_type](**config)


def _process_of(sampler: str) -> type[DenoisingProcess]:
    if sampler not in _PROCESS_OF_SAMPLER:
        raise UserError(f"unknown sampler '{sampler}'; choose one of {', '.join(_PROCESS_OF_SAMPLER)}")
    return _PROCESS_OF_SAMPLER[sampler]


def check_sampler(sampler: str, eta: float = 1.0) -> None:
    """Refuse a sampler that no process has, and an eta it cannot take; whether the run's process has it is
    checked once the run is loaded (`DenoisingProcess.check_sampler`)."""
    _process_of(sampler).check_eta(sampler, eta)


def is_memoryless(sampler: str, eta: float) -> bool:
    """Whether the chain forgets x_T, so that the KL-regularised optimum p_pre(x_0) exp(r / beta) / Z is reachable
    with x_T shared (docs/design.md, sections 2 and 10)."""
    return _process_of(sampler).is_memoryless(sampler, eta)


def deterministic_sampler(sampler: str) -> str:
    """The deterministic sampler of the process `sampler` belongs to: DDIM (at eta = 0) for a DDPM's, Euler (the
    ODE) for a flow's."""
    return _process_of(sampler).DETERMINISTIC["sampler"]


def is_deterministic(sampler: str, eta: float) -> bool:
    """Whether every step's sigma is 0: no log-prob to train, and no path KL."""
    return _process_of(sampler).is_deterministic(sampler, eta)
