"""The `rl-diffusion` command: pretrain, finetune, ablate, frontier, sample, evaluate, import-diffusers,
export-diffusers, data, datasets, rewards, serve-reward.

Every user mistake ends as one line `error: ...` on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from rl_diffusion import distributed
from rl_diffusion.checkpoint import refuse_to_clobber
from rl_diffusion.config import add_config_args, finite_float, given_flags, resume_config, seed_int
from rl_diffusion.errors import UserError, nearest
from rl_diffusion.runlock import run_lock


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a UserError: one `error:` line and exit 2, like every other mistake."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


def _save_npy(path: Path, array: np.ndarray) -> None:
    from rl_diffusion.checkpoint import atomic_save_npy

    if path.suffix != ".npy":
        raise UserError(f"--out must end in .npy, got {path}")
    atomic_save_npy(path, array)


def _config_and_run_dir(args: argparse.Namespace, cls: type, kind: str, flags: dict, make_config) -> tuple:
    """(config, run directory) of a new run (--out) or of the run a --resume continues."""
    if args.resume:
        if args.out and Path(args.out) != Path(args.resume):
            raise UserError("--resume continues the run in place; drop --out")
        return resume_config(cls, kind, Path(args.resume), flags), Path(args.resume)
    if not args.out:
        raise UserError(f"{kind} needs --out RUN_DIR (or --resume RUN_DIR)")
    return make_config(flags), Path(args.out)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from pretrain.train import PretrainConfig, config_for, pretrain

    config, out = _config_and_run_dir(args, PretrainConfig, "pretrain", given_flags(PretrainConfig, args), config_for)
    if not args.resume:  # refused before the lock: a refused command touches nothing in the run
        refuse_to_clobber(out, args.overwrite)
    with run_lock(out):
        pretrain(config, out, overwrite=args.overwrite, resume=bool(args.resume), progress=not args.quiet)
    if not distributed.is_main_process():
        return
    metrics = json.loads((out / "metrics.json").read_text())
    print(json.dumps(metrics, indent=2))
    figures = f"figures in {out / 'figures'}" if config.final_eval else "no figures (--no-final-eval)"
    print(f"run written to {out}; {figures}; watch it with: tensorboard --logdir {out.parent}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from rewards import parse_reward_args
    from rl_diffusion.algos import trainer
    from rl_diffusion.finetune import FinetuneConfig, algorithm_settings, config_for
    from rl_diffusion.run import setup

    flags = given_flags(FinetuneConfig, args)
    for settings in algorithm_settings().values():  # any algorithm's: those of another --algo set nothing
        flags.update(given_flags(settings, args))
    if args.reward_arg:
        flags["reward_args"] = parse_reward_args(args.reward_arg)
    if args.eval_reward or args.eval_reward_arg:
        flags["eval_rewards"] = _eval_rewards(args.eval_reward or [], args.eval_reward_arg or [])
    config, out = _config_and_run_dir(args, FinetuneConfig, "finetune", flags, config_for)
    if not args.resume:  # refused before the lock: a refused command touches nothing in the run
        refuse_to_clobber(out, args.overwrite)
    with run_lock(out):
        run = setup(config, out, overwrite=args.overwrite, resume=bool(args.resume))
        metrics = trainer(config.algo)(run, resume=bool(args.resume), progress=not args.quiet)
    if not run.ranks.is_main:
        return
    print(json.dumps(metrics, indent=2))
    print(f"run written to {out}; figures in {out / 'figures'}; watch it with: tensorboard --logdir {out.parent}")


def _eval_rewards(specs: list[str], items: list[str]) -> dict:
    """FinetuneConfig.eval_rewards from --eval-reward [LABEL=]REWARD and --eval-reward-arg LABEL:KEY=VALUE items."""
    from rewards import parse_reward_args

    rewards: dict = {}
    for spec in specs:
        label, sep, name = spec.partition("=")
        label, name = (label, name) if sep else (spec, spec)
        if not label or not name:
            raise UserError(f"--eval-reward expects [LABEL=]REWARD, got '{spec}'")
        if label in rewards:
            raise UserError(
                f"--eval-reward label '{label}' is given twice; name each one, e.g. --eval-reward left={name}"
            )
        rewards[label] = {"reward": name, "reward_args": {}}
    for item in items:
        key, sep, value = item.partition("=")
        label, colon, key = key.rpartition(":")  # the label itself may be a module:factory path
        if not sep or not colon:
            raise UserError(f"--eval-reward-arg expects LABEL:KEY=VALUE, got '{item}'")
        if label not in rewards:
            raise UserError(
                f"--eval-reward-arg '{item}' names no --eval-reward{nearest(label, list(rewards))}; "
                f"given: {', '.join(rewards) or 'none'}"
            )
        rewards[label]["reward_args"].update(parse_reward_args([f"{key}={value}"]))
    return rewards


def cmd_ablate(args: argparse.Namespace) -> None:
    from pretrain.train import PretrainConfig
    from rl_diffusion.ablate import ablate, parse_values
    from rl_diffusion.finetune import FinetuneConfig, algorithm_settings

    own = _Parser(prog=f"rl-diffusion ablate {args.kind}")
    own.add_argument("--param", required=True, help="the config field to vary, e.g. lr or kl_coef")
    own.add_argument("--values", required=True, help="comma-separated values")
    own.add_argument("--out", required=True, help="folder holding one run directory per value")
    own.add_argument("--jobs", type=int, default=1, help="settings run at once, in parallel processes")
    own.add_argument(
        "--ray",
        metavar="ADDRESS",
        help=RAY_HELP,
    )
    opts, flags = own.parse_known_args(args.rest)
    if args.kind not in ("pretrain", "finetune"):
        raise UserError(f"ablate takes pretrain or finetune, got '{args.kind}'")
    configs = [PretrainConfig] if args.kind == "pretrain" else [FinetuneConfig, *algorithm_settings().values()]
    values = parse_values(configs, opts.param.replace("-", "_"), opts.values)
    build_parser().parse_args([args.kind, "--out", "unused", *flags])  # a bad flag is an error before any run
    summary = ablate(
        args.kind, opts.param.replace("-", "_"), values, Path(opts.out), flags, jobs=opts.jobs, ray=opts.ray
    )
    print(json.dumps(summary, indent=2))
    print(f"figures: {Path(opts.out) / 'grid.png'}, {Path(opts.out) / 'curves.png'}; tensorboard --logdir {opts.out}")


def cmd_frontier(args: argparse.Namespace) -> None:
    from rl_diffusion.frontier import frontier

    try:
        kl_coefs = [finite_float("--kl-coefs")(v) for v in args.kl_coefs.split(",") if v.strip()]
    except ValueError as e:
        raise UserError(f"--kl-coefs: {e}") from None
    finetune_args = build_parser().parse_args(
        ["finetune", "--out", "unused", *args.finetune_flags]
    )  # a bad flag is an error before any run
    if finetune_args.kl_coef is not None or finetune_args.kl_target is not None:
        raise UserError("frontier sets each run's --kl-coef from --kl-coefs; drop --kl-coef and --kl-target")
    summary = frontier(
        kl_coefs,
        Path(args.out),
        args.finetune_flags,
        jobs=args.jobs,
        device=finetune_args.device or "cpu",
        ray=args.ray,
    )
    print(json.dumps(summary, indent=2))
    print(f"figure: {Path(args.out) / 'frontier.png'}; numbers: {Path(args.out) / 'frontier.json'}")


def cmd_sample(args: argparse.Namespace) -> None:
    from rl_diffusion import figures
    from rl_diffusion.algos import AGENT_ALGOS
    from rl_diffusion.checkpoint import load_run
    from rl_diffusion.distributed import resolve_device
    from rl_diffusion.frontier import load_mixed
    from rl_diffusion.sampling import draw_samples

    device = resolve_device(args.device)
    run = load_run(Path(args.run), device)
    if not args.clip_x0:
        run.diffusion.x0_range = None
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be positive, got {args.num_samples}")
    if args.guidance_scale != 1.0 and not getattr(run.model, "num_classes", 0):
        raise UserError(f"--guidance-scale needs a class-conditional model; {args.run} has no labels")
    if run.config.get("null_label") and args.guidance_scale == 1.0:
        args.guidance_scale = 0.0  # a run fine-tuned on the null label samples on it
    if run.config.get("algo") in AGENT_ALGOS and args.mix is None:
        samples = _agent_samples(args, run.config["algo"], device)
    else:
        model = run.model if args.mix is None else load_mixed(Path(args.run), args.mix, device)[2]
        samples = draw_samples(
            run.diffusion,
            model,
            args.num_samples,
            seed=args.seed,
            device=device,
            guidance_scale=args.guidance_scale,
            sampler=args.sampler,
            sampling_steps=args.sampling_steps,
            eta=args.eta,
        )
    out = Path(args.out)
    _save_npy(out, samples)
    print(f"wrote {args.num_samples} samples to {out}")
    if samples.ndim == 4:
        figures.save_image_grid(samples[:64], out.with_suffix(".png"))
        print(f"and a grid of the first {min(64, args.num_samples)} to {out.with_suffix('.png')}")


def _agent_samples(args: argparse.Namespace, algo: str, device) -> np.ndarray:
    """Samples of a run fine-tuned by an SB3 agent: the pretrained network plus the agent, on the chain it was
    trained on."""
    from rl_diffusion.agent_sampling import sample_agent

    defaults = {
        "--sampler": args.sampler is None,
        "--sampling-steps": args.sampling_steps is None,
        "--eta": args.eta == 1.0,
        "--no-clip-x0": args.clip_x0,
        "--guidance-scale": args.guidance_scale == 1.0,
    }
    given = [flag for flag, default in defaults.items() if not default]
    if given:
        raise UserError(
            f"{args.run} was fine-tuned by --algo {algo}, which samples on the chain it was trained on; "
            f"drop {', '.join(given)}"
        )
    return sample_agent(Path(args.run), args.num_samples, args.seed, device)[0].cpu().numpy()


def cmd_evaluate(args: argparse.Namespace) -> None:
    from rl_diffusion.evaluation import evaluate_run

    print(
        json.dumps(
            evaluate_run(
                Path(args.run), num_samples=args.num_samples, seed=args.seed, device=args.device, kl_coef=args.kl_coef
            ),
            indent=2,
        )
    )


def cmd_import_diffusers(args: argparse.Namespace) -> None:
    from rl_diffusion.diffusers_io import import_diffusers

    out = import_diffusers(Path(args.path), Path(args.out), overwrite=args.overwrite)
    print(f"imported {args.path} into {out}; sample it with: rl-diffusion sample --run {out} --out samples.npy")


def cmd_export_diffusers(args: argparse.Namespace) -> None:
    from rl_diffusion.diffusers_io import export_diffusers

    out = export_diffusers(Path(args.run), Path(args.out))
    print(f"wrote a DDPMPipeline to {out}; load it with: diffusers.DDPMPipeline.from_pretrained('{out}')")


def cmd_data(args: argparse.Namespace) -> None:
    from pretrain.datasets import sample_2d

    _save_npy(Path(args.out), sample_2d(args.name, args.num_samples, args.seed))
    print(f"wrote {args.num_samples} points of {args.name} to {args.out}")


def cmd_datasets(args: argparse.Namespace) -> None:
    from pretrain.datasets import DATASETS_2D
    from pretrain.images import IMAGE_DATASETS

    for name, description in {**DATASETS_2D, **IMAGE_DATASETS}.items():
        print(f"{name:14s} {description}")


def cmd_rewards(args: argparse.Namespace) -> None:
    from rewards import describe_rewards

    print(describe_rewards())


def cmd_serve_reward(args: argparse.Namespace) -> None:
    from rewards import build_reward, is_url, parse_reward_args
    from rewards.remote import serve
    from rl_diffusion.distributed import resolve_device

    if is_url(args.name):
        raise UserError(f"serve-reward serves a registered reward, not a URL: got '{args.name}'")
    serve(
        build_reward(args.name, parse_reward_args(args.reward_arg or []), skip_nonfinite=True),
        host=args.host,
        port=args.port,
        max_batches=args.max_batches,
        device=resolve_device(args.device),
    )


RAY_HELP = (
    "a Ray cluster to run the settings on instead: auto (the one `ray start` runs here), local (a fresh one-machine "
    "instance) or HOST:PORT; run directories must be on a file system every node sees"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rl-diffusion", description="Pretrain DDPMs and fine-tune them with reinforcement learning.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every command that writes a run directory."""
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_reward_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reward-arg", action="append", metavar="KEY=VALUE", help="reward keyword argument (repeatable; JSON values)"
    )


def add_pretrain(sub) -> None:
    """`rl-diffusion pretrain`."""
    from pretrain.train import PretrainConfig

    p = sub.add_parser(
        "pretrain",
        help="train a DDPM on a data set",
        description="Image data sets default to --steps 2000 --batch-size 128 --lr 2e-3 --num-timesteps 100 "
        "--eval-every 500 --eval-samples 500 --checkpoint-every 500.",
    )
    add_run_flags(p)
    add_config_args(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)


def add_finetune(sub) -> None:
    """`rl-diffusion finetune`."""
    from rl_diffusion.finetune import FinetuneConfig, algorithm_settings

    p = sub.add_parser("finetune", help="fine-tune a pretrained run with reinforcement learning")
    add_run_flags(p)
    add_reward_arg(p)
    p.add_argument(
        "--eval-reward",
        action="append",
        metavar="[LABEL=]REWARD",
        help="held-out reward: scored on every epoch's samples and logged as eval_reward/LABEL/mean, never trained on; "
        "evaluate reports it too (repeatable; LABEL defaults to REWARD, e.g. --eval-reward left=target_point)",
    )
    p.add_argument(
        "--eval-reward-arg",
        action="append",
        metavar="LABEL:KEY=VALUE",
        help="keyword argument of the held-out reward LABEL (repeatable; JSON values), e.g. left:point=[-2,0]",
    )
    add_config_args(p, FinetuneConfig, skip=("reward_args", "eval_rewards", "algo_args"))
    added: set[str] = set()  # a setting two algorithms share (--explore-scale) is one flag
    for settings in algorithm_settings().values():
        add_config_args(p, settings, skip=tuple(added))
        added |= {f.name for f in dataclasses.fields(settings)}
    p.set_defaults(func=cmd_finetune)


def add_ablate(sub) -> None:
    """`rl-diffusion ablate`."""
    p = sub.add_parser(
        "ablate",
        help="run one hyperparameter at several values and draw the grid",
        description="rl-diffusion ablate pretrain|finetune --param NAME --values V1,V2 --out DIR [--jobs N] "
        "[--ray ADDRESS] [flags of that command]",
    )
    p.add_argument("kind", help="pretrain | finetune")
    p.add_argument(
        "rest",
        nargs=argparse.REMAINDER,
        help="--param NAME --values V1,V2 --out DIR [--jobs N] [--ray ADDRESS] and flags of the command",
    )
    p.set_defaults(func=cmd_ablate)


def add_frontier(sub) -> None:
    """`rl-diffusion frontier`."""
    p = sub.add_parser(
        "frontier",
        help="fine-tune at several betas and draw mean reward against path KL",
        description="rl-diffusion frontier --run PRETRAINED --reward NAME --kl-coefs 0.03,0.1,0.3,1 --out DIR "
        "[--jobs N] [--ray ADDRESS] "
        "[flags of finetune]",
        allow_abbrev=False,
    )  # --kl-coef is finetune's, not short for --kl-coefs
    p.add_argument("--kl-coefs", required=True, help="comma-separated betas, one fine-tuning run each")
    p.add_argument(
        "--out", required=True, help="folder holding one run directory per beta, frontier.png and frontier.json"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in parallel processes")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help=RAY_HELP,
    )
    p.set_defaults(func=cmd_frontier)


def add_sample(sub) -> None:
    """`rl-diffusion sample`."""
    p = sub.add_parser("sample", help="draw samples from a trained run")
    p.add_argument("--run", required=True, help="run directory (pretrain or finetune)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--out", required=True, help="output .npy file (samples in the data set's coordinates)")
    p.add_argument(
        "--sampler",
        default=None,
        help="ddpm | ddim for a DDPM run, euler (the ODE) | sde for a flow run (default: ddpm; flow: euler)",
    )
    p.add_argument("--sampling-steps", type=int, default=None, help="DDIM, Euler or SDE steps (default: all T)")
    p.add_argument(
        "--eta",
        type=finite_float("--eta"),
        default=1.0,
        help="DDIM stochasticity in [0, 1] (0 = deterministic); sde: noise level, sigma_t = eta sqrt(2 t / (1 - t))",
    )
    p.add_argument(
        "--clip-x0",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clip each step's predicted x_0 to the range the run recorded (pretrain --clip-x0)",
    )
    p.add_argument(
        "--guidance-scale",
        type=finite_float("--guidance-scale"),
        default=1.0,
        help="classifier-free guidance of a class-conditional model (0 unconditional, 1 conditional, >1 sharper); "
        "a run fine-tuned with --null-label samples unconditionally",
    )
    p.add_argument(
        "--mix",
        type=finite_float("--mix"),
        default=None,
        metavar="LAMBDA",
        help="finetune runs: sample with eps = (1 - LAMBDA) eps_pretrained + LAMBDA eps_finetuned, LAMBDA in [0, 1]",
    )
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sample)


def add_evaluate(sub) -> None:
    """`rl-diffusion evaluate`."""
    p = sub.add_parser("evaluate", help="print a run's metrics as JSON")
    p.add_argument("--run", required=True)
    p.add_argument(
        "--kl-coef",
        type=finite_float("--kl-coef"),
        default=None,
        help="fine-tuning runs: the beta of the tilted optimum p exp(r / beta) / Z to measure against "
        "(default: the run's own)",
    )
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_evaluate)


def add_import_diffusers(sub) -> None:
    """`rl-diffusion import-diffusers`."""
    p = sub.add_parser(
        "import-diffusers",
        help="turn a local diffusers DDPM/DDIM pipeline directory into a pretrain run (needs the diffusers extra)",
    )
    p.add_argument("path", metavar="PATH", help="a pipeline folder written by save_pretrained (nothing is downloaded)")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.set_defaults(func=cmd_import_diffusers)


def add_export_diffusers(sub) -> None:
    """`rl-diffusion export-diffusers`."""
    p = sub.add_parser(
        "export-diffusers", help="write a run on a diffusers U-Net (imported, maybe fine-tuned) as a DDPMPipeline"
    )
    p.add_argument("--run", required=True, help="run directory (pretrain or finetune) with a diffusers-unet network")
    p.add_argument("--out", required=True, help="pipeline folder to create")
    p.set_defaults(func=cmd_export_diffusers)


def add_data(sub) -> None:
    """`rl-diffusion data`."""
    p = sub.add_parser("data", help="write points of a data set")
    p.add_argument("name")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=seed_int, default=0)
    p.set_defaults(func=cmd_data)


def add_listings(sub) -> None:
    """`rl-diffusion datasets` and `rl-diffusion rewards`: the lists."""
    sub.add_parser("datasets", help="list the data sets").set_defaults(func=cmd_datasets)
    sub.add_parser("rewards", help="list the rewards and their arguments").set_defaults(func=cmd_rewards)


def add_serve_reward(sub) -> None:
    """`rl-diffusion serve-reward`."""
    p = sub.add_parser(
        "serve-reward",
        help="serve a reward over HTTP, for --reward http://HOST:PORT in another process or machine",
        description="Serves reward NAME at POST /score (a compact binary batch format, rewards/remote.py) and "
        "GET /info (its fingerprint). No authentication: keep --host on loopback, or put it behind a proxy.",
    )
    p.add_argument("name", metavar="NAME", help="reward name, module:factory, or entry point (see `rewards`)")
    add_reward_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port to listen on; 0 picks a free one (default: 8765)")
    p.add_argument("--device", default="cpu", help="where the reward runs: cpu | cuda | cuda:N (default: cpu)")
    p.add_argument(
        "--max-batches", type=int, default=0, help="stop after this many POST /score requests (0 = never; for tests)"
    )
    p.set_defaults(func=cmd_serve_reward)


SUBCOMMANDS = (
    add_pretrain,
    add_finetune,
    add_ablate,
    add_frontier,
    add_sample,
    add_evaluate,
    add_import_diffusers,
    add_export_diffusers,
    add_data,
    add_listings,
    add_serve_reward,
)


def main(argv: list[str] | None = None) -> int:
    completed = False
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if args.command == "frontier":  # the flags it does not know are finetune's, passed to every run
            args.finetune_flags = unknown
        elif unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.func(args)
        completed = True
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun every rank's line stays whole
        return 2
    except OSError as e:  # a full disk, a read-only file system, a path that is a file: no traceback
        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"error: {where}{e.strerror or e}\n")
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    finally:
        distributed.shutdown(completed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
