"""`rl-diffusion finetune`'s config: `FinetuneConfig` with its checks, and the defaults of image runs
and of each algorithm (`config_for`). An algorithm's own settings are declared in its module
(`Settings`); the config holds the chosen one's in `algo_args`, and config.json holds them as flags.

The algorithms live in rl_diffusion/algos/, the services they share (setup, logging, checkpoints)
in rl_diffusion/run.py. A fine-tuning run's directory holds a checkpoint in the same format as
pretraining, so `sample` and `evaluate` accept it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from rewards import URL_SCHEMES
from rl_diffusion.algos import AGENT_ALGOS, ALGOS, NATIVE, SB3, algorithm
from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.config import arg, config_from_dict
from rl_diffusion.diffusion import LOG_PROB_REDUCTIONS
from rl_diffusion.errors import UserError, nearest
from rl_diffusion.flow import FlowMatching
from rl_diffusion.precision import check_precision
from rl_diffusion.processes import check_sampler, deterministic_sampler, is_deterministic, is_memoryless

AGENT_ACTION_MODES = ("residual", "noise")


@dataclass(frozen=True)
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
    algo_args: dict = dataclasses.field(
        default_factory=dict,
        metadata={"help": "the settings of the native --algo that were given, by name (the others: its defaults)"},
    )
    action_mode: str = arg(
        "residual",
        "sb3-sac, sb3-td3, sb3-a2c, sb3-ppo-mlp: residual (shift each pretrained step's mean, in units "
        "of its sigma) | noise (choose x_T of the deterministic sampler, DDIM or a flow's ODE, over --sampling-steps)",
    )
    chains: int = arg(256, "denoising chains sampled per epoch (the batch; SB3: parallel envs)")
    epochs: int = arg(30, "sampling rounds")
    total_steps: int = arg(
        0, "budget in denoising steps (chains x steps per chain x epochs); overrides --epochs when > 0"
    )
    lr: float = arg(1e-3, "AdamW learning rate of the policy")
    lr_decay: float = arg(
        0.0,
        "native: the last fraction of the run's epochs over which every learning rate falls linearly towards 0 "
        "(0 = constant)",
    )
    clip_range: float = arg(0.2, "PPO clip on the ratio pi/pi_old (log-prob units: see --log-prob-reduction)")
    adv_clip: float = arg(
        5.0, "clip standardised advantages to [-adv_clip, adv_clip] (ddpo-is --kl-return path: nats of soft return)"
    )
    inner_epochs: int = arg(
        1,
        "passes over each sampled batch (ddpo-is, rwr, sb3-ppo, sb3-ppo-mlp, ...); "
        "gradient steps per env step (sb3-sac, sb3-td3)",
    )
    minibatch_size: int = arg(
        1024,
        "(trajectory, timestep) pairs per gradient step (ddpo-is, adjoint, rwr, awm, sb3-ppo; iw-distill: samples)",
    )
    memory_mib: float = arg(
        2048.0,
        "MiB the process may hold in an update (ddpo-sf, ddpo-is, rtb, adjoint, draft; resident set on a CPU, "
        "allocated on a GPU): the batch is split into the fewest groups whose tensors kept for backward, measured "
        "on the run's network, fit beside what the process held at its first update; splitting changes the "
        "gradient only by rounding",
    )
    timestep_fraction: float = arg(1.0, "fraction of each chain's timesteps trained on per epoch (ddpo-is)")
    kl_coef: float = arg(
        0.0,
        "beta of the exact path KL to the pretrained model (0 = off; adjoint, rtb and iw-distill, which aim at "
        "r / beta, default to 1); with --kl-target, beta's starting value",
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
    log_prob_reduction: str = arg(
        "sum", "sum (exact log-density) | mean (per dimension; shrink --clip-range; the KL term is averaged alike)"
    )
    grad_clip: float = arg(1.0, "clip the gradient's global norm to this (0 = no clipping)")
    sampler: str = arg(
        "ddpm", "ddpm | ddim: the reverse chain the policy acts in; a flow run's: sde (its default) | euler (the ODE)"
    )
    sampling_steps: int = arg(0, "DDIM (or flow) steps per chain (0 = all T)")
    eta: float = arg(
        1.0,
        "DDIM stochasticity in (0, 1]; sde: noise level, sigma_t = eta sqrt(2 t / (1 - t)), any eta > 0; below 1 the "
        "chain keeps memory of x_T and the KL optimum is out of reach",
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
    null_label: bool = arg(
        False,
        "class-conditional models: run every chain on the null label, the unconditional model that pretraining's "
        "label dropout trained, so a reward that fights the labels (a class reward) tilts it freely",
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
        self.validate_algo_args()
        for name in ("chains", "epochs", "inner_epochs", "minibatch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.eval_samples < 0:
            raise UserError(f"--eval-samples must be >= 0 (0 = the default for the data), got {self.eval_samples}")
        if self.grad_clip < 0:
            raise UserError(f"--grad-clip must be >= 0 (0 = no clipping), got {self.grad_clip}")
        for name in ("lr", "clip_range", "adv_clip", "memory_mib"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.timestep_fraction <= 1:
            raise UserError(f"--timestep-fraction must be in (0, 1], got {self.timestep_fraction}")
        if not 0 <= self.lr_decay <= 1:
            raise UserError(f"--lr-decay must be in [0, 1] (0 = a constant learning rate), got {self.lr_decay}")
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
        if self.algo in SB3:
            self.validate_sb3()
        check_sampler(self.sampler, self.eta)
        if self.algo in NATIVE:
            self.validate_native()
        elif self.eta <= 0:
            raise UserError(
                "--eta must be > 0: a deterministic chain has no log-prob to train "
                "(noise mode runs the deterministic sampler by itself)"
            )
        elif is_deterministic(self.sampler, self.eta):
            raise UserError(f"--sampler {self.sampler} is deterministic: no log-prob to train; use --sampler sde")
        if self.log_prob_reduction not in LOG_PROB_REDUCTIONS:
            raise UserError(f"unknown --log-prob-reduction '{self.log_prob_reduction}'; choose sum or mean")
        self.validate_on_reward_failure()
        self.validate_lora_and_precision()
        if self.x_axis not in ("epoch", "reward_queries"):
            raise UserError(f"unknown --x-axis '{self.x_axis}'; choose epoch or reward_queries")

    def validate_algo_args(self) -> None:
        """The given settings are the chosen algorithm's: the CLI and config.json keep no other, but a caller may."""
        own = setting_names(self.algo)
        unknown = sorted(set(self.algo_args) - own)
        if unknown:
            listed = ", ".join(sorted(own)) or "none"
            raise UserError(f"--algo {self.algo} has no setting {', '.join(unknown)}; its own: {listed}")

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
        if algo.needs_log_prob or self.kl_coef > 0:
            needs = f"--algo {self.algo} scores actions" if algo.needs_log_prob else "the path KL (--kl-coef) needs"
            if self.eta <= 0:
                raise UserError(
                    f"--eta must be > 0: {needs} on a stochastic chain, and with eta 0 the chain is deterministic"
                )
            if is_deterministic(self.sampler, self.eta):
                raise UserError(f"--sampler {self.sampler} is deterministic: {needs} on a stochastic chain (sde)")
        if algo.needs_memoryless and not is_memoryless(self.sampler, self.eta):
            raise UserError(
                f"--algo {self.algo} needs a memoryless chain (one that forgets x_T): use --sampler ddpm, or ddim "
                f"with --eta 1 (a flow run: sde with --eta >= 1); with --sampler {self.sampler} --eta {self.eta} its "
                "fixed point is not p_pre exp(r / beta) / Z (docs/design.md, sections 2 and 10)"
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

    def validate_sb3(self) -> None:
        """Refuse what the native loop does and stable-baselines3's loop does not."""
        refused = {
            "--timestep-fraction": self.timestep_fraction < 1,
            "--skip-nonfinite-rewards": self.skip_nonfinite_rewards,
            "--on-reward-failure skip": self.on_reward_failure == "skip",
            "--null-label": self.null_label,
            "--lr-decay": self.lr_decay > 0,
            # sb3-ppo's policy is the diffusion model, whose log-probs the flag reduces; the agents' are SB3's own
            "--log-prob-reduction": self.algo in AGENT_ALGOS and self.log_prob_reduction != "sum",
        }
        given = [flag for flag, refuse in refused.items() if refuse]
        if given:
            instead = "; use --algo ddpo-is for them" if self.algo == "sb3-ppo" else ""
            raise UserError(f"--algo {self.algo} does not support {', '.join(given)}{instead}")

    def validate_agent(self) -> None:
        if self.action_mode not in AGENT_ACTION_MODES:
            raise UserError(
                f"unknown --action-mode '{self.action_mode}' for --algo {self.algo}; choose residual or noise"
            )
        if self.action_mode == "noise" and self.kl_coef > 0:
            raise UserError(
                "--kl-coef needs a closed-form KL per step, which --action-mode residual has and noise does not"
            )

    @property
    def max_grad_norm(self) -> float:
        """--grad-clip as clip_grad_norm_ (and stable-baselines3) take it: 0 is no clipping, an infinite norm."""
        return self.grad_clip or math.inf

    @property
    def settings(self):
        """The native algorithm's own settings (its `Settings`, rl_diffusion/algos/): algo_args over their defaults."""
        return algorithm(self.algo).Settings(**self.algo_args)

    def to_dict(self) -> dict:
        """The config as config.json holds it: one value per flag, the algorithm's settings among them (every one,
        the defaults of those not given), so that a run is reproducible from it; `gather_settings` reads it back."""
        fields = dataclasses.asdict(self)
        del fields["algo_args"]
        return {**fields, **(dataclasses.asdict(self.settings) if self.algo in NATIVE else {})}

    @classmethod
    def gather_settings(cls, values: dict) -> dict:
        """The fields of flat values, as flags and config.json give them: the chosen algorithm's settings gathered
        in algo_args. Another native algorithm's are dropped, as they set nothing in this run: one set of flags may
        serve a study of several algorithms, and config.json held every algorithm's settings before they moved to
        the algorithms (rl_diffusion.config.config_from_dict calls this)."""
        own = setting_names(values.get("algo", cls.algo))
        every = set().union(*map(setting_names, NATIVE))
        fields = {name: value for name, value in values.items() if name not in every}
        given = {name: value for name, value in values.items() if name in own}
        return {**fields, "algo_args": {**values.get("algo_args", {}), **given}}

    @property
    def sampling(self) -> dict:
        """Keyword arguments of GaussianDiffusion.sample/reverse_step for the chain the run samples with.

        Noise mode runs the deterministic sampler of --sampler's process (DDIM with eta = 0; a flow's Euler ODE)
        over --sampling-steps, whatever --eta says.
        """
        if self.algo in AGENT_ALGOS and self.action_mode == "noise":
            return {
                "sampler": deterministic_sampler(self.sampler),
                "sampling_steps": self.sampling_steps or None,
                "eta": 0.0,
            }
        return {"sampler": self.sampler, "sampling_steps": self.sampling_steps or None, "eta": self.eta}


# Defaults that differ for image runs (docs/design.md, section 9). A U-Net step costs ~100x an MLP step on
# a CPU, so chains take 50 DDIM steps with eta = 1 (memoryless: the KL optimum stays reachable), or all T
# where T is shorter: on DDPO's 20 the digit-3 fine-tune kept 0.72 of the real 3s' variety, on 50 it keeps
# 0.82 (docs/benchmarks.md) for 2.3x the time;
# beta = 1 holds the policy to the data: for a log-probability reward log p(y | x) the optimum
# p_pre(x) p(y | x) / Z is the pretrained model's own images of class y, where beta = 0 let every sample
# become one pattern that fools the classifier; and DDPO's lr 3e-4, since at 1e-3 the first epochs jump
# tens of nats away and the policy collapses onto one shape before the KL term can pull it back.
IMAGE_DEFAULTS = {"sampler": "ddim", "sampling_steps": 50, "eta": 1.0, "kl_coef": 1.0, "chains": 128, "lr": 3e-4}


# A flow run's chain: the sde (docs/design.md, section 10), with the default --eta 1 its memoryless schedule.
FLOW_DEFAULTS = {"sampler": FlowMatching.POLICY_SAMPLER}


def algorithm_settings() -> dict[str, type]:
    """Each native algorithm's `Settings` by --algo: their fields are flags of finetune beside the config's."""
    return {name: algorithm(name).Settings for name in NATIVE}


def setting_names(algo: str) -> set[str]:
    """The names of --algo's own settings: none for the sb3 family, or an unknown name."""
    return {f.name for f in dataclasses.fields(algorithm(algo).Settings)} if algo in NATIVE else set()


def config_for(flags: dict) -> FinetuneConfig:
    """The config of the given flags (an algorithm's settings among them, by name) over the algorithm's own
    defaults, over those of the pretrained run's process (DDPM or flow) and data (points or images)."""
    run = Path(flags.get("run") or FinetuneConfig.run)
    try:
        ckpt = CheckpointManager(run).load_latest()
        image = len(ckpt["data"]["shape"]) > 1
        flow = ckpt["diffusion_config"].get("model_type") == "flow"
        T = ckpt["diffusion_config"]["num_timesteps"]
    except (UserError, OSError, KeyError):
        image = flow = False  # setup() says what is wrong with --run
    algo = flags.get("algo", FinetuneConfig.algo)
    native = algorithm(algo) if algo in NATIVE else None
    algo_defaults = {} if native is None else {**native.defaults, **(native.image_defaults if image else {})}
    data_defaults = {**(IMAGE_DEFAULTS if image else {}), **(FLOW_DEFAULTS if flow else {})}
    if image and data_defaults["sampling_steps"] >= T:  # a chain of fewer steps than the default runs all T
        data_defaults["sampling_steps"] = 0
    return config_from_dict(FinetuneConfig, {**data_defaults, **algo_defaults, **flags})
