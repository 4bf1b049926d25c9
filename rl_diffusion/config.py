"""Configs are dataclasses; command-line flags and the saved run config come from them."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

from rl_diffusion.errors import UserError

C = TypeVar("C")


def arg(default: Any, help: str, aliases: tuple[str, ...] = ()) -> Any:
    """A config field with its one-line help (shown by --help) and any other flags that set it."""
    return dataclasses.field(default=default, metadata={"help": help, "aliases": aliases})


def finite_float(flag: str) -> Callable[[str], float]:
    """The argparse type of a float flag: NaN passes every range check (its comparisons are all false), so no
    float flag takes it, nor an infinity."""

    def convert(text: str) -> float:
        value = float(text)  # a ValueError is argparse's "invalid float value"
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
        return value

    convert.__name__ = "float"  # the name argparse gives the type in its messages
    return convert


def seed_int(text: str) -> int:
    """The argparse type of a --seed flag: numpy's generators take no negative seed."""
    value = int(text)
    if value < 0:
        raise UserError(f"--seed must be >= 0, got {value}")
    return value


seed_int.__name__ = "int"


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one --flag per field of dataclass `cls`, defaulting to None so that given flags can be told apart."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        # argparse %-formats help text: "10% of" would crash --help
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%")
        if f.type in (bool, "bool"):
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            type_name = f.type if isinstance(f.type, str) else f.type.__name__
            kind = {"int": int, "float": finite_float(flags[0]), "str": str}.get(type_name, str)
            parser.add_argument(
                *flags,
                type=seed_int if f.name == "seed" else kind,
                default=None,
                help=help_text,
                metavar=f.name.upper(),
            )


def given_flags(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user set on the command line."""
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if getattr(ns, f.name, None) is not None}


# Flags that may differ on --resume without changing the result.
RESUMABLE_OVERRIDES = ("device",)
# Keys of a saved config.json that describe the run rather than set a config field: the kind of run, and
# the fingerprint of the reward it trains on (rewards.reward_fingerprint; checked by finetune's --resume).
RUN_METADATA = ("kind", "reward_fingerprint")


def resume_config(cls: type[C], kind: str, run_dir, overrides: dict[str, Any]) -> C:
    """The config saved in run_dir (a `kind` run), with only harmless flags overridden."""
    from rl_diffusion.checkpoint import read_run_config

    saved = read_run_config(run_dir)
    if saved.get("kind") != kind:
        raise UserError(f"{run_dir} is a {saved.get('kind')} run, not a {kind} run")
    fields = {k: v for k, v in saved.items() if k not in RUN_METADATA}
    changed = [k for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and fields.get(k) != v]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise UserError(f"{flags} would change the resumed run in {run_dir}; resume without them, or start a new run")
    fields.update({k: v for k, v in overrides.items() if k in RESUMABLE_OVERRIDES})
    return config_from_dict(cls, fields)


def saved_config(cls: type[C], run_dir) -> C:
    """The config a run directory was started with (its config.json)."""
    from rl_diffusion.checkpoint import read_run_config

    return config_from_dict(cls, {k: v for k, v in read_run_config(run_dir).items() if k not in RUN_METADATA})


FORMER_NAMES = {"clip_denoised": "clip_x0"}  # config.json of runs written before a field's rename


def config_from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """The config of flat values, one per flag (given flags, a saved config.json). A class that keeps some of them
    in one field of its own gathers them first (`gather_settings`: FinetuneConfig, an algorithm's settings)."""
    for name, value in values.items():  # JSON reads NaN and Infinity
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{cls.__name__} field {name} must be a finite number, got {value}")
    values = {FORMER_NAMES.get(name, name): value for name, value in values.items()}
    if hasattr(cls, "gather_settings"):
        values = cls.gather_settings(values)
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise UserError(f"unknown config field(s) {', '.join(sorted(unknown))} for {cls.__name__}")
    return cls(**values)


def to_markdown_table(values: dict) -> str:
    return "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in values.items())
