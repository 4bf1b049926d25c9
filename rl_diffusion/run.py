"""The services every fine-tuning algorithm shares: the run's setup (`Setup`, `setup`), scoring of
rewards, TensorBoard logging, the reward-hacking monitors, checkpoints and early stopping.

What stable-baselines3's `common/` is to its algorithms: the algorithms (rl_diffusion/algos/) import
it, and it imports none of them, only the registry's names (rl_diffusion/algos/__init__.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from pretrain.data import EVAL_DATA_SEED, data_of_checkpoint, reference_draws
from rewards import Reward, RewardError, build_reward, fingerprint_changes, finite_mean
from rewards.remote import served
from rl_diffusion import distributed, figures, lora
from rl_diffusion.algos import NATIVE, algorithm
from rl_diffusion.checkpoint import CheckpointManager, LoadedRun, load_run, prepare_run_dir, read_run_config
from rl_diffusion.config import to_markdown_table
from rl_diffusion.diffusion import DenoisingProcess
from rl_diffusion.distributed import NoWriter, Ranks
from rl_diffusion.errors import UserError
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.metrics import diversity, entropy, mode_masses, vendi_score, within_class_diversity
from rl_diffusion.precision import autocast_forward
from rl_diffusion.processes import is_memoryless
from rl_diffusion.targets import Modes, dataset_modes

MODE_HELD_MASS = 0.01  # a mode holds samples when at least this fraction of the batch lies in it (diversity/modes_held)


@dataclass
class Setup:
    """Everything an algorithm needs; built once by `setup()`, the same for every algo."""

    config: FinetuneConfig
    out: Path
    device: torch.device
    diffusion: DenoisingProcess
    policy: nn.Module  # trainable copy of the pretrained network (--lora-rank: the network itself, adapted)
    reference: nn.Module  # the frozen pretrained network (path KL; --lora-rank: the policy, adapters off)
    pretrained: LoadedRun
    reward: Reward
    data_shape: tuple[int, ...]
    epochs: int
    writer: SummaryWriter | NoWriter  # NoWriter on every rank but 0
    checkpoints: CheckpointManager
    eval_data: np.ndarray  # the data set, drawn for figures
    picture: Callable[
        [np.ndarray, str], np.ndarray
    ]  # figures.samples_picture of eval_data: samples -> TensorBoard image
    ranks: Ranks  # this process among the data-parallel ranks (rank 0 of 1 without torchrun)
    synced_policy: (
        nn.Module
    )  # the policy under DDP on several ranks: the update's forward, so backward averages gradients
    frames: list = dataclasses.field(default_factory=list)  # (label, samples) per epoch, for the GIF
    history: list = dataclasses.field(default_factory=list)  # per-epoch logged scalars
    resumed: dict | None = None  # the checkpoint a --resume continues from
    eval_rewards: dict[str, Reward] = dataclasses.field(
        default_factory=dict
    )  # held-out rewards by label: logged, never trained on
    modes: Modes | None = None  # a mixture data set's modes, for diversity/modes_held
    label_classifier: nn.Module | None = None  # grey images: the digit CNN, for diversity/label_entropy
    eval_data_labels: Tensor | None = None  # its labels of eval_data, read once, for diversity/within_class
    component_means: dict[str, float] = dataclasses.field(
        default_factory=dict
    )  # a weighted sum of rewards: each component's mean over the last scored batch, by label
    base_fingerprint: str = ""  # --lora-rank: lora.fingerprint of the pretrained weights the adapters adapt

    @property
    def steps_per_chain(self) -> int:
        return len(self.diffusion.timesteps(self.config.sampling["sampler"], self.config.sampling_steps or None))

    def checkpoint_payload(self, train_state: dict) -> dict:
        ckpt = self.pretrained.checkpoint
        return {
            "kind": "finetune",
            "model_config": ckpt["model_config"],
            "diffusion_config": ckpt["diffusion_config"],
            "data": ckpt["data"],
            "sampling": self.config.sampling,
            "model": lora.adapter_state(self.policy) if self.config.lora_rank else self.policy.state_dict(),
            **({"lora": self.lora_base} if self.config.lora_rank else {}),
            "train_state": train_state,
        }

    @property
    def lora_base(self) -> dict:
        """What load_run needs to rebuild a LoRA run's network: the adapters' shape and the base they adapt
        (the pretrained run's directory, and a digest of its weights at the start)."""
        cfg = self.config
        return {
            "rank": cfg.lora_rank,
            "alpha": cfg.lora_alpha or cfg.lora_rank,
            "base_run": str(Path(cfg.run).resolve()),
            "base_fingerprint": self.base_fingerprint,
        }


def setup(config: FinetuneConfig, out: Path, overwrite: bool = False, resume: bool = False) -> Setup:
    """Validate everything, then create (or reopen) the run directory and load the pretrained model."""
    config.validate()
    ranks, device = distributed.init(config.device)
    refuse_what_ranks_cannot_share(config, ranks)
    pretrained = load_run(Path(config.run), device)
    if pretrained.checkpoint["kind"] != "pretrain":
        raise UserError(f"--run {config.run} is a {pretrained.checkpoint['kind']} run; fine-tune from a pretrain run")
    if config.null_label and not pretrained.checkpoint["model_config"].get("num_classes"):
        raise UserError(f"--null-label needs a class-conditional model; --run {config.run} has no labels")
    out = Path(out)
    data_shape = tuple(pretrained.checkpoint["data"]["shape"])
    reward, eval_rewards = checked_rewards(config, out, resume, pretrained, data_shape, device)
    steps = len(pretrained.diffusion.timesteps(config.sampling["sampler"], config.sampling_steps or None))
    if config.algo in NATIVE:
        algorithm(config.algo).validate_chain(config, steps)
    epochs = max(1, config.total_steps // (config.chains * steps)) if config.total_steps > 0 else config.epochs
    if not resume and ranks.is_main:
        saved = dict(kind="finetune", **config.to_dict(), reward_fingerprint=reward.fingerprint)
        prepare_run_dir(out, json.dumps(saved, indent=2), overwrite)
    if config.kl_coef > 0 and not is_memoryless(config.sampler, config.eta) and ranks.is_main:
        print(
            f"warning: --sampler {config.sampler} with --eta {config.eta} keeps memory of x_T, so the KL-regularised "
            "optimum p_pre exp(r / beta) / Z is out of reach (docs/design.md, sections 2 and 10); "
            "use --sampler ddpm, ddim with --eta 1, or a flow run's sde with --eta 1 to aim at it",
            file=sys.stderr,
        )
    torch.manual_seed(config.seed)
    policy, reference, base_fingerprint = policy_and_reference(config, pretrained, ranks, device)
    checkpoints = CheckpointManager(out, keep=config.keep_checkpoints)
    resumed = checkpoints.load_latest(map_location=device) if resume else None
    purge_step = None
    if resumed is not None:  # TensorBoard drops what was logged after the checkpoint: no duplicate points
        state = resumed["train_state"]
        purge_step = state["epoch"] + 1 if config.x_axis == "epoch" else state["reward_queries"] + 1
    eval_data = reference_draws(data_of_checkpoint(pretrained.checkpoint["data"]), 2000, EVAL_DATA_SEED)[0]
    classifier = label_classifier(data_shape, device)
    return Setup(
        config=config,
        out=out,
        device=device,
        diffusion=pretrained.diffusion,
        policy=policy,
        reference=reference,
        pretrained=pretrained,
        reward=reward,
        data_shape=data_shape,
        epochs=epochs,
        writer=distributed.summary_writer(ranks, out, purge_step=purge_step),
        checkpoints=checkpoints,
        resumed=resumed,
        eval_data=eval_data,
        picture=figures.samples_picture(eval_data),
        ranks=ranks,
        synced_policy=ranks.wrap(policy),
        eval_rewards=eval_rewards,
        label_classifier=classifier,
        eval_data_labels=None if classifier is None or not len(eval_data) else read_labels(classifier, eval_data),
        modes=dataset_modes(pretrained.checkpoint["data"]["dataset"]),
        base_fingerprint=base_fingerprint,
    )


def refuse_what_ranks_cannot_share(config: FinetuneConfig, ranks: Ranks) -> None:
    """Under torchrun: the settings that need one process, and a batch that does not split evenly."""
    if ranks.world_size > 1:
        if config.algo.startswith("sb3-"):
            raise UserError(f"--algo {config.algo} runs in one process; under torchrun use ddpo-sf, ddpo-is or rwr")
        if config.skip_nonfinite_rewards or config.on_reward_failure == "skip":
            flag = "--skip-nonfinite-rewards" if config.skip_nonfinite_rewards else "--on-reward-failure skip"
            raise UserError(f"{flag} would leave the ranks with unequal batches; it needs a single process")
    ranks.shard(config.chains, "--chains")  # an uneven split is refused before anything is written


def checked_rewards(
    config: FinetuneConfig, out: Path, resume: bool, pretrained: LoadedRun, data_shape: tuple, device: torch.device
) -> tuple[Reward, dict[str, Reward]]:
    """The run's reward and held-out rewards, each already called once on the data's shape (a reward that fails
    on its input fails now); on --resume the reward must be the one the run started with."""
    reward = build_reward(
        config.reward,
        config.reward_args,
        skip_nonfinite=config.skip_nonfinite_rewards,
        on_failure=config.on_reward_failure,
    )
    if resume:
        check_reward_unchanged(out, reward)
    if config.algo in NATIVE and algorithm(config.algo).needs_reward_gradient and not reward.differentiable:
        raise UserError(
            f"--algo {config.algo} needs the reward's gradient and reward '{reward.name}' does not declare itself "
            "differentiable; choose a differentiable reward (see `rl-diffusion rewards`) or a policy-gradient algorithm"
        )
    eval_rewards = build_eval_rewards(config.eval_rewards)
    num_classes = int(pretrained.checkpoint["model_config"].get("num_classes") or 0)
    probe_labels = torch.zeros(2, dtype=torch.long, device=device) if num_classes and not config.null_label else None
    for r in (reward, *eval_rewards.values()):
        r(torch.zeros((2, *data_shape), device=device), probe_labels)
    return reward, eval_rewards


def policy_and_reference(
    config: FinetuneConfig, pretrained: LoadedRun, ranks: Ranks, device: torch.device
) -> tuple[nn.Module, nn.Module, str]:
    """The trainable policy, the frozen reference and (under --lora-rank) the base weights' fingerprint. Both in
    eval mode for good: sampling, rescoring and the update must see one network (dropout would break ratio = 1
    and KL = 0 before the first update)."""
    base_fingerprint = lora.fingerprint(pretrained.model) if config.lora_rank else ""
    if config.lora_rank:  # one copy of the weights: the reference is the policy with its adapters off
        policy = lora.adapt(pretrained.model.eval(), config.lora_rank, config.lora_alpha or config.lora_rank)
        reference = lora.Pretrained(policy)
        if ranks.is_main:
            fraction = lora.trainable_fraction(policy)
            print(f"LoRA rank {config.lora_rank}: {fraction:.2%} of the policy's weights train", file=sys.stderr)
    else:
        policy = copy.deepcopy(pretrained.model).eval().requires_grad_(True)
        reference = pretrained.model.eval().requires_grad_(False)
    for network in (policy, reference):
        autocast_forward(network, config.precision, device)
    return policy, reference, base_fingerprint


def check_reward_unchanged(out: Path, reward: Reward) -> None:
    """Refuse to --resume a run whose reward's fingerprint differs from the one its config.json recorded.

    A run started before fingerprints were recorded has none, and resumes as before.
    """
    saved = read_run_config(out).get("reward_fingerprint")
    if saved is None:
        return
    changes = fingerprint_changes(saved, reward.fingerprint)
    if changes:
        raise UserError(
            f"--resume {out}: reward '{reward.name}' changed since the run started ({'; '.join(changes)}); "
            "resuming would mix two rewards in one run: restore the reward it was trained with, or start a new run"
        )


def build_eval_rewards(eval_rewards: dict) -> dict[str, Reward]:
    """The held-out rewards of FinetuneConfig.eval_rewards by label; a non-finite value is left out of their means."""
    return {
        label: build_reward(spec["reward"], spec["reward_args"], skip_nonfinite=True)
        for label, spec in eval_rewards.items()
    }


def label_classifier(data_shape: tuple[int, ...], device: torch.device) -> nn.Module | None:
    """The digit CNN (trained and cached on first use) for grey images, loaded once per run; None otherwise."""
    if len(data_shape) != 3 or data_shape[0] != 1:
        return None
    from rl_diffusion.models.digit_classifier import load_digit_classifier

    return load_digit_classifier().to(device)


def read_labels(classifier: nn.Module, images: Tensor | np.ndarray) -> Tensor:
    """The labels a classifier reads in images [B, C, H, W]."""
    with torch.no_grad():
        return classifier(torch.as_tensor(images).float()).argmax(dim=1)


def monitor_scalars(
    x0: Tensor,
    data: np.ndarray,
    modes: Modes | None,
    classifier: nn.Module | None = None,
    data_labels: Tensor | None = None,
) -> dict[str, float]:
    """The per-epoch monitors of reward hacking (docs/design.md, section 9) for samples x0 [B, ...]:

    - realism/nearest_data: mean over samples of the RMS distance (data units per coordinate) to the
      nearest of `data` (the run's draws of its data set): rises when samples leave the data;
    - diversity/pairwise: mean pairwise distance (metrics.diversity): falls when samples collapse;
    - 2D: diversity/vendi (metrics.vendi_score, data units) and, with a mixture's modes,
      diversity/modes_held (modes holding at least MODE_HELD_MASS of the samples) and
      diversity/outside_mass (the fraction within the mode radius of none);
    - with a `classifier` (grey images: the digit CNN, `label_classifier`): diversity/label_entropy, the
      entropy (nats) of its predicted labels over the batch: log 10 = 2.30 for all digits in equal shares,
      0 for one digit; and, given the classifier's `data_labels` of `data`, diversity/within_class
      (metrics.within_class_diversity): the variety each digit keeps, 1 for that of the data's digits, which a
      class reward should not lower.
    """
    flat = x0.detach().flatten(1).double()
    reference = torch.tensor(data, dtype=torch.float64, device=flat.device).flatten(1)  # a copy: data may be read-only
    if len(reference):
        nearest = torch.cdist(flat, reference).min(dim=1).values / flat.shape[1] ** 0.5
    else:  # a network imported without its data (rl_diffusion/diffusers_io.py): nothing to be near
        nearest = flat.new_full((len(flat),), torch.nan)
    values = {"realism/nearest_data": nearest.mean().item(), "diversity/pairwise": diversity(flat)}
    if classifier is not None:
        labels = read_labels(classifier, x0.detach())
        values["diversity/label_entropy"] = entropy(torch.bincount(labels, minlength=10) / len(labels))
        if data_labels is not None:
            values["diversity/within_class"] = within_class_diversity(flat, labels, reference, data_labels)
    if x0.dim() != 2:
        return values
    values["diversity/vendi"] = vendi_score(x0)
    if modes is not None:
        masses, outside = mode_masses(x0, modes.means, modes.radius)
        values.update(
            {"diversity/modes_held": float((masses >= MODE_HELD_MASS).sum()), "diversity/outside_mass": outside}
        )
    return values


REALISM_RISE = 1.5  # flag: the samples' distance to the data this many times the pretrained model's ...
REALISM_MARGIN = 0.1  # ... and higher by this fraction of the data's std (a tiny distance doubling is no news)
COLLAPSE_FALL = 0.5  # flag: the mean pairwise distance below this fraction of the pretrained model's
CLASS_COLLAPSE_FALL = 0.85  # flag: the variety within each digit below this fraction of the pretrained model's


def hacking_warnings(history: list[dict], data: np.ndarray) -> list[str]:
    """Signs of reward hacking in the monitors (`monitor_scalars`), the last epoch's samples against the
    first epoch's, which the pretrained model drew (docs/design.md, section 9). `data`: the run's draws."""
    if len(history) < 2:
        return []
    first, last = history[0], history[-1]
    warnings = []
    a, b = first["realism/nearest_data"], last["realism/nearest_data"]
    if b > REALISM_RISE * a and b - a > REALISM_MARGIN * float(np.std(data)):
        warnings.append(
            f"samples left the data: their distance to the nearest data point rose from {a:.3g} to {b:.3g} "
            f"(realism/nearest_data, x{b / a:.1f}); the reward is likely hacked off the data: look at figures/, "
            "raise --kl-coef or set --kl-target"
        )
    a, b = first["diversity/pairwise"], last["diversity/pairwise"]
    if b < COLLAPSE_FALL * a:
        warnings.append(
            f"samples collapsed: their mean pairwise distance fell from {a:.3g} to {b:.3g} (diversity/pairwise); "
            "unless the reward asks for that (one point, a small region), raise --kl-coef or set --kl-target"
        )
    a, b = first.get("diversity/within_class", np.nan), last.get("diversity/within_class", np.nan)
    if b < CLASS_COLLAPSE_FALL * a:
        warnings.append(
            f"samples collapsed within their class: each digit's variety, against the data's, fell from {a:.2f} "
            f"to {b:.2f} (diversity/within_class): a few shapes repeat; raise --kl-coef, or try --algo iw-distill, "
            "which fits the tilt's own variety"
        )
    return warnings


LABELS_FIGHT = 0.5  # warn when the labels explain more than this fraction of the reward's variance


def labels_fight_warning(rewards: Tensor, c: Tensor) -> str | None:
    """A warning when a class-conditional model's labels explain most of the reward's variance over its own
    chains (the between-label share, R^2 of the rewards on the labels): the KL keeps each chain's label, since
    the optimum is p_pre(x | c) exp(r / beta) / Z_c, so such a reward fights the labels instead of tilting
    within them. None otherwise."""
    rewards = rewards.double()
    total = (rewards - rewards.mean()).square().sum()
    between = sum((c == label).sum() * (rewards[c == label].mean() - rewards.mean()).square() for label in c.unique())
    share = (between / total).item() if total > 0 else 0.0
    if share <= LABELS_FIGHT:
        return None
    return (
        f"the labels explain {share:.0%} of the reward's variance over the pretrained model's chains: under the KL "
        "each chain keeps its label, so the reward fights the labels; run the chains on the null label with "
        "--null-label (the unconditional model its label dropout trained), or fine-tune an unconditional model"
    )


def score_rewards(run: Setup, x0: Tensor, c: Tensor | None, epoch: int) -> Tensor:
    """Rewards of a batch, called once.

    A non-finite reward stops the run (the last good checkpoint stays) unless
    --skip-nonfinite-rewards, which drops those samples and counts them.
    """
    try:
        rewards = run.reward(x0, c)
    except RewardError as e:
        raise RewardError(f"{e}; stopped at epoch {epoch + 1}, the last good checkpoint is kept in {run.out}") from None
    run.component_means = {label: finite_mean(r) for label, r in run.reward.components.items()}
    if torch.isfinite(rewards).sum() < 2:
        missing = f" ({run.reward.missing} of {len(rewards)} missing: the server failed)" if run.reward.missing else ""
        raise RewardError(
            f"reward '{run.reward.name}' returned fewer than 2 finite values at epoch {epoch + 1}{missing}; nothing "
            f"to learn from; the last good checkpoint is kept in {run.out}"
        )
    return rewards


def peak_memory_mb(device: torch.device) -> float:
    """The run's peak memory so far in MiB: allocated tensors on a GPU, the process's peak resident set on a CPU.
    On Linux the address space's own high-water mark (VmHWM): getrusage's maxrss survives exec, so a run started
    by a large parent process would report the parent's size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def log_epoch(
    run: Setup,
    epoch: int,
    reward_queries: int,
    x0: Tensor,
    rewards: Tensor,
    scalars: dict[str, float],
    seconds: float,
    c: Tensor | None = None,
) -> None:
    """Per-epoch TensorBoard scalars (reward/, eval_reward/, diversity/, kl/, loss/, ppo/, perf/), a reward
    histogram and a scatter of samples. x0 [B, ...] are the epoch's samples, rewards [B] their training
    rewards, c [B] their labels (held-out rewards see them; None: unlabelled)."""
    step = epoch + 1 if run.config.x_axis == "epoch" else reward_queries
    finite = rewards[torch.isfinite(rewards)]
    with torch.no_grad():
        held_out = {label: reward(x0, c) for label, reward in run.eval_rewards.items()}
    values = {
        "reward/mean": finite.mean().item(),
        "reward/std": finite.std().item() if len(finite) > 1 else 0.0,
        "reward/min": finite.min().item(),
        "reward/max": finite.max().item(),
        "reward/nonfinite": float(len(rewards) - len(finite)),
        "perf/steps_per_sec": len(rewards) * run.steps_per_chain / seconds,
        "perf/reward_queries": float(reward_queries),
        "perf/epoch_seconds": seconds,
        "perf/peak_memory_mb": peak_memory_mb(run.device),
        **{f"eval_reward/{label}/mean": finite_mean(r) for label, r in held_out.items()},
        # a served reward: samples of the epoch's batch it failed to score (in reward/nonfinite too, and dropped)
        **({"reward/missing": float(run.reward.missing)} if served(run.reward) else {}),
        # a weighted sum: each component's unweighted mean over the scored batch (dropped chains included)
        **{f"reward/component/{label}/mean": mean for label, mean in run.component_means.items()},
        **monitor_scalars(x0, run.eval_data, run.modes, run.label_classifier, run.eval_data_labels),
        **scalars,
    }
    for tag, value in values.items():
        run.writer.add_scalar(tag, value, step)
    run.writer.add_histogram("reward/hist", finite.cpu(), step)
    samples = x0[: 64 if x0.dim() == 4 else 1000].detach().cpu().numpy()
    run.writer.add_image("samples", run.picture(samples, f"epoch {epoch + 1}"), step, dataformats="HWC")
    run.frames.append((f"epoch {epoch + 1}", samples))
    run.history.append({"epoch": epoch + 1, "reward_queries": reward_queries, **values})
    run.writer.flush()


def write_hyperparameters(run: Setup) -> None:
    run.writer.add_text("hyperparameters", to_markdown_table(run.config.to_dict()), 0)
    if run.config.lora_rank:
        run.writer.add_scalar("lora/trainable_fraction", lora.trainable_fraction(run.policy), 0)


def best_tag(config: FinetuneConfig) -> str:
    """The history entry that elects the best checkpoint: the --early-stop-on held-out mean, else the
    training reward's mean."""
    return f"eval_reward/{config.early_stop_on}/mean" if config.early_stop_on else "reward/mean"


def save_checkpoint(run: Setup, epoch: int, train_state: dict) -> None:
    """Checkpoint after `epoch` (0-based) with the algorithm's own train state; the best by `best_tag`. Rank 0 only."""
    if not run.ranks.is_main:
        return
    mean = run.history[-1][best_tag(run.config)] if run.history else None
    state = {"epoch": epoch + 1, "frames": run.frames, "history": run.history, **train_state}
    run.checkpoints.save(run.checkpoint_payload(state), epoch + 1, mean)


def best_epoch(run: Setup) -> int:
    """The logged epoch (1-based) with the highest `best_tag` value; the first of equal values, so a tie
    is no improvement."""
    return 1 + int(np.argmax([h[best_tag(run.config)] for h in run.history]))


def early_stop(run: Setup) -> tuple[bool, str | None]:
    """Under --early-stop-on, after an epoch is logged: (that epoch set a new best held-out mean, so it
    must be checkpointed; why the run stops now, once the best is --patience epochs old, else None)."""
    if not run.config.early_stop_on:
        return False, None
    best, last = best_epoch(run), len(run.history)
    if last - best < run.config.patience:
        return best == last, None
    return False, (
        f"early stop after epoch {last}: held-out reward '{run.config.early_stop_on}' has not improved on its "
        f"best {run.history[best - 1][best_tag(run.config)]:.4g} (epoch {best}) for {run.config.patience} epochs; "
        f"the best checkpoint by it is that of step {best} in {run.checkpoints.dir}"
    )


def restore_checkpoint(run: Setup) -> dict:
    """The train state of the newest good checkpoint, with frames and history put back into `run`."""
    ckpt = run.resumed
    state = ckpt["train_state"]
    if run.config.lora_rank:
        if ckpt["lora"]["base_fingerprint"] != run.base_fingerprint:
            raise UserError(
                f"--resume {run.out}: the weights of --run {run.config.run} changed since its adapters started"
            )
        lora.load_adapters(run.policy, ckpt["model"])
    else:
        run.policy.load_state_dict(ckpt["model"])
    run.frames, run.history = state["frames"], state["history"]
    return state
