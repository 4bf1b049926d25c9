"""RL benchmark on dino: env throughput, a fine-tuning race, and the KL-regularised optimum.

    python scripts/bench_rl.py [--pretrained RUN_DIR] [--epochs 30] [--out docs/benchmarks/rl.json]

Every RL part uses DDIM with 50 sampling steps (eta = 1) on a default dino model (T = 200),
pretrained here into a temporary directory unless --pretrained gives one.

1. Env throughput, in denoising (env) steps per second, after a warm-up rollout (a rollout is
   one full chain per env; rollouts repeated to at least 12,800 env steps, one for DummyVecEnv):
     - SB3 PPO's collect_rollouts over a DummyVecEnv of 16 single `DenoisingEnv`s (numpy per
       env, one network call per step for the 16), with the `DiffusionPolicy` of `make_ppo`;
     - SB3 PPO's collect_rollouts over the batched `DenoisingVecEnvAdapter` at 16, 256, 1,024 chains;
     - the bare batched sampler `GaussianDiffusion.sample(..., record=True)` (the ceiling).
2. A race on reward in_region (disc, center (2, -1), radius 1), 256 chains, seed 0, the same
   lr for every algorithm: ddpo-sf, ddpo-is, rwr and sb3-ppo for a fixed epoch budget, and
   "sb3-ppo-dummyvecenv": the same PPO as SB3 is used out of the box, over a DummyVecEnv of 256
   single `DenoisingEnv`s (timed from `learn` to the end of a rollout, without our logging). Per
   algorithm: the first epoch whose mean reward over its 256 chains reaches the target, the
   reward queries and the wall time of `train()` up to it (sampling, update, logging and
   checkpoints; not the final evaluation), the last epoch's mean reward, the best one, and the
   mean of perf/steps_per_sec. An algorithm that never reaches the target reports null and its
   best reward. A second, higher target is reported in the JSON only.
3. ddpo-is with kl_coef 0.1 and 1.0 for the same budget, then `evaluate_finetuned` with 5,000
   samples (what `train()` returns): sliced W2 and MMD to exact samples of the tilted optimum
   p_data exp(r / beta) / Z (rejection sampling: in_region is bounded by 1) next to those of the
   pretrained model and the floor of the target against itself; and sliced W2 to the pretrained
   model's own tilt p_pre exp(r / beta) / Z (importance resampling).

4. Where a fine-tuning run's time goes (--epoch-split-only runs this part alone and updates its field
   in --out, leaving the rest as it was): ddpo-is with the race's settings on dino (the default MLP) and
   on digits (the default U-Net, a 20-step pretrain, digit_classifier digit=3, 64 chains, the DDPM chain),
   with timers wrapped around the loop's own calls from outside (rl_diffusion/algos/loop.py is not
   touched): sampling (Algorithm.sample), reward (score), the reference call for the KL (path_kls), update
   (Algorithm.update), logging and figures (log_epoch, and the final figures), checkpoints (save), the
   final evaluation (evaluate_finetuned; skipped on digits, where 500 samples with the path KL take longer
   than the epochs), and the rest of the loop. Then the ceiling of one epoch (collect + update): its
   matrix products and convolutions counted by FlopCounterMode and replayed back to back
   (rl_diffusion/flops.py), the achieved FLOP/s as a fraction of that replay.

One torch thread by default (--threads): on 2 cores any other busy process (a test suite) makes
torch's 2 OpenMP threads spin against it and slows these small networks down 20x or more, while
one thread stays steady. The load average before and after is recorded.

Prints the JSON and a markdown table, and writes both (the table as a field) to --out.
"""

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # else scripts/pretrain.py shadows the pretrain package

import numpy as np  # noqa: E402
import torch  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv  # noqa: E402

from pretrain.train import PretrainConfig, config_for, pretrain  # noqa: E402
from rl_diffusion import figures  # noqa: E402
from rl_diffusion.algos import algorithm, loop, sb3, trainer  # noqa: E402
from rl_diffusion.algos.ceiling import epoch_ceiling  # noqa: E402
from rl_diffusion.env import DenoisingEnv  # noqa: E402
from rl_diffusion.finetune import FinetuneConfig  # noqa: E402
from rl_diffusion.run import setup  # noqa: E402

SAMPLING = {"sampler": "ddim", "sampling_steps": 50, "eta": 1.0}
REWARD = {"reward": "in_region", "reward_args": {"shape": "disc", "center": [2.0, -1.0], "radius": 1.0}}
ALGOS = ("ddpo-sf", "ddpo-is", "rwr", "sb3-ppo")
# SB3's own algorithms with their default MultiInputPolicy, steering the frozen pretrained model (env.py's
# action modes). Noise-mode episodes are one step long: 50 gradient steps per epoch there, as in residual mode.
AGENT_RUNS = {
    f"{algo} {mode}": {"algo": algo, "action_mode": mode, "inner_epochs": 50 if mode == "noise" else 1}
    for algo in ("sb3-sac", "sb3-ppo-mlp")
    for mode in ("residual", "noise")
}
SIZES = (16, 256, 1024)


class TimedHistory(list):
    """run.history that also records, per appended epoch, the seconds since `start`."""

    def __init__(self, start: float):
        super().__init__()
        self.start, self.seconds = start, []

    def append(self, item) -> None:
        self.seconds.append(time.perf_counter() - self.start)
        super().append(item)

    def __reduce__(self):  # checkpoints hold the history: store it as a plain list
        return (list, (list(self),))


def config(pretrained: Path, device: str, **overrides) -> FinetuneConfig:
    return FinetuneConfig(run=str(pretrained), seed=0, device=device, **SAMPLING, **REWARD, **overrides)


def rollout_rate(model, repeats: int = 1) -> float:
    """Env steps per second of SB3 PPO's collect_rollouts: one warm-up rollout, then `repeats` timed."""
    _, callback = model._setup_learn(model.n_steps * model.n_envs * (repeats + 1), callback=None)
    callback.on_training_start(locals(), globals())

    def collect() -> None:
        assert model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)

    collect()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        collect()
    return repeats * model.n_steps * model.n_envs / (time.perf_counter() - started)


def sampler_rate(run, n: int, repeats: int) -> float:
    """Denoising steps per second of the bare batched sampler (as the native trainer samples: no_grad, record=True)."""
    with torch.no_grad():
        run.diffusion.sample(
            run.policy, (n, *run.data_shape), device=run.device, record=True, **run.config.sampling
        )  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            run.diffusion.sample(
                run.policy, (n, *run.data_shape), device=run.device, record=True, **run.config.sampling
            )
    return repeats * n * run.steps_per_chain / (time.perf_counter() - started)


def throughput(pretrained: Path, tmp: Path, device: str) -> dict:
    result: dict = {
        "note": "env steps per second by number of chains; SB3 rows: PPO.collect_rollouts with the DiffusionPolicy "
        "(actor + critic per step), whole rollouts of one chain per env, at least 12,800 env steps timed "
        "after a warm-up rollout; bare_sampler: GaussianDiffusion.sample(record=True) under no_grad",
        "sb3_dummy_vec_env_of_single_envs": {},
        "sb3_batched_adapter": {},
        "bare_sampler": {},
    }
    for n in SIZES:
        run = setup(config(pretrained, device, chains=n), tmp / f"throughput-{n}")
        model = sb3.make_ppo(run)
        # time at least 12,800 env steps (whole rollouts), so the small sizes are not noise
        repeats = max(1, 12800 // (n * run.steps_per_chain))
        result["sb3_batched_adapter"][str(n)] = rollout_rate(model, repeats)
        result["bare_sampler"][str(n)] = sampler_rate(run, n, repeats=max(3, 4 * repeats))
        if n == 16:
            # the same PPO over DummyVecEnv: 16 single envs, numpy per env, SB3 batching their observations
            model.set_env(single_envs(run, n))
            result["sb3_dummy_vec_env_of_single_envs"][str(n)] = rollout_rate(model, repeats)
        run.writer.close()
    result["adapter_over_dummy_vec_env_at_16"] = (
        result["sb3_batched_adapter"]["16"] / result["sb3_dummy_vec_env_of_single_envs"]["16"]
    )
    result["adapter_over_bare_sampler"] = {
        k: result["sb3_batched_adapter"][k] / result["bare_sampler"][k] for k in result["bare_sampler"]
    }
    return result


def to_target(history: TimedHistory, steps_per_epoch: int, target: float) -> dict:
    """The first epoch whose mean reward reaches `target`, and what it took (None everywhere if none did)."""
    hit = next((i for i, h in enumerate(history) if h["reward/mean"] >= target), None)
    if hit is None:
        return {"epochs": None, "reward_queries": None, "wall_seconds": None, "epoch_seconds": None}
    return {
        "epochs": hit + 1,
        "reward_queries": history[hit]["reward_queries"],
        "wall_seconds": history.seconds[hit],
        # the trainers' own per-epoch timing (perf/steps_per_sec), summed: without setup and (native) logging
        "epoch_seconds": sum(steps_per_epoch / h["perf/steps_per_sec"] for h in history[: hit + 1]),
    }


def finetune_run(pretrained: Path, out: Path, device: str, targets: list[float], **overrides) -> dict:
    """One fine-tuning run with progress=False: its curve, what it took to reach each target, final metrics."""
    cfg = config(pretrained, device, **overrides)
    run = setup(cfg, out)
    train = trainer(cfg.algo)
    started = time.perf_counter()
    run.history = history = TimedHistory(started)
    metrics = train(run, progress=False)
    total = time.perf_counter() - started
    rewards = [h["reward/mean"] for h in history]
    reached = {str(t): to_target(history, cfg.chains * run.steps_per_chain, t) for t in targets}
    first = reached[str(targets[0])]
    return {
        "epochs": len(history),
        "epochs_to_target": first["epochs"],
        "reward_queries_to_target": first["reward_queries"],
        "wall_seconds_to_target": first["wall_seconds"],
        "epoch_seconds_to_target": first["epoch_seconds"],
        "by_target": reached,
        "final_reward": rewards[-1],
        "best_reward": max(rewards),
        "best_reward_epoch": int(np.argmax(rewards)) + 1,
        "steps_per_sec": float(np.mean([h["perf/steps_per_sec"] for h in history])),
        "train_wall_seconds": history.seconds[-1],
        "total_seconds_with_evaluation_and_figures": total,
        "final_kl_to_pretrained": history[-1]["kl/to_pretrained"],
        "eval": {k: v for k, v in metrics.items() if k not in ("run", "kind", "algo", "reward")},
        "curve": [
            {
                "epoch": h["epoch"],
                "reward_queries": h["reward_queries"],
                "reward_mean": h["reward/mean"],
                "kl_to_pretrained": h["kl/to_pretrained"],
                "steps_per_sec": h["perf/steps_per_sec"],
                "wall_seconds": t,
            }
            for h, t in zip(history, history.seconds, strict=True)
        ],
    }


def single_envs(run, n: int) -> DummyVecEnv:
    """n single `DenoisingEnv`s in SB3's DummyVecEnv: numpy per env, SB3 batching their observations."""
    return DummyVecEnv(
        [
            lambda: DenoisingEnv(
                reward=REWARD["reward"],
                reward_kwargs=REWARD["reward_args"],
                **SAMPLING,
                diffusion=run.diffusion,
                data_shape=run.data_shape,
                action_mode="sample",
            )
            for _ in range(n)
        ]
    )


class RolloutRewards(BaseCallback):
    """Per rollout: the mean terminal reward of its chains and the seconds since `learn` started."""

    def __init__(self):
        super().__init__()
        self.started, self.rewards, self.means, self.seconds = time.perf_counter(), [], [], []

    def _on_step(self) -> bool:
        self.rewards.extend(self.locals["rewards"][self.locals["dones"]].tolist())
        return True

    def _on_rollout_end(self) -> None:
        self.means.append(float(np.mean(self.rewards)))
        self.seconds.append(time.perf_counter() - self.started)
        self.rewards = []


def stock_sb3_run(pretrained: Path, out: Path, device: str, targets: list[float], epochs: int, lr: float) -> dict:
    """sb3-ppo's PPO (same policy, settings and seed) over a DummyVecEnv of 256 single envs: SB3 out of the box."""
    run = setup(config(pretrained, device, algo="sb3-ppo", chains=256, epochs=epochs, lr=lr), out)
    model = sb3.make_ppo(run)
    model.set_env(single_envs(run, 256))
    callback = RolloutRewards()
    model.learn(epochs * model.n_steps * 256, callback=callback)
    run.writer.close()
    reached = {}
    for target in targets:
        hit = next((i for i, m in enumerate(callback.means) if m >= target), None)
        reached[str(target)] = {
            "epochs": None if hit is None else hit + 1,
            "reward_queries": None if hit is None else 256 * (hit + 1),
            "wall_seconds": None if hit is None else callback.seconds[hit],
        }
    first = reached[str(targets[0])]
    steps = 256 * model.n_steps * len(callback.means)
    return {
        "epochs": len(callback.means),
        "epochs_to_target": first["epochs"],
        "reward_queries_to_target": first["reward_queries"],
        "wall_seconds_to_target": first["wall_seconds"],
        "by_target": reached,
        "final_reward": callback.means[-1],
        "best_reward": max(callback.means),
        "steps_per_sec": steps / callback.seconds[-1],
        "curve": [
            {"epoch": i + 1, "reward_mean": m, "wall_seconds": t}
            for i, (m, t) in enumerate(zip(callback.means, callback.seconds, strict=True))
        ],
    }


def markdown(race: dict, target: float, epochs: int) -> str:
    def fmt(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"| algorithm | epochs to target ({target}) | reward queries | wall s | final reward | steps/s |",
        "|---|---|---|---|---|---|",
    ]
    for algo, r in race.items():
        reached = (
            f"{r['epochs_to_target']}" if r["epochs_to_target"] else f"never in {epochs} (best {r['best_reward']:.3f})"
        )
        lines.append(
            f"| {algo} | {reached} | {fmt(r['reward_queries_to_target'], ',d')} "
            f"| {fmt(r['wall_seconds_to_target'], '.1f')} | {r['final_reward']:.3f} | {r['steps_per_sec']:,.0f} |"
        )
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


EPOCH_PHASES = (
    "setup",
    "sampling",
    "reward",
    "reference_call_for_kl",
    "update",
    "logging_and_figures",
    "checkpoints",
    "final_evaluation",
    "other",
)


class PhaseTimers:
    """Wall seconds by phase of the calls it wraps (functions of a module or methods of a class); unwrap()
    puts the originals back."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.originals: list[tuple[object, str, object, bool]] = []

    def wrap(self, owner, name: str, phase: str, instead=None) -> None:
        """Time owner.name under `phase`; with `instead`, call that in its place."""
        original = getattr(owner, name)
        call = instead or original

        @functools.wraps(original)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started

        self.originals.append((owner, name, original, name in vars(owner)))
        setattr(owner, name, timed)

    def unwrap(self) -> None:
        for owner, name, original, own in reversed(self.originals):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # an inherited method: drop the override
        self.originals = []


def timed_run(cfg: FinetuneConfig, out: Path, final_evaluation: bool) -> dict:
    """One fine-tuning run with every phase of the loop timed from outside; seconds per epoch and in all."""
    timers, algo = PhaseTimers(), algorithm(cfg.algo)
    started = time.perf_counter()
    run = setup(cfg, out)
    timers.seconds["setup"] = time.perf_counter() - started
    timers.wrap(algo, "sample", "sampling")
    timers.wrap(algo, "update", "update")
    timers.wrap(loop, "score_rewards", "reward")
    timers.wrap(loop, "path_kls", "reference_call_for_kl")
    timers.wrap(loop, "log_epoch", "logging_and_figures")
    timers.wrap(loop, "save_checkpoint", "checkpoints")
    if final_evaluation:
        timers.wrap(loop, "evaluate_finetuned", "final_evaluation")
        for name in ("save_gif", "save_image_grid", "plot_finetune_summary"):
            timers.wrap(figures, name, "logging_and_figures")
    else:
        timers.wrap(loop, "finish_run", "final_evaluation", instead=lambda run: run.writer.close() or {})
    try:
        loop.train(run, progress=False)
    finally:
        timers.unwrap()
    total = time.perf_counter() - started
    seconds = {phase: timers.seconds.get(phase, 0.0) for phase in EPOCH_PHASES}
    seconds["other"] = total - sum(seconds.values())
    return {"epochs": run.epochs, "total_seconds": total, "seconds": seconds}


def epoch_split(pretrained: Path, tmp: Path, device: str, epochs: int, lr: float) -> dict:
    """Where a ddpo-is run's time goes, per phase, on dino (MLP) and digits (U-Net), with each epoch's ceiling."""
    log("epoch split: pretraining digits (20 steps: the speed, not the quality, is measured) ...")
    digits = tmp / "digits-pretrained"
    pretrain(config_for_digits(device), digits, progress=False)
    cases = {
        "dino MLP: ddpo-is, 256 chains, DDIM 50 steps (eta 1), in_region": (
            config(pretrained, device, algo="ddpo-is", chains=256, epochs=epochs, lr=lr),
            True,
        ),
        "digits U-Net: ddpo-is, 64 chains, DDPM 100 steps, digit_classifier 3": (
            FinetuneConfig(
                run=str(digits),
                reward="digit_classifier",
                reward_args={"digit": 3},
                algo="ddpo-is",
                chains=64,
                epochs=3,
                seed=0,
                device=device,
            ),
            False,
        ),
    }
    result = {}
    for name, (cfg, final_evaluation) in cases.items():
        log(f"epoch split: {name} ...")
        slug = name.split(":")[0].replace(" ", "-")
        run = timed_run(cfg, tmp / f"split-{slug}", final_evaluation)
        per_epoch = {p: run["seconds"][p] / run["epochs"] for p in EPOCH_PHASES if p not in ONE_OFF}
        result[name] = {
            "epochs": run["epochs"],
            "total_seconds": run["total_seconds"],
            "seconds": run["seconds"],
            "per_epoch_seconds": per_epoch,
            "final_evaluation_timed": final_evaluation,
            "ceiling": epoch_ceiling(cfg, tmp / f"ceiling-{slug}", epochs=3 if final_evaluation else 1),
        }
        c = result[name]["ceiling"]
        log(
            f"  {c['achieved_gflops']:.1f} GFLOP/s of {c['attainable_gflops']:.1f} attainable "
            f"({c['fraction_of_attainable']:.0%})"
        )
    return result


ONE_OFF = ("setup", "final_evaluation")  # once per run, not per epoch (figures are in logging_and_figures)


def config_for_digits(device: str) -> PretrainConfig:
    return config_for({"dataset": "digits", "steps": 20, "eval_every": 20, "eval_samples": 16, "device": device})


def markdown_epoch_split(split: dict) -> str:
    lines = [
        "| run | " + " | ".join(p.replace("_", " ") for p in EPOCH_PHASES) + " | total s | ceiling fraction |",
        "|---|" + "---|" * (len(EPOCH_PHASES) + 2),
    ]
    for name, r in split.items():
        cells = " | ".join(f"{r['seconds'][p]:.2f}" for p in EPOCH_PHASES)
        c = r["ceiling"]
        ceiling = (
            f"{c['fraction_of_attainable']:.0%} ({c['achieved_gflops']:.1f} of {c['attainable_gflops']:.1f} GFLOP/s)"
        )
        lines.append(f"| {name} ({r['epochs']} epochs) | {cells} | {r['total_seconds']:.1f} | {ceiling} |")
    return "\n".join(lines)


def epoch_split_fields(split: dict, load_before: tuple) -> dict:
    """Part 4's fields of the JSON."""
    return {
        "epoch_split": {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            "load_average_1_5_15min_before": load_before,
            "load_average_1_5_15min_after": os.getloadavg(),
            "phases": "seconds of the whole run by phase (setup and final evaluation once; the others summed over "
            "its epochs; other: the loop's own work between them, gathering, statistics, progress)",
            "runs": split,
        },
        "markdown_epoch_split": markdown_epoch_split(split),
    }


def write_epoch_split(out: Path, split: dict, load_before: tuple) -> int:
    """Part 4's fields into the JSON at `out` (the other parts' as they were), printed too."""
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(epoch_split_fields(split, load_before))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["epoch_split"], indent=2))
    print()
    print(result["markdown_epoch_split"])
    return 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained", default=None, help="a dino pretrain run to reuse (default: pretrain one, ~16 s)"
    )
    parser.add_argument("--epochs", type=int, default=30, help="epoch budget of every fine-tuning run")
    parser.add_argument(
        "--target", type=float, default=0.5, help="per-epoch mean reward counted as reached (the table's)"
    )
    parser.add_argument("--also-target", type=float, default=0.9, help="a second target, reported in the JSON only")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every algorithm")
    parser.add_argument("--rwr-temperature", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default, one per core)")
    parser.add_argument("--out", default="docs/benchmarks/rl.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--epoch-split-only",
        action="store_true",
        help="run only part 4 (where a fine-tuning run's time goes) and update its fields in --out",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    targets = [args.target, args.also_target]
    seconds: dict[str, float | None] = {}
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pretrained = Path(args.pretrained) if args.pretrained else tmp / "pretrained"
        seconds["pretrain"] = None
        if not args.pretrained:
            log("pretraining dino ...")
            t0 = time.perf_counter()
            pretrain(PretrainConfig(dataset="dino", device=args.device), pretrained, progress=False)
            seconds["pretrain"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        split = epoch_split(pretrained, tmp, args.device, args.epochs, args.lr)
        seconds["epoch_split"] = time.perf_counter() - t0
        if args.epoch_split_only:
            return write_epoch_split(Path(args.out), split, load_before)

        log("env throughput ...")
        t0 = time.perf_counter()
        env = throughput(pretrained, tmp, args.device)
        seconds["env_throughput"] = time.perf_counter() - t0

        common = {"chains": 256, "epochs": args.epochs, "lr": args.lr}
        race = {}
        t0 = time.perf_counter()
        for algo in ALGOS:
            log(f"race: {algo} ...")
            extra = {"algo_args": {"rwr_temperature": args.rwr_temperature}} if algo == "rwr" else {}
            race[algo] = finetune_run(pretrained, tmp / algo, args.device, targets, algo=algo, **common, **extra)
        log("race: sb3-ppo over a DummyVecEnv of single envs ...")
        race["sb3-ppo-dummyvecenv"] = stock_sb3_run(
            pretrained, tmp / "sb3-dummy", args.device, targets, args.epochs, args.lr
        )
        for name, settings in AGENT_RUNS.items():
            log(f"race: {name} ...")
            race[name] = finetune_run(
                pretrained, tmp / name.replace(" ", "-"), args.device, targets, **{**common, **settings}
            )
        seconds["race"] = time.perf_counter() - t0
        kl = {}
        t0 = time.perf_counter()
        for beta in (0.1, 1.0):
            log(f"ddpo-is with kl_coef {beta} ...")
            run = finetune_run(
                pretrained, tmp / f"kl-{beta}", args.device, targets, algo="ddpo-is", kl_coef=beta, **common
            )
            e = run["eval"]
            kl[str(beta)] = {
                **{
                    k: e[k]
                    for k in (
                        "target_sw2",
                        "target_sw2_pretrained",
                        "target_sw2_floor",
                        "target_mmd",
                        "target_mmd_pretrained",
                        "target_mmd_floor",
                        "target_reward_mean",
                        "far_fraction",
                        "far_fraction_pretrained",
                        "pretrained_data_sw2",
                        "pretrained_data_sw2_floor",
                        "tilted_sw2",
                        "tilted_sw2_pretrained",
                        "tilted_sw2_floor",
                        "tilted_ess",
                        "tilted_reward_mean",
                        "reward_mean",
                        "reward_mean_pretrained",
                        "kl_to_pretrained",
                        "diversity",
                        "diversity_pretrained",
                    )
                },
                "tilted_sw2_over_floor": e["tilted_sw2"] / e["tilted_sw2_floor"],
                "final_epoch_reward": run["final_reward"],
                "final_epoch_kl_to_pretrained": run["final_kl_to_pretrained"],
                "steps_per_sec": run["steps_per_sec"],
                "train_wall_seconds": run["train_wall_seconds"],
            }
        seconds["kl"] = time.perf_counter() - t0

    table = markdown(race, args.target, args.epochs)
    sb3, native, stock = (
        race["sb3-ppo"]["by_target"],
        race["ddpo-is"]["by_target"],
        race["sb3-ppo-dummyvecenv"]["by_target"],
    )
    seconds["total"] = time.perf_counter() - started
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}",
        "load_average_1_5_15min_before": load_before,
        "load_average_1_5_15min_after": os.getloadavg(),
        "sampling": {
            **SAMPLING,
            "num_timesteps": 200,
            "note": "DDIM with 50 sampling steps (eta = 1) for every RL part",
        },
        "pretrained": args.pretrained or "default dino pretrain (PretrainConfig(dataset='dino')), built here",
        "env_steps_per_sec": env,
        "race": {
            "reward": REWARD,
            "chains": 256,
            "seed": 0,
            "lr": args.lr,
            "rwr_temperature": args.rwr_temperature,
            "epoch_budget": args.epochs,
            "target_mean_reward": args.target,
            "also_target": args.also_target,
            "timing": "wall_seconds: of train() from its call to the end of the first epoch whose mean reward over "
            "its 256 chains reaches the target (setup of the trainer, sampling, update, per-epoch logging and "
            "checkpoints; not the final 5,000-sample evaluation and figures). epoch_seconds: the trainers' own "
            "per-epoch times (perf/steps_per_sec) summed up to that epoch",
            "sb3_over_native_wall_to_target": {
                t: ratio(sb3[t]["wall_seconds"], native[t]["wall_seconds"]) for t in sb3
            },
            "sb3_over_native_epoch_seconds_to_target": {
                t: ratio(sb3[t]["epoch_seconds"], native[t]["epoch_seconds"]) for t in sb3
            },
            "sb3_over_native_note": "sb3-ppo / ddpo-is (both PPO-clip, same lr, chains, seed); null if either never "
            "reached the target",
            "sb3_dummyvecenv_over_native_wall_to_target": {
                t: ratio(stock[t]["wall_seconds"], native[t]["wall_seconds"]) for t in stock
            },
            "sb3_dummyvecenv_note": "sb3-ppo-dummyvecenv: sb3-ppo's PPO and policy over a DummyVecEnv of 256 single "
            "DenoisingEnvs, wall_seconds from learn() to the end of the rollout reaching the target (no TensorBoard, "
            "KL or checkpoints)",
            "algos": race,
        },
        "kl_to_pretrained": {
            "algo": "ddpo-is",
            "epochs": args.epochs,
            "lr": args.lr,
            "chains": 256,
            "eval_num_samples": 5000,
            "note": "evaluate_finetuned(num_samples=5000, seed=0) as returned by train(). target_*: exact samples "
            "of p_data(x) exp(r(x) / kl_coef) / Z by rejection, floors between two independent exact draws; "
            "tilted_*: the pretrained model's own tilt p_pre(x) exp(r(x) / kl_coef) / Z by importance resampling of "
            "50,000 pretrained samples; tilted_sw2_floor is the sliced W2 between two independent resamplings",
            "by_kl_coef": kl,
        },
        "markdown_table": table,
        "seconds": seconds,
        **epoch_split_fields(split, load_before),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print()
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
