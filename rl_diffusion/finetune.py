"""`rl-diffusion finetune`: the config, the run's shared setup, per-epoch logging and checkpoints.

The algorithms live in rl_diffusion/algos/ and share everything here: the native ones
(ddpo-sf, ddpo-is, rwr, ...) through the epoch loop of algos/loop.py, the sb3 family through
SB3's own loop. A run directory of a fine-tuning run holds a checkpoint in the same format as
pretraining, so `sample` and `evaluate` accept it.
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
from rewards import URL_SCHEMES, Reward, RewardError, build_reward, fingerprint_changes, finite_mean
from rewards.remote import served
from rl_diffusion import distributed, figures, lora
from rl_diffusion.algos import AGENT_ALGOS, ALGOS, NATIVE, algorithm
from rl_diffusion.checkpoint import (
    CheckpointManager,
    LoadedRun,
    load_run,
    prepare_run_dir,
    read_run_config,
)
from rl_diffusion.config import arg, to_markdown_table
from rl_diffusion.diffusion import LOG_PROB_REDUCTIONS, GaussianDiffusion, check_sampler, is_memoryless
from rl_diffusion.distributed import NoWriter, Ranks
from rl_diffusion.errors import UserError, nearest
from rl_diffusion.metrics import diversity, entropy, mode_masses, vendi_score
from rl_diffusion.precision import autocast_forward, check_precision
from rl_diffusion.targets import Modes, dataset_modes

AGENT_ACTION_MODES = ("residual", "noise")
MODE_HELD_MASS = 0.01  # a mode holds samples when at least this fraction of the batch lies in it (diversity/modes_held)


@dataclass
class FinetuneConfig:
    # --pretrained: under torchrun, whose own parser reads --run as an abbreviation of its --run-path
    run: str = arg("", "pretrained run directory to start from (also --pretrained)", aliases=("--pretrained",))
    reward: str = arg(
        "target_point",
        "reward name, module:factory, or entry point (see `rl-diffusion rewards`); http://HOST:PORT of a reward "
        "served by `rl-diffusion serve-reward` (its --reward-arg are then the client's: timeout, retries, backoff, "
        "batch); or a weighted sum of those, '0.7*in_region+0.3*target_point', each term [WEIGHT*][LABEL=]REWARD "
        "with --reward-arg LABEL:KEY=VALUE",
    )
    reward_args: dict = dataclasses.field(default_factory=dict, metadata={"help": "reward keyword arguments"})
    on_reward_failure: str = arg(
        "stop",
        "a served reward's batch that still fails after its retries: stop (exit 2; the last good checkpoint stays) "
        "| skip (drop those chains, counted in reward/missing); never scored 0",
    )
    eval_rewards: dict = dataclasses.field(
        default_factory=dict,
        metadata={
            "help": "held-out rewards, scored on every epoch's x_0 and never trained on: "
            "{label: {'reward': spec, 'reward_args': {...}}}"
        },
    )
    early_stop_on: str = arg(
        "",
        "label of an --eval-reward: stop once its mean has not improved on its best for --patience epochs; "
        "the best checkpoint is then elected by it (the native algorithms, not sb3-*)",
    )
    patience: int = arg(0, "--early-stop-on: epochs without a new best held-out mean before the run stops")
    algo: str = arg(
        "ddpo-is",
        f"{' | '.join(NATIVE)} | sb3-ppo (the diffusion model is the policy) | {' | '.join(AGENT_ALGOS)} "
        "(SB3's default policy steering the frozen pretrained model, see --action-mode)",
    )
    action_mode: str = arg(
        "residual",
        "sb3-sac, sb3-td3, sb3-a2c, sb3-ppo-mlp: residual (shift each pretrained step's mean, in units "
        "of its sigma) | noise (choose x_T of deterministic DDIM over --sampling-steps)",
    )
    chains: int = arg(256, "denoising chains sampled per epoch (the batch; SB3: parallel envs)")
    epochs: int = arg(30, "sampling rounds")
    total_steps: int = arg(
        0, "budget in denoising steps (chains x steps per chain x epochs); overrides --epochs when > 0"
    )
    lr: float = arg(1e-3, "AdamW learning rate of the policy")
    clip_range: float = arg(0.2, "PPO clip on the ratio pi/pi_old (log-prob units: see --log-prob-reduction)")
    adv_clip: float = arg(5.0, "clip standardised advantages to [-adv_clip, adv_clip]")
    inner_epochs: int = arg(
        1,
        "passes over each sampled batch (ddpo-is, rwr, sb3-ppo, sb3-ppo-mlp, ...); "
        "gradient steps per env step (sb3-sac, sb3-td3)",
    )
    minibatch_size: int = arg(1024, "(trajectory, timestep) pairs per gradient step (ddpo-is, rwr, sb3-ppo)")
    timestep_fraction: float = arg(1.0, "fraction of each chain's timesteps trained on per epoch (ddpo-is)")
    kl_coef: float = arg(
        0.0, "beta of the exact path KL to the pretrained model (0 = off); with --kl-target, beta's starting value"
    )
    kl_target: float = arg(
        0.0,
        "nats of mean path KL per chain to hold by adapting beta after each epoch (native algorithms with a KL term) "
        "(Ziegler et al. 2019; logged as kl/beta); 0 = beta fixed at --kl-coef",
    )
    kl_gain: float = arg(
        0.5,
        "--kl-target: K_beta, in (0, 5); beta changes by at most a factor 1 +- 0.2 K_beta per epoch, "
        "so 1 / K_beta epochs is the controller's horizon",
    )
    rwr_temperature: float = arg(
        1.0,
        "rwr: softmax temperature on rewards, reward units; each epoch fits p_old exp(r / T), so the tilt "
        "compounds over epochs with nothing holding it to the pretrained model",
    )
    log_prob_reduction: str = arg(
        "sum", "sum (exact log-density) | mean (per dimension; shrink --clip-range; the KL term is averaged alike)"
    )
    grad_clip: float = arg(1.0, "clip the gradient's global norm to this")
    sampler: str = arg("ddpm", "ddpm | ddim: the reverse chain the policy acts in")
    sampling_steps: int = arg(0, "DDIM steps per chain (0 = all T)")
    eta: float = arg(
        1.0, "DDIM stochasticity in (0, 1]; below 1 the chain keeps memory of x_T and the KL optimum is out of reach"
    )
    x_axis: str = arg("epoch", "TensorBoard step axis: epoch | reward_queries (samples scored so far)")
    seed: int = arg(0, "seed of every random draw in the run")
    checkpoint_every: int = arg(5, "epochs between checkpoints")
    keep_checkpoints: int = arg(3, "checkpoints kept (plus the best)")
    eval_samples: int = arg(
        0,
        "samples of the final evaluation against the pretrained model and the exact target (0 = 5,000 for "
        "points, 500 for images: each image sample costs a U-Net call per step for three models)",
    )
    final_eval: bool = arg(
        True,
        "evaluate the finished run; with --no-final-eval metrics.json holds the training summary only "
        "(`rl-diffusion evaluate --run OUT` scores the run later)",
    )
    skip_nonfinite_rewards: bool = arg(
        False, "drop samples whose reward is nan/inf (counted in TensorBoard) instead of stopping"
    )
    device: str = arg("cpu", "cpu | cuda | cuda:N")
    draft_steps: int = arg(
        0, "draft: back-propagate through the last K denoising steps (0 = all: the exact pathwise gradient)"
    )
    explore_scale: float = arg(
        1.0, "rtb: sigma multiplier of the exploratory sampler that draws the training chains (1 = on-policy)"
    )
    explore_epochs: int = arg(0, "rtb: epochs at the full --explore-scale before it decays (0 = for the whole run)")
    explore_decay_epochs: int = arg(0, "rtb: epochs of linear decay of --explore-scale to 1 after --explore-epochs")
    replay_size: int = arg(0, "rtb: chains kept in the replay buffer (0 = none)")
    replay_fraction: float = arg(0.5, "rtb: fraction of each update's chains drawn from the replay buffer")
    log_z_lr: float = arg(0.1, "rtb: learning rate of log Z")
    pool_size: int = arg(
        10_000,
        "iw-distill: chains drawn and scored per epoch (reward queries), weighted towards the tilt; its defaults "
        "differ: --epochs 3 --kl-coef 1 --lr 5e-4 --minibatch-size 512 (samples per gradient step)",
    )
    distill_steps: int = arg(4000, "iw-distill: gradient steps of the denoising loss per epoch, on resampled pools")
    ess_target: float = arg(
        0.25,
        "iw-distill: effective sample size, as a fraction of the pool, that each tempering stage keeps; below it the "
        "epoch fits an intermediate tilt exp(r / beta_e), beta_e > beta",
    )
    lora_rank: int = arg(
        0,
        "train rank-R adapters on the policy's Linear and Conv2d layers, the pretrained weights frozen "
        "(native algorithms; checkpoints hold the adapters and point at --run); 0 = train every weight",
    )
    lora_alpha: float = arg(0.0, "--lora-rank: adapters scaled by alpha / rank (0 = the rank: scale 1)")
    precision: str = arg(
        "fp32",
        "fp32 | bf16 | fp16: the network's forward under torch.autocast; log-probs, ratios and the KL stay fp32 "
        "(fp16 has no loss scaler: prefer bf16)",
    )

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise UserError(
                f"unknown --algo '{self.algo}'{nearest(self.algo, ALGOS)}; choose one of {', '.join(ALGOS)}"
            )
        if not self.run:
            raise UserError("finetune needs --run PRETRAINED_RUN (the --out of rl-diffusion pretrain)")
        for name in ("chains", "epochs", "inner_epochs", "minibatch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.eval_samples < 0:
            raise UserError(f"--eval-samples must be >= 0 (0 = the default for the data), got {self.eval_samples}")
        for name in ("lr", "clip_range", "adv_clip", "rwr_temperature", "grad_clip"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.timestep_fraction <= 1:
            raise UserError(f"--timestep-fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.kl_coef < 0:
            raise UserError(f"--kl-coef must be >= 0, got {self.kl_coef}")
        if self.kl_target:
            self.validate_kl_target()
        if self.early_stop_on or self.patience:
            self.validate_early_stop()
        if self.algo in AGENT_ALGOS:
            self.validate_agent()
        elif self.action_mode != "residual":
            raise UserError(
                f"--action-mode applies to {', '.join(AGENT_ALGOS)}; --algo {self.algo} acts on x_{{t-1}} itself"
            )
        check_sampler(self.sampler, self.eta)
        if self.algo in NATIVE:
            self.validate_native()
        elif self.eta <= 0:
            raise UserError(
                "--eta must be > 0: a deterministic chain has no log-prob to train "
                "(noise mode runs DDIM with eta 0 by itself)"
            )
        if self.log_prob_reduction not in LOG_PROB_REDUCTIONS:
            raise UserError(f"unknown --log-prob-reduction '{self.log_prob_reduction}'; choose sum or mean")
        self.validate_on_reward_failure()
        self.validate_lora_and_precision()
        if self.x_axis not in ("epoch", "reward_queries"):
            raise UserError(f"unknown --x-axis '{self.x_axis}'; choose epoch or reward_queries")
        sb3_refused = {
            "--timestep-fraction": self.timestep_fraction < 1,
            "--skip-nonfinite-rewards": self.skip_nonfinite_rewards,
            "--on-reward-failure skip": self.on_reward_failure == "skip",
        }
        if self.algo == "sb3-ppo" and any(sb3_refused.values()):
            flags = ", ".join(flag for flag, given in sb3_refused.items() if given)
            raise UserError(f"--algo sb3-ppo does not support {flags}; use --algo ddpo-is for them")

    def validate_on_reward_failure(self) -> None:
        if self.on_reward_failure not in ("stop", "skip"):
            raise UserError(f"unknown --on-reward-failure '{self.on_reward_failure}'; choose stop or skip")
        if self.on_reward_failure == "skip" and not any(scheme in self.reward for scheme in URL_SCHEMES):
            raise UserError(
                "--on-reward-failure skip applies to a served reward (--reward http://HOST:PORT); "
                f"reward '{self.reward}' runs in this process, where a failure is a bug to fix"
            )

    def validate_lora_and_precision(self) -> None:
        if self.lora_rank < 0:
            raise UserError(f"--lora-rank must be >= 0 (0: no adapters), got {self.lora_rank}")
        if self.lora_alpha < 0:
            raise UserError(f"--lora-alpha must be > 0 (or 0: the rank), got {self.lora_alpha}")
        if self.lora_alpha and not self.lora_rank:
            raise UserError("--lora-alpha scales the adapters of --lora-rank R; give a rank too")
        check_precision(self.precision)
        if self.algo.startswith("sb3-") and (self.lora_rank or self.precision != "fp32"):
            flag = "--lora-rank" if self.lora_rank else "--precision"
            raise UserError(f"{flag} applies to the native algorithms; --algo {self.algo} trains through SB3")

    def validate_native(self) -> None:
        """What the chosen algorithm declares it needs (algos/base.py), then its own checks."""
        algo = algorithm(self.algo)
        if self.eta <= 0 and (algo.needs_log_prob or self.kl_coef > 0):
            needs = f"--algo {self.algo} scores actions" if algo.needs_log_prob else "the path KL (--kl-coef) needs"
            raise UserError(
                f"--eta must be > 0: {needs} on a stochastic chain, and with eta 0 the chain is deterministic"
            )
        if algo.needs_memoryless and not is_memoryless(self.sampler, self.eta):
            raise UserError(
                f"--algo {self.algo} needs a memoryless chain (one that forgets x_T): use --sampler ddpm, or ddim "
                f"with --eta 1; with --eta {self.eta} its fixed point is not p_pre exp(r / beta) / Z "
                "(docs/design.md, section 2)"
            )
        algo.validate(self)

    def validate_kl_target(self) -> None:
        if self.kl_target < 0:
            raise UserError(f"--kl-target must be >= 0 nats, got {self.kl_target}")
        if self.algo not in NATIVE or not algorithm(self.algo).uses_kl:
            raise UserError(
                f"--kl-target adapts the beta of the native algorithms with a KL term; --algo {self.algo} has none"
            )
        if self.kl_coef <= 0:
            raise UserError("--kl-target adapts beta multiplicatively from --kl-coef; give a starting --kl-coef > 0")
        if not 0 < self.kl_gain < 5:
            raise UserError(f"--kl-gain must be in (0, 5) so that beta stays positive, got {self.kl_gain}")

    def validate_early_stop(self) -> None:
        if not self.early_stop_on:
            raise UserError("--patience applies to --early-stop-on LABEL; give both or neither")
        if self.early_stop_on not in self.eval_rewards:
            labels = list(self.eval_rewards)
            raise UserError(
                f"--early-stop-on '{self.early_stop_on}' names no --eval-reward{nearest(self.early_stop_on, labels)}; "
                f"given: {', '.join(labels) or 'none'}"
            )
        if self.patience < 1:
            raise UserError(f"--early-stop-on needs --patience of at least 1 epoch, got {self.patience}")
        if self.algo.startswith("sb3-"):
            raise UserError(
                f"--early-stop-on stops the native algorithms' loop; --algo {self.algo} runs SB3's own loop"
            )

    def validate_agent(self) -> None:
        if self.action_mode not in AGENT_ACTION_MODES:
            raise UserError(
                f"unknown --action-mode '{self.action_mode}' for --algo {self.algo}; choose residual or noise"
            )
        if self.action_mode == "noise" and self.kl_coef > 0:
            raise UserError(
                "--kl-coef needs a closed-form KL per step, which --action-mode residual has and noise does not"
            )
        refused = {
            "--timestep-fraction": self.timestep_fraction < 1,
            "--skip-nonfinite-rewards": self.skip_nonfinite_rewards,
            "--on-reward-failure skip": self.on_reward_failure == "skip",
            "--log-prob-reduction": self.log_prob_reduction != "sum",
        }
        if any(refused.values()):
            raise UserError(
                f"--algo {self.algo} does not support {', '.join(flag for flag, given in refused.items() if given)}"
            )

    @property
    def sampling(self) -> dict:
        """Keyword arguments of GaussianDiffusion.sample/reverse_step for the chain the run samples with.

        Noise mode runs DDIM with eta = 0 over --sampling-steps, whatever --sampler and --eta say.
        """
        if self.algo in AGENT_ALGOS and self.action_mode == "noise":
            return {"sampler": "ddim", "sampling_steps": self.sampling_steps or None, "eta": 0.0}
        return {"sampler": self.sampler, "sampling_steps": self.sampling_steps or None, "eta": self.eta}


# Defaults that differ for image runs (docs/design.md, section 9). A U-Net step costs ~100x an MLP step on
# a CPU, so chains take DDPO's few DDIM steps with eta = 1 (memoryless: the KL optimum stays reachable);
# beta = 1 holds the policy to the data: for a log-probability reward log p(y | x) the optimum
# p_pre(x) p(y | x) / Z is the pretrained model's own images of class y, where beta = 0 let every sample
# become one pattern that fools the classifier; and DDPO's lr 3e-4, since at 1e-3 the first epochs jump
# tens of nats away and the policy collapses onto one shape before the KL term can pull it back.
IMAGE_DEFAULTS = {"sampler": "ddim", "sampling_steps": 20, "eta": 1.0, "kl_coef": 1.0, "chains": 128, "lr": 3e-4}


def config_for(flags: dict) -> FinetuneConfig:
    """The config of the given flags over the algorithm's own defaults, over those of the pretrained run's data
    (points or images)."""
    run = Path(flags.get("run") or FinetuneConfig.run)
    try:
        image = len(CheckpointManager(run).load_latest()["data"]["shape"]) > 1
    except (UserError, OSError, KeyError):
        image = False  # setup() says what is wrong with --run
    algo = flags.get("algo", FinetuneConfig.algo)
    algo_defaults = algorithm(algo).defaults if algo in NATIVE else {}
    return FinetuneConfig(**{**(IMAGE_DEFAULTS if image else {}), **algo_defaults, **flags})


@dataclass
class Setup:
    """Everything an algorithm needs; built once by `setup()`, the same for every algo."""

    config: FinetuneConfig
    out: Path
    device: torch.device
    diffusion: GaussianDiffusion
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
    if ranks.world_size > 1:
        if config.algo.startswith("sb3-"):
            raise UserError(f"--algo {config.algo} runs in one process; under torchrun use ddpo-sf, ddpo-is or rwr")
        if config.skip_nonfinite_rewards or config.on_reward_failure == "skip":
            flag = "--skip-nonfinite-rewards" if config.skip_nonfinite_rewards else "--on-reward-failure skip"
            raise UserError(f"{flag} would leave the ranks with unequal batches; it needs a single process")
    ranks.shard(config.chains, "--chains")  # an uneven split is refused before anything is written
    pretrained = load_run(Path(config.run), device)
    if pretrained.checkpoint["kind"] != "pretrain":
        raise UserError(f"--run {config.run} is a {pretrained.checkpoint['kind']} run; fine-tune from a pretrain run")
    reward = build_reward(
        config.reward,
        config.reward_args,
        skip_nonfinite=config.skip_nonfinite_rewards,
        on_failure=config.on_reward_failure,
    )
    out = Path(out)
    if resume:
        check_reward_unchanged(out, reward)
    if config.algo in NATIVE and algorithm(config.algo).needs_reward_gradient and not reward.differentiable:
        raise UserError(
            f"--algo {config.algo} needs the reward's gradient and reward '{reward.name}' does not declare itself "
            "differentiable; choose a differentiable reward (see `rl-diffusion rewards`) or a policy-gradient algorithm"
        )
    eval_rewards = build_eval_rewards(config.eval_rewards)
    data_shape = tuple(pretrained.checkpoint["data"]["shape"])
    num_classes = int(pretrained.checkpoint["model_config"].get("num_classes") or 0)
    probe_labels = torch.zeros(2, dtype=torch.long, device=device) if num_classes else None
    for r in (reward, *eval_rewards.values()):  # a reward that fails on its input fails now
        r(torch.zeros((2, *data_shape), device=device), probe_labels)
    diffusion = pretrained.diffusion
    steps = len(diffusion.timesteps(config.sampling["sampler"], config.sampling_steps or None))
    if config.algo in NATIVE:
        algorithm(config.algo).validate_chain(config, steps)
    epochs = config.epochs
    if config.total_steps > 0:
        epochs = max(1, config.total_steps // (config.chains * steps))
    if not resume and ranks.is_main:
        saved = dict(kind="finetune", **dataclasses.asdict(config), reward_fingerprint=reward.fingerprint)
        prepare_run_dir(out, json.dumps(saved, indent=2), overwrite)
    if config.kl_coef > 0 and not is_memoryless(config.sampler, config.eta) and ranks.is_main:
        print(
            f"warning: DDIM with --eta {config.eta} keeps memory of x_T, so the KL-regularised optimum "
            "p_pre exp(r / beta) / Z is out of reach (docs/design.md, section 2); "
            "use --eta 1 or --sampler ddpm to aim at it",
            file=sys.stderr,
        )
    torch.manual_seed(config.seed)
    # eval mode for good: sampling, rescoring and the update must see one network (dropout would
    # break ratio = 1 and KL = 0 before the first update)
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
    checkpoints = CheckpointManager(out, keep=config.keep_checkpoints)
    resumed = checkpoints.load_latest(map_location=device) if resume else None
    purge_step = None
    if resumed is not None:  # TensorBoard drops what was logged after the checkpoint: no duplicate points
        state = resumed["train_state"]
        purge_step = state["epoch"] + 1 if config.x_axis == "epoch" else state["reward_queries"] + 1
    writer = distributed.summary_writer(ranks, out, purge_step=purge_step)
    eval_data = reference_draws(data_of_checkpoint(pretrained.checkpoint["data"]), 2000, EVAL_DATA_SEED)[0]
    return Setup(
        config=config,
        out=out,
        device=device,
        diffusion=diffusion,
        policy=policy,
        reference=reference,
        pretrained=pretrained,
        reward=reward,
        data_shape=data_shape,
        epochs=epochs,
        writer=writer,
        checkpoints=checkpoints,
        resumed=resumed,
        eval_data=eval_data,
        picture=figures.samples_picture(eval_data),
        ranks=ranks,
        synced_policy=ranks.wrap(policy),
        eval_rewards=eval_rewards,
        label_classifier=label_classifier(data_shape, device),
        modes=dataset_modes(pretrained.checkpoint["data"]["dataset"]),
        base_fingerprint=base_fingerprint,
    )


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


def monitor_scalars(
    x0: Tensor, data: np.ndarray, modes: Modes | None, classifier: nn.Module | None = None
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
      0 for one digit.
    """
    flat = x0.detach().flatten(1).double()
    reference = torch.tensor(data, dtype=torch.float64, device=flat.device).flatten(1)  # a copy: data may be read-only
    if len(reference):
        nearest = torch.cdist(flat, reference).min(dim=1).values / flat.shape[1] ** 0.5
    else:  # a network imported without its data (rl_diffusion/diffusers_io.py): nothing to be near
        nearest = flat.new_full((len(flat),), torch.nan)
    values = {"realism/nearest_data": nearest.mean().item(), "diversity/pairwise": diversity(flat)}
    if classifier is not None:
        with torch.no_grad():
            labels = classifier(x0.detach().float()).argmax(dim=1)
        values["diversity/label_entropy"] = entropy(torch.bincount(labels, minlength=10) / len(labels))
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
    return warnings


def score(s: Setup, x0: Tensor, c: Tensor | None, epoch: int) -> Tensor:
    """Rewards of a batch, called once.

    A non-finite reward stops the run (the last good checkpoint stays) unless
    --skip-nonfinite-rewards, which drops those samples and counts them.
    """
    try:
        rewards = s.reward(x0, c)
    except RewardError as e:
        raise RewardError(f"{e}; stopped at epoch {epoch + 1}, the last good checkpoint is kept in {s.out}") from None
    s.component_means = {label: finite_mean(r) for label, r in s.reward.components.items()}
    if torch.isfinite(rewards).sum() < 2:
        missing = f" ({s.reward.missing} of {len(rewards)} missing: the server failed)" if s.reward.missing else ""
        raise RewardError(
            f"reward '{s.reward.name}' returned fewer than 2 finite values at epoch {epoch + 1}{missing}; nothing "
            f"to learn from; the last good checkpoint is kept in {s.out}"
        )
    return rewards


def peak_memory_mb(device: torch.device) -> float:
    """The run's peak memory so far in MiB: allocated tensors on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def log_epoch(
    s: Setup,
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
    step = epoch + 1 if s.config.x_axis == "epoch" else reward_queries
    finite = rewards[torch.isfinite(rewards)]
    with torch.no_grad():
        held_out = {label: reward(x0, c) for label, reward in s.eval_rewards.items()}
    values = {
        "reward/mean": finite.mean().item(),
        "reward/std": finite.std().item() if len(finite) > 1 else 0.0,
        "reward/min": finite.min().item(),
        "reward/max": finite.max().item(),
        "reward/nonfinite": float(len(rewards) - len(finite)),
        "perf/steps_per_sec": len(rewards) * s.steps_per_chain / seconds,
        "perf/reward_queries": float(reward_queries),
        "perf/epoch_seconds": seconds,
        "perf/peak_memory_mb": peak_memory_mb(s.device),
        **{f"eval_reward/{label}/mean": finite_mean(r) for label, r in held_out.items()},
        # a served reward: samples of the epoch's batch it failed to score (in reward/nonfinite too, and dropped)
        **({"reward/missing": float(s.reward.missing)} if served(s.reward) else {}),
        # a weighted sum: each component's unweighted mean over the scored batch (dropped chains included)
        **{f"reward/component/{label}/mean": mean for label, mean in s.component_means.items()},
        **monitor_scalars(x0, s.eval_data, s.modes, s.label_classifier),
        **scalars,
    }
    for tag, value in values.items():
        s.writer.add_scalar(tag, value, step)
    s.writer.add_histogram("reward/hist", finite.cpu(), step)
    samples = x0[: 64 if x0.dim() == 4 else 1000].detach().cpu().numpy()
    s.writer.add_image("samples", s.picture(samples, f"epoch {epoch + 1}"), step, dataformats="HWC")
    s.frames.append((f"epoch {epoch + 1}", samples))
    s.history.append({"epoch": epoch + 1, "reward_queries": reward_queries, **values})
    s.writer.flush()


def write_hyperparameters(s: Setup) -> None:
    s.writer.add_text("hyperparameters", to_markdown_table(dataclasses.asdict(s.config)), 0)
    if s.config.lora_rank:
        s.writer.add_scalar("lora/trainable_fraction", lora.trainable_fraction(s.policy), 0)


def best_tag(config: FinetuneConfig) -> str:
    """The history entry that elects the best checkpoint: the --early-stop-on held-out mean, else the
    training reward's mean."""
    return f"eval_reward/{config.early_stop_on}/mean" if config.early_stop_on else "reward/mean"


def save(s: Setup, epoch: int, train_state: dict) -> None:
    """Checkpoint after `epoch` (0-based) with the algorithm's own train state; the best by `best_tag`. Rank 0 only."""
    if not s.ranks.is_main:
        return
    mean = s.history[-1][best_tag(s.config)] if s.history else None
    state = {"epoch": epoch + 1, "frames": s.frames, "history": s.history, **train_state}
    s.checkpoints.save(s.checkpoint_payload(state), epoch + 1, mean)


def best_epoch(s: Setup) -> int:
    """The logged epoch (1-based) with the highest `best_tag` value; the first of equal values, so a tie
    is no improvement."""
    return 1 + int(np.argmax([h[best_tag(s.config)] for h in s.history]))


def early_stop(s: Setup) -> tuple[bool, str | None]:
    """Under --early-stop-on, after an epoch is logged: (that epoch set a new best held-out mean, so it
    must be checkpointed; why the run stops now, once the best is --patience epochs old, else None)."""
    if not s.config.early_stop_on:
        return False, None
    best, last = best_epoch(s), len(s.history)
    if last - best < s.config.patience:
        return best == last, None
    return False, (
        f"early stop after epoch {last}: held-out reward '{s.config.early_stop_on}' has not improved on its "
        f"best {s.history[best - 1][best_tag(s.config)]:.4g} (epoch {best}) for {s.config.patience} epochs; "
        f"the best checkpoint by it is that of step {best} in {s.checkpoints.dir}"
    )


def restore(s: Setup) -> dict:
    """The train state of the newest good checkpoint, with frames and history put back into `s`."""
    ckpt = s.resumed
    state = ckpt["train_state"]
    if s.config.lora_rank:
        if ckpt["lora"]["base_fingerprint"] != s.base_fingerprint:
            raise UserError(f"--resume {s.out}: the weights of --run {s.config.run} changed since its adapters started")
        lora.load_adapters(s.policy, ckpt["model"])
    else:
        s.policy.load_state_dict(ckpt["model"])
    s.frames, s.history = state["frames"], state["history"]
    return state
