"""Every flag of every subcommand, read from the parsers themselves, holds under hostile values: a new flag is
covered the day it is added."""

import argparse

import pytest

from rl_diffusion.cli import build_parser, main

VALUES = ("nan", "inf", "-inf", "-1", "0", "1e30", "abc")
NON_FINITE = ("nan", "inf", "-inf")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def numeric_flags() -> list[tuple[str, str, str]]:
    """(subcommand, flag, type name) of every int or float flag."""
    found = []
    for command, parser in subcommands().items():
        for action in parser._actions:
            kind = getattr(action.type, "__name__", None)
            if action.option_strings and kind in ("int", "float"):
                found.append((command, action.option_strings[0], kind))
    return found


def fail_fast_args(command: str, tmp_path) -> list[str]:
    """Arguments that let a command validate its flags and then stop with an error, before any work (a new
    subcommand with a numeric flag needs an entry here)."""
    missing = str(tmp_path / "no_such_run")
    taken = tmp_path / "taken"  # a new run here is refused: it already holds files
    taken.mkdir(exist_ok=True)
    (taken / "file").write_text("")
    return {
        "pretrain": ["--dataset", "moons", "--out", str(taken)],
        "finetune": ["--run", missing, "--out", str(tmp_path / "ft")],
        "frontier": ["--kl-coefs", "0.1", "--out", str(tmp_path / "f"), "--run", missing],
        "sample": ["--run", missing, "--out", str(tmp_path / "x.npy")],
        "evaluate": ["--run", missing],
        "data": ["moons", "--out", str(tmp_path / "x.txt")],  # not .npy: refused once the points are drawn
        "serve-reward": ["no_such_reward"],
    }[command]


@pytest.fixture
def no_runs(monkeypatch):
    """Starting any training fails the test."""

    def started(*args, **kwargs):
        pytest.fail(f"a run started: {args}")

    monkeypatch.setattr("pretrain.train.train", started)
    monkeypatch.setattr("rl_diffusion.algos.trainer", started)
    monkeypatch.setattr("rl_diffusion.ablate.run_commands", started)


def run(capsys, args: list[str]) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines) of `rl-diffusion ARGS`, run in this process."""
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, (args, captured.err)
    return code, captured.out, captured.err.strip().splitlines()


def test_the_walk_finds_config_and_hand_declared_flags():
    assert {("pretrain", "--lr", "float"), ("finetune", "--eta", "float"), ("sample", "--seed", "int")} <= set(
        numeric_flags()
    )


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_subcommand_has_help(capsys, command):
    code, out, err = run(capsys, [command, "--help"])
    assert code == 0 and err == [] and out.startswith(f"usage: rl-diffusion {command}")


@pytest.mark.parametrize("command, flag, kind", numeric_flags(), ids=lambda v: v if isinstance(v, str) else None)
def test_numeric_flags_are_refused_in_one_line_or_accepted(capsys, tmp_path, no_runs, command, flag, kind):
    for value in VALUES:
        args = [command, *fail_fast_args(command, tmp_path), f"{flag}={value}"]
        code, _, err = run(capsys, args)
        assert code in (0, 2), (args, code, err)
        if code == 2:
            assert len(err) == 1 and err[0].startswith("error: "), (args, err)
        if kind == "float" and value in NON_FINITE:
            assert err == [f"error: {flag} must be a finite number, got {float(value)}"], (args, err)
    assert not (tmp_path / "taken").joinpath("config.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["frontier", "--kl-coefs", "0.1,nan", "--out", "f"], "--kl-coefs must be a finite number, got nan"),
        (
            ["ablate", "finetune", "--param", "lr", "--values", "1e-3,inf", "--out", "a"],
            "--values for lr must be a finite number, got inf",
        ),
    ],
)
def test_float_lists_refuse_non_finite_values(capsys, tmp_path, monkeypatch, no_runs, args, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, args)
    assert code == 2 and err == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []
