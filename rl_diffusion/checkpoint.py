"""Run directories and checkpoints: atomic writes, the last K kept plus the best, corrupt files skipped.

A checkpoint is one torch file holding everything a continuation needs:
    kind              "pretrain" | "finetune"
    model_config      {"kind": ..., constructor kwargs}: rebuilds the network
    diffusion_config  {"beta_schedule", "num_timesteps", ...}, or {"model_type": "flow", "num_timesteps", ...}:
                      rebuilds the process (`processes.process_from_config`)
    data              {"dataset", "shape"}: what the samples should look like
    model             the weights to sample with (the EMA for pretraining; a LoRA fine-tune: its adapters only)
    lora              a LoRA fine-tune only: {"rank", "alpha", "base_run", "base_fingerprint"}, the base it adapts
    train_state       optimizer, scheduler, counters and every RNG state, for --resume
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rl_diffusion import lora
from rl_diffusion.diffusion import DenoisingProcess
from rl_diffusion.distributed import is_main_process
from rl_diffusion.errors import UserError
from rl_diffusion.models import build_model
from rl_diffusion.processes import process_from_config
from rl_diffusion.runlock import LOCK_FILE

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
_NAME = re.compile(r"step_(\d+)\.pt$")


def atomic_write(path: Path, write) -> None:
    """Call write(file_object) on a temporary file next to `path`, then rename it over `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            kept = "its previous version is kept" if path.exists() else "nothing of it was written"
            raise UserError(f"could not write {path}: {e.strerror or e}; {kept}") from e
        raise


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def refuse_to_clobber(out: Path, overwrite: bool) -> bool:
    """Refuse (UserError) to start a new run in `out` when it holds one (or anything) and `overwrite` is not
    given, or holds something that is not a run; whether there is an old run to replace."""
    out = Path(out)
    if out.exists() and any(path.name != LOCK_FILE for path in out.iterdir()):
        if not overwrite and (out / CONFIG_FILE).exists() and not CheckpointManager(out).paths():
            raise UserError(
                f"{out} holds a run stopped before its first checkpoint, which --resume cannot continue; pass "
                "--overwrite to start it again, or pick another --out"
            )
        if not overwrite:
            raise UserError(
                f"{out} already holds files; pass --resume {out} to continue it, --overwrite to replace it, or pick "
                "another --out"
            )
        if not (out / CONFIG_FILE).exists():
            raise UserError(f"{out} is not a run directory (no {CONFIG_FILE}); refusing to --overwrite it")
        return True
    return False


def prepare_run_dir(out: Path, config_json: str, overwrite: bool) -> Path:
    """Create a fresh run directory holding config.json; refuse to clobber an existing run."""
    out = Path(out)
    if refuse_to_clobber(out, overwrite):
        for path in out.iterdir():  # all but the lock this process holds on the run
            if path.name != LOCK_FILE:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / CONFIG_FILE, config_json)
    return out


def read_run_config(run_dir: Path) -> dict:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise UserError(
            f"{run_dir} is not a run directory (no {CONFIG_FILE}); give the --out of an earlier pretrain or finetune"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None


def checkpoint_step(path: Path) -> int:
    """The step (a fine-tune's epoch, a pretraining's optimizer step) of a checkpoint file step_<N>.pt."""
    return int(_NAME.search(path.name).group(1))


class CheckpointManager:
    """Writes run_dir/checkpoints/step_<N>.pt atomically, keeps the last `keep` plus the best."""

    def __init__(self, run_dir: Path, keep: int = 3):
        if keep < 1:
            raise UserError(f"--keep-checkpoints must be at least 1, got {keep}")
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.keep = keep
        self.index_path = self.dir / "index.json"

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.dir.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.search(p.name))]
        return [p for _, p in sorted(found)]

    def _index(self) -> dict:
        try:
            return json.loads(self.index_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def save(self, state: dict, step: int, score: float | None = None) -> Path:
        """Save `state` as the checkpoint of `step`; `score` (higher is better) elects the best."""
        path = self.dir / f"step_{step:08d}.pt"
        try:
            atomic_save(state, path)
        except UserError as e:
            kept = self.paths()
            last = f"the last good checkpoint, {kept[-1].name}, is kept: resume from it" if kept else "no checkpoint"
            raise UserError(f"{e}; {last}") from e
        index = self._index()
        if score is not None and (index.get("best_score") is None or score > index["best_score"]):
            index.update(best_step=step, best_score=score)
            atomic_write_text(self.index_path, json.dumps(index))
        best = index.get("best_step")
        for old in self.paths()[: -self.keep]:
            if best is None or checkpoint_step(old) != best:
                old.unlink()
        return path

    def load_latest(self, map_location: str | torch.device = "cpu") -> dict:
        """The newest checkpoint that loads; a truncated or corrupt file is reported and skipped."""
        paths = self.paths()
        if not paths:
            raise UserError(
                f"no checkpoint in {self.dir}: the run stopped before its first one (or never started); start it "
                f"again with --out {self.dir.parent} --overwrite"
            )
        for path in reversed(paths):
            try:
                return torch.load(path, map_location=map_location, weights_only=False)
            except Exception as e:  # a half-written or damaged file: fall back to the one before
                print(
                    f"warning: checkpoint {path} is unreadable ({type(e).__name__}); using the previous one",
                    file=sys.stderr,
                )
        raise UserError(f"every checkpoint in {self.dir} is unreadable; the run cannot be loaded")


@dataclass
class LoadedRun:
    """A trained model ready to sample: network (eval mode), its process (DDPM or flow), and its checkpoint."""

    model: nn.Module
    diffusion: DenoisingProcess
    checkpoint: dict
    config: dict


def load_run(run_dir: Path, device: str | torch.device = "cpu", checkpoint: Path | None = None) -> LoadedRun:
    """Load the sampling weights of the newest checkpoint of a pretrain or finetune run, or of the file
    `checkpoint` of it (a LoRA fine-tune's adapters merged into its base: an ordinary network)."""
    config = read_run_config(run_dir)
    if checkpoint is None:
        ckpt = CheckpointManager(run_dir).load_latest(map_location=device)
    else:
        ckpt = torch.load(checkpoint, map_location=device, weights_only=False)
    if "lora" in ckpt:
        model = merged_adapters(ckpt["lora"], ckpt["model"], source=str(run_dir)).to(device)
    else:
        model = build_model(ckpt["model_config"]).to(device)
        load_weights(model, ckpt["model"], source=str(run_dir))
    model.eval()
    return LoadedRun(
        model=model, diffusion=process_from_config(ckpt["diffusion_config"]), checkpoint=ckpt, config=config
    )


def merged_adapters(lora_base: dict, adapters: dict, source: str) -> nn.Module:
    """The base run's network (on the CPU) with a LoRA checkpoint's adapters folded into its weights."""
    base_run = lora_base["base_run"]
    if not Path(base_run).exists():
        raise UserError(f"checkpoint {source} holds LoRA adapters of the pretrained run {base_run}, which is gone")
    model = load_run(Path(base_run)).model
    if lora.fingerprint(model) != lora_base["base_fingerprint"]:
        raise UserError(
            f"checkpoint {source} holds LoRA adapters of the weights {base_run} had when fine-tuning started; "
            "that run's weights have changed since (was it resumed?)"
        )
    with torch.random.fork_rng(devices=[]):  # A's initial draw is overwritten: leave the caller's RNG alone
        lora.adapt(model, lora_base["rank"], lora_base["alpha"])
    try:
        lora.load_adapters(model, adapters)
    except ValueError as e:
        raise UserError(f"checkpoint {source}: {e}") from None
    return lora.merge(model)


def load_weights(model: nn.Module, state: dict, source: str) -> None:
    """load_state_dict that says what it expected and what it found, in one line."""
    expected = model.state_dict()
    for name, tensor in state.items():
        if name in expected and (expected[name].shape, expected[name].dtype) != (tensor.shape, tensor.dtype):
            raise UserError(
                f"checkpoint {source} does not fit this model: '{name}' is {tensor.dtype} {tuple(tensor.shape)}, "
                f"expected {expected[name].dtype} {tuple(expected[name].shape)}"
            )
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {source} is from another model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    model.load_state_dict(state)


def rng_state(generator: torch.Generator | None = None) -> dict:
    """Every RNG state a run draws from (python, numpy, torch, and its own generator)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator_state(generator) if generator is not None else None,
    }


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # torch.load(map_location=cuda) moved it; torch takes a CPU tensor
    if generator is not None and state["generator"] is not None:
        set_generator_state(generator, state["generator"])


def generator_state(generator: torch.Generator) -> dict:
    """A generator's state and the kind of device it draws on: a CUDA generator's state (Philox: seed and
    offset, 16 bytes) does not fit a CPU one (Mersenne Twister, 5,056 bytes), nor the other way round."""
    return {"device": generator.device.type, "state": generator.get_state()}


def set_generator_state(generator: torch.Generator, saved: dict | torch.Tensor) -> None:
    """Put back a `generator_state`. One saved on another kind of device cannot be: the generator is seeded
    from a hash of it instead, so a run resumed on another device continues deterministically, but not
    with the draws it would have made on the first one."""
    if isinstance(saved, torch.Tensor):  # written before the device was recorded: its size tells
        saved = {"device": "cpu" if saved.numel() == torch.Generator().get_state().numel() else "cuda", "state": saved}
    state = saved["state"].cpu()
    if saved["device"] == generator.device.type:
        generator.set_state(state)
        return
    generator.manual_seed(int.from_bytes(hashlib.sha256(state.numpy().tobytes()).digest()[:8], "little"))
    if is_main_process():
        print(
            f"warning: this run's random draws were saved on {saved['device']} and continue on "
            f"{generator.device.type}: the generator is reseeded from its saved state, so the continuation is "
            "deterministic but not bit-identical to one on the first device",
            file=sys.stderr,
        )


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the training loop checks, so it can checkpoint and exit cleanly."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignal":
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
