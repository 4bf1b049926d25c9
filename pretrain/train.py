"""Pretraining a DDPM (or, with --model-type flow, a flow-matching model) on a 2D data set or images: config,
setup, loop, evaluation, figures.

Defaults are chosen so the default `dino` run matches the data (sliced
Wasserstein-2 within 1.25x of its floor, MMD within 2x) in under 20 seconds on 2 CPU
cores, figures included: 2,000 steps of 512 points (the same points as 1,000 steps of
1,024, and closer to the data), a schedule that ends at pure noise, an EMA of the
weights, and in-training evaluations by 20-step DDIM, with the full chain once at the
end (scripts/bench_pretrain.py measures each of these).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from pretrain.data import EVAL_DATA_SEED, TrainingData, is_image_dataset, load_training_data, reference_draws
from rl_diffusion import distributed, figures
from rl_diffusion.checkpoint import (
    CheckpointManager,
    StopSignal,
    atomic_write_text,
    load_weights,
    prepare_run_dir,
    rng_state,
    set_rng_state,
)
from rl_diffusion.config import arg, to_markdown_table
from rl_diffusion.diffusion import DenoisingProcess, GaussianDiffusion
from rl_diffusion.errors import UserError
from rl_diffusion.flow import FlowMatching
from rl_diffusion.metrics import quality_metrics, sliced_wasserstein2
from rl_diffusion.models import build_model
from rl_diffusion.models.unet import drop_labels
from rl_diffusion.precision import autocast_forward, check_precision
from rl_diffusion.processes import check_model_type
from rl_diffusion.sampling import draw_samples, sample_shape_and_labels


@dataclass
class PretrainConfig:
    dataset: str = arg("dino", "data set to learn: 2D points or images (see `rl-diffusion datasets`)")
    data_root: str = arg("", "folder holding the files of image-folder, mnist or cifar10")
    image_size: int = arg(0, "image side in pixels (0: the data set's own)")
    steps: int = arg(2000, "optimizer steps")
    batch_size: int = arg(512, "training points per step")
    lr: float = arg(3e-3, "peak AdamW learning rate, after linear warmup, cosine-decayed to 0")
    warmup_steps: int = arg(100, "steps of linear learning-rate warmup")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    grad_clip: float = arg(1.0, "clip the gradient's global norm to this")
    ema_decay: float = arg(0.995, "decay of the weight EMA used for sampling (0 disables)")
    model_type: str = arg(
        "ddpm",
        "ddpm (the network predicts the noise eps) | flow (flow matching on x_t = (1 - t) x_0 + t eps at t = k / T, "
        "k = 0..T: the network predicts the velocity eps - x_0; docs/design.md, section 10)",
    )
    num_timesteps: int = arg(200, "T, the number of diffusion steps (flow: of the time grid)")
    beta_schedule: str = arg("linear", "linear | quadratic | cosine | sigmoid (ddpm only)")
    hidden_size: int = arg(128, "width of the MLP")
    hidden_layers: int = arg(3, "residual blocks of the MLP")
    emb_size: int = arg(128, "size of each embedding")
    time_embedding: str = arg("sinusoidal", "sinusoidal | learnable | linear | zero")
    input_embedding: str = arg("sinusoidal", "sinusoidal | identity | learnable")
    base_channels: int = arg(32, "U-Net (images): channels at full resolution")
    channel_mults: str = arg("1,2", "U-Net (images): width multipliers per resolution, comma-separated")
    num_res_blocks: int = arg(1, "U-Net (images): residual blocks per resolution")
    attention: bool = arg(False, "U-Net (images): self-attention at the lowest resolution")
    class_conditional: bool = arg(True, "use the data set's labels: a class-conditional model (images)")
    label_dropout: float = arg(0.1, "probability of training without the label, for classifier-free guidance")
    clip_x0: bool = arg(
        True,
        "clip each sampling step's predicted x_0 to the data's range (images [-1, 1]; points: "
        "per coordinate, widened by 10% of its width on each side); recorded in the checkpoint",
    )
    seed: int = arg(0, "seed of every random draw in the run")
    eval_every: int = arg(500, "steps between sample-quality evaluations (TensorBoard, training GIF)")
    eval_samples: int = arg(2000, "samples per evaluation")
    eval_sampling_steps: int = arg(
        20,
        "DDIM steps (eta = 0; flow: Euler steps) of each in-training evaluation's samples; 0 or >= T: the full "
        "DDPM chain (flow: Euler over all T steps). "
        "The final evaluation always samples the full chain",
    )
    checkpoint_every: int = arg(1000, "steps between checkpoints")
    keep_checkpoints: int = arg(3, "checkpoints kept (plus the best)")
    final_eval: bool = arg(
        True,
        "evaluate the finished model and draw its figures; with --no-final-eval metrics.json says it was skipped "
        "(`rl-diffusion evaluate --run OUT` scores the run later)",
    )
    final_samples: int = arg(
        5000, "samples of the final evaluation (full chain), against as many data points (images: at most half the set)"
    )
    device: str = arg("cpu", "cpu | cuda | cuda:N")
    precision: str = arg(
        "fp32",
        "fp32 | bf16 | fp16: the network's forward under torch.autocast, the loss in fp32 (fp16: no loss scaler)",
    )

    def model_config(self, data: TrainingData) -> dict:
        """The network for this data: an MLP for points, a U-Net for images."""
        num_classes = data.num_classes if self.class_conditional else 0
        if data.is_image:
            try:
                mults = [int(m) for m in self.channel_mults.split(",")]
            except ValueError:
                raise UserError(f"--channel-mults takes comma-separated integers, got '{self.channel_mults}'") from None
            return {
                "kind": "unet",
                "image_size": data.shape[-1],
                "in_channels": data.shape[0],
                "base_channels": self.base_channels,
                "channel_mults": mults,
                "num_res_blocks": self.num_res_blocks,
                "attention": self.attention,
                "num_timesteps": self.num_timesteps,
                "num_classes": num_classes,
            }
        return {
            "kind": "mlp",
            "data_dim": data.shape[0],
            "num_classes": num_classes,
            "num_timesteps": self.num_timesteps,
            "hidden_size": self.hidden_size,
            "hidden_layers": self.hidden_layers,
            "emb_size": self.emb_size,
            "time_embedding": self.time_embedding,
            "input_embedding": self.input_embedding,
        }

    def process(self, x0_range: tuple | None = None) -> DenoisingProcess:
        """The process the network learns to reverse, whose samples are clipped to x0_range."""
        if self.model_type == "flow":
            return FlowMatching(self.num_timesteps, x0_range)
        return GaussianDiffusion(self.beta_schedule, self.num_timesteps, x0_range)

    def validate(self) -> TrainingData:
        """Check every field before any work; returns the loaded data."""
        for name in (
            "steps",
            "batch_size",
            "num_timesteps",
            "hidden_size",
            "emb_size",
            "eval_every",
            "eval_samples",
            "checkpoint_every",
            "final_samples",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.eval_sampling_steps == 1 or self.eval_sampling_steps < 0:
            raise UserError(
                f"--eval-sampling-steps must be 0 (the full chain) or at least 2, got {self.eval_sampling_steps}"
            )
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.label_dropout <= 1:
            raise UserError(f"--label-dropout must be in [0, 1], got {self.label_dropout}")
        check_model_type(self.model_type)
        if self.model_type == "flow" and self.beta_schedule != PretrainConfig.beta_schedule:
            raise UserError("--beta-schedule shapes a DDPM's noise; a flow run's interpolant is linear in t")
        self.process()
        distributed.resolve_device(self.device)
        check_precision(self.precision)
        data = load_training_data(self.dataset, self.seed, self.data_root, self.image_size)
        build_model(self.model_config(data))
        return data


# Defaults that differ for image data sets (a U-Net step costs ~100x an MLP step on a CPU).
IMAGE_DEFAULTS = {
    "steps": 2000,
    "batch_size": 128,
    "lr": 2e-3,
    "num_timesteps": 100,
    "eval_every": 500,
    "eval_samples": 500,
    "checkpoint_every": 500,
}


def config_for(flags: dict) -> PretrainConfig:
    """The config of the given flags over the defaults of the data kind (points or images)."""
    dataset = flags.get("dataset", PretrainConfig.dataset)
    return PretrainConfig(**{**(IMAGE_DEFAULTS if is_image_dataset(dataset) else {}), **flags})


def lr_lambda(config: PretrainConfig):
    """Linear warmup to 1, then cosine decay to 0 at the last step."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + np.cos(np.pi * min(progress, 1.0)))

    return factor


def pretrain(
    config: PretrainConfig, out: Path, overwrite: bool = False, resume: bool = False, progress: bool = True
) -> Path:
    """Train (or resume) a DDPM or flow model on config.dataset into the run directory `out`; returns `out`.

    The main process also writes `timing.json`: this process's wall seconds by phase."""
    clock = PhaseClock()
    with clock.phase("setup"):
        run = start_run(config, Path(out), overwrite, resume)
    if run.step >= config.steps:
        print(f"{run.out} already finished its {config.steps} steps", file=sys.stderr)
        return run.out
    train(run, resume, progress, clock)
    if run.ranks.is_main:
        finish_pretraining(run.out, run.diffusion, run.sampler_model, config, run.data, run.frames, run.device, clock)
        atomic_write_text(run.out / "timing.json", json.dumps(clock.summary(), indent=2))
    return run.out


@dataclass
class TrainingRun:
    """What a pretraining run holds while it trains: built by start_run, advanced by train."""

    config: PretrainConfig
    out: Path
    data: TrainingData
    ranks: distributed.Ranks
    device: torch.device
    shard: slice  # this rank's part of each batch
    diffusion: DenoisingProcess
    model_config: dict
    model: torch.nn.Module
    ema: torch.nn.Module
    synced: torch.nn.Module  # the forward whose backward averages gradients over ranks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # every random draw of the training loop
    pool: torch.Tensor  # the training points (or images) on the device
    labels: torch.Tensor | None  # their classes, for a class-conditional model
    eval_data: np.ndarray  # the reference draw every evaluation compares against
    picture: Callable[[np.ndarray, str], np.ndarray]
    checkpoints: CheckpointManager
    step: int = 0
    frames: list = dataclasses.field(default_factory=list)  # (title, samples) of each evaluation, for the GIF

    @property
    def sampler_model(self) -> torch.nn.Module:
        """The weights that sample: the EMA when there is one."""
        return self.ema if self.config.ema_decay > 0 else self.model


PHASES = (
    "setup",  # validate, data, model, optimizer, run directory (and the checkpoint a resume loads)
    "optimizer_steps",  # batch, loss, backward, clip, AdamW, schedule, EMA
    "logging",  # progress bar and TensorBoard scalars every 25 steps
    "in_training_evaluation",  # sampling, sliced W2, samples picture every eval_every steps
    "checkpoints",
    "final_evaluation",  # --final-samples of the full chain, sliced W2, MMD and energy with floors
    "figures",  # PNGs and GIFs
)


@dataclass
class PhaseClock:
    """Wall seconds of this process's run, by phase (PHASES): timing.json, and the perf/ scalars."""

    started: float = dataclasses.field(default_factory=time.perf_counter)
    started_unix: float = dataclasses.field(default_factory=time.time)  # lines up with a launcher's clock
    loop_started: float = 0.0
    loop_start_step: int = 0
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - started

    def summary(self) -> dict:
        total = time.perf_counter() - self.started
        return {
            "started_unix": self.started_unix,
            "seconds": {**self.seconds, "other": total - sum(self.seconds.values())},
            "total_seconds": total,
            "torch_threads": torch.get_num_threads(),
        }


def start_run(config: PretrainConfig, out: Path, overwrite: bool, resume: bool) -> TrainingRun:
    """Validate the config, prepare the run directory, build the model, EMA, optimizer and data; on resume,
    restore them from the newest checkpoint."""
    data = config.validate()
    ranks, device = distributed.init(config.device)
    shard = ranks.shard(config.batch_size, "--batch-size")
    if not resume and ranks.is_main:
        saved = dict(kind="pretrain", **dataclasses.asdict(config))
        prepare_run_dir(out, json.dumps(saved, indent=2), overwrite)

    torch.manual_seed(config.seed)
    diffusion = config.process(x0_range(data) if config.clip_x0 else None)
    model_config = config.model_config(data)
    model = build_model(model_config).to(device)
    ema = build_model(model_config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    for network in (model, ema):
        autocast_forward(network, config.precision, device)
    synced = ranks.wrap(model)
    # fused: one kernel for all parameters; on a CPU torch's default loops over them in Python (8% of a dino step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    pool = data.x.to(device)
    labels = data.labels.to(device) if model_config["num_classes"] else None
    eval_data, _ = reference_draws(data, config.eval_samples, EVAL_DATA_SEED)
    run = TrainingRun(
        config=config,
        out=out,
        data=data,
        ranks=ranks,
        device=device,
        shard=shard,
        diffusion=diffusion,
        model_config=model_config,
        model=model,
        ema=ema,
        synced=synced,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=generator,
        pool=pool,
        labels=labels,
        eval_data=eval_data,
        picture=figures.samples_picture(eval_data),
        checkpoints=CheckpointManager(out, keep=config.keep_checkpoints),
    )
    if resume:
        restore_checkpoint(run)
    return run


def restore_checkpoint(run: TrainingRun) -> None:
    """Weights, EMA, optimizer, schedule, generator, step and frames from the newest checkpoint."""
    ckpt = run.checkpoints.load_latest(map_location=run.device)
    state = ckpt["train_state"]
    load_weights(run.model, state["model"], source=str(run.out))
    load_weights(run.ema, ckpt["model"], source=str(run.out))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], run.generator)
    run.step, run.frames = state["step"], state["frames"]


def save_checkpoint(run: TrainingRun, writer: SummaryWriter | distributed.NoWriter, score: float | None) -> None:
    """The main process's checkpoint of the run at its current step (the sampling weights plus the train state)."""
    if not run.ranks.is_main:
        return
    writer.flush()  # TensorBoard on disk up to the checkpoint, so a resume continues it without gaps
    run.checkpoints.save(
        {
            "kind": "pretrain",
            "model_config": run.model_config,
            "diffusion_config": run.diffusion.config,
            "data": data_info(run.config, run.data),
            "model": run.sampler_model.state_dict(),
            "train_state": {
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "step": run.step,
                "frames": run.frames,
                "rng": rng_state(run.generator),
            },
        },
        run.step,
        score,
    )


def train(run: TrainingRun, resume: bool, progress: bool, clock: PhaseClock) -> None:
    """The optimizer steps from run.step to config.steps, with logging, evaluations and checkpoints; on
    SIGINT/SIGTERM it checkpoints and stops with a UserError that says how to resume."""
    config = run.config
    with clock.phase("logging"):
        writer = distributed.summary_writer(
            run.ranks, run.out, purge_step=run.step + 1 if resume else None
        )  # drop points logged after the checkpoint
        if not resume:
            writer.add_text("hyperparameters", to_markdown_table(dataclasses.asdict(config)), 0)
    clock.loop_started, clock.loop_start_step = time.perf_counter(), run.step
    with (
        StopSignal() as stop,
        tqdm(
            total=config.steps,
            initial=run.step,
            desc=f"pretrain {config.dataset}",
            disable=not (progress and run.ranks.is_main),
        ) as bar,
    ):
        while run.step < config.steps:
            with clock.phase("optimizer_steps"):
                loss, grad_norm = optimizer_step(run)
                run.step += 1
            with clock.phase("logging"):
                bar.update(1)
                if run.step % 25 == 0:
                    loss = run.ranks.sum(loss.detach()) / run.ranks.world_size  # the whole batch's
                    writer.add_scalar("loss/train", loss.item(), run.step)
                    writer.add_scalar("train/lr", run.scheduler.get_last_lr()[0], run.step)
                    writer.add_scalar("train/grad_norm", grad_norm.item(), run.step)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            score = None
            if run.ranks.is_main and (run.step % config.eval_every == 0 or run.step == config.steps):
                with clock.phase("in_training_evaluation"):
                    score = evaluate(run, writer, clock)
            stopping = run.ranks.any(stop.received is not None)
            if run.step % config.checkpoint_every == 0 or run.step == config.steps or stopping:
                with clock.phase("checkpoints"):
                    save_checkpoint(run, writer, score)
            if stopping:
                writer.close()
                raise UserError(
                    f"stopped by signal {stop.received} at step {run.step}; checkpoint saved, "
                    f"continue with --resume {run.out}"
                )
    with clock.phase("logging"):
        writer.close()


def optimizer_step(run: TrainingRun) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on a fresh batch: loss, clipped gradient, AdamW, schedule, EMA; returns (loss, gradient norm)."""
    config, step = run.config, run.step
    idx = torch.randint(0, len(run.pool), (config.batch_size,), device=run.device, generator=run.generator)
    c = None
    if run.labels is not None:  # a class-conditional model: the batch's labels, some dropped for guidance
        c = drop_labels(run.labels[idx], run.data.num_classes, config.label_dropout, run.generator)
    loss = run.diffusion.training_loss(run.synced, run.pool[idx], c, generator=run.generator, shard=run.shard)
    if not torch.isfinite(loss):
        raise UserError(
            f"the training loss became {loss.item()} at step {step}; the last good checkpoint is kept in "
            f"{run.out} (try a lower --lr)"
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    if not torch.isfinite(grad_norm):
        raise UserError(
            f"the gradient norm became {grad_norm.item()} at step {step}; the last good checkpoint is kept "
            f"in {run.out} (try a lower --lr)"
        )
    run.optimizer.step()
    run.scheduler.step()
    if config.ema_decay > 0:
        with torch.no_grad():
            torch._foreach_lerp_(list(run.ema.parameters()), list(run.model.parameters()), 1 - config.ema_decay)
    return loss, grad_norm


def evaluate(run: TrainingRun, writer: SummaryWriter | distributed.NoWriter, clock: PhaseClock) -> float:
    """The in-training evaluation (main process): sliced W2 of fresh samples to the reference draw, a samples
    picture and the throughput in TensorBoard, a frame for the training GIF; returns the checkpoint score, -SW2.

    Its samples come from a generator of their own (seeded with the step), never from the training one, so
    how often and how it evaluates leaves the training itself unchanged."""
    step = run.step
    samples = draw_samples(
        run.diffusion,
        run.sampler_model,
        len(run.eval_data),
        seed=step,
        device=run.device,
        **eval_sampling(run.config.eval_sampling_steps, run.diffusion),
    )
    sw2 = sliced_wasserstein2(samples, run.eval_data)
    writer.add_scalar("eval/sw2", sw2, step)
    writer.add_image("samples", run.picture(samples, f"step {step}"), step, dataformats="HWC")
    loop_seconds = time.perf_counter() - clock.loop_started
    writer.add_scalar("perf/steps_per_sec", (step - clock.loop_start_step) / loop_seconds, step)
    # wall clock since this process started the loop, and the part of it spent in optimizer steps
    writer.add_scalar("perf/wall_seconds", loop_seconds, step)
    writer.add_scalar("perf/train_seconds", clock.seconds["optimizer_steps"], step)
    run.frames.append((f"step {step}", samples[: 64 if run.data.is_image else 1000]))
    return -sw2


def eval_sampling(sampling_steps: int, diffusion: DenoisingProcess) -> dict:
    """The sampler of the in-training evaluations: the process's deterministic one (DDIM with eta = 0, or Euler) in
    `sampling_steps` steps, or its default chain over all T steps when that is 0 or at least T. Deterministic DDIM:
    in 20 steps its sliced W2 on dino is within the spread of the full chain's, where eta = 1 at 20 steps reads 1.5
    to 2x higher."""
    if 0 < sampling_steps < diffusion.num_timesteps:
        return {**diffusion.DETERMINISTIC, "sampling_steps": sampling_steps}
    return {}


X0_MARGIN = 0.1  # of a coordinate's width, added on each side of the points' range


def x0_range(data: TrainingData) -> tuple[float | list[float], float | list[float]]:
    """The (low, high) that sampling clips predicted x_0 to: [-1, 1] for images; for points the
    range of each coordinate over the training pool, widened by X0_MARGIN of its width per side."""
    if data.is_image:
        return -1.0, 1.0
    low, high = data.x.min(0).values.double(), data.x.max(0).values.double()
    margin = X0_MARGIN * (high - low)
    return (low - margin).tolist(), (high + margin).tolist()


def data_info(config: PretrainConfig, data: TrainingData) -> dict:
    """What a checkpoint records about its data: enough to draw it again and to shape samples."""
    return {
        "dataset": config.dataset,
        "shape": list(data.shape),
        "num_classes": data.num_classes if config.class_conditional else 0,
        "root": config.data_root,
        "image_size": config.image_size,
        "seed": config.seed,
    }


def finish_pretraining(
    out: Path,
    diffusion: DenoisingProcess,
    model: torch.nn.Module,
    config: PretrainConfig,
    data: TrainingData,
    frames: list,
    device: torch.device,
    clock: PhaseClock,
) -> None:
    """Final metrics and figures of a pretraining run."""
    if not config.final_eval:
        atomic_write_text(out / "metrics.json", json.dumps({"final_evaluation": "skipped (--no-final-eval)"}, indent=2))
        return
    with clock.phase("final_evaluation"):
        reference, again = reference_draws(data, config.final_samples, EVAL_DATA_SEED)
        chains = None
        if data.is_image:
            samples = draw_samples(diffusion, model, len(reference), seed=config.seed + 1, device=device)
        else:
            # Points keep every state (20 MB): the reverse-process figure shows these chains instead of
            # sampling 1,000 more. Images do not: 5,000 whole MNIST chains would take gigabytes.
            shape, c = sample_shape_and_labels(model, len(reference), device)
            generator = torch.Generator(device=device).manual_seed(config.seed + 1)
            with torch.inference_mode():
                traj = diffusion.sample(model, shape, c=c, generator=generator, device=device, record=True)
            chains = traj.xs.cpu().numpy()
            samples = chains[-1]  # what draw_samples(seed=config.seed + 1) returns: the same draws
        metrics = {"num_samples": len(samples), **quality_metrics(samples, reference, again)}
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    with clock.phase("figures"):
        draw_figures(out / "figures", diffusion, model, config.dataset, samples, reference, device, config.seed, chains)
        if frames:
            figures.save_gif(frames, out / "figures" / "training.gif", lim=figures.limits(reference))


def draw_figures(
    fig_dir: Path,
    diffusion: DenoisingProcess,
    model: torch.nn.Module,
    dataset: str,
    samples: np.ndarray,
    data: np.ndarray,
    device: torch.device,
    seed: int = 0,
    chains: np.ndarray | None = None,
) -> None:
    """samples vs data, the forward process q(x_t | x_0), and the reverse process (PNG and GIF): of `chains`
    [T + 1, N, ...] (states from x_T to x_0) when given, else of chains drawn here with `seed`."""
    T = diffusion.num_timesteps
    shown = sorted({0, T // 10, T // 4, T // 2, T})
    n = 64 if samples.ndim == 4 else 1000
    if samples.ndim == 4:
        figures.save_image_grid(samples[:n], fig_dir / "samples.png")
        figures.save_image_grid(data[:n], fig_dir / "data.png")
    else:
        figures.plot_samples_vs_data(samples, data, fig_dir / "samples_vs_data.png", title=dataset)
    x0 = torch.from_numpy(data[:n])
    g = torch.Generator().manual_seed(seed)
    forward = [
        (t, diffusion.q_sample(x0, torch.full((len(x0),), t), torch.randn(x0.shape, generator=g)).numpy())
        for t in shown
    ]
    figures.plot_process(forward, fig_dir / "forward_process.png", title="forward process q(x_t | x_0)")
    if chains is None:
        shape, c = sample_shape_and_labels(model, n, device)
        with torch.inference_mode():
            traj = diffusion.sample(
                model,
                shape,
                c=c,
                generator=torch.Generator(device=device).manual_seed(seed),
                device=device,
                record=True,
            )
        chains = traj.xs.cpu().numpy()
    xs = chains[:, :n]  # xs[k] is x at t = T - k
    figures.plot_process(
        [(t, xs[T - t]) for t in reversed(shown)],
        fig_dir / "reverse_process.png",
        title="reverse process p(x_{t-1} | x_t)",
    )
    gif_ts = sorted({int(t) for t in np.linspace(T, 0, 26)}, reverse=True)
    figures.save_gif(
        [(f"t = {t}", xs[T - t]) for t in gif_ts], fig_dir / "reverse_process.gif", lim=figures.limits(data)
    )
