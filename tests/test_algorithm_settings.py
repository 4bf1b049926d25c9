"""An algorithm's own settings: declared in its module (`Settings`), flags of finetune, held by the config for the
chosen algorithm only, and every one of them in config.json."""

import argparse
import dataclasses

import pytest

from rl_diffusion.cli import build_parser
from rl_diffusion.config import config_from_dict
from rl_diffusion.errors import UserError
from rl_diffusion.finetune import FinetuneConfig, algorithm_settings, config_for

RTB_DEFAULTS = {f.name: f.default for f in dataclasses.fields(algorithm_settings()["rtb"])}


def finetune_actions() -> dict[str, argparse.Action]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {action.dest: action for action in sub.choices["finetune"]._actions}


def test_every_setting_is_a_flag_of_its_name_default_and_help():
    actions, config_fields = finetune_actions(), {f.name for f in dataclasses.fields(FinetuneConfig)}
    for algo, settings in algorithm_settings().items():
        for f in dataclasses.fields(settings):
            action = actions[f.name]
            flag = f.name.replace("_", "-")
            assert action.option_strings == ["--" + flag, *(["--no-" + flag] if f.type in (bool, "bool") else [])]
            assert action.help == f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")
            owners = f.metadata["help"].split(": ")[0].split(", ")  # "rtb, ddpo-is: ..." for a shared setting
            assert algo in owners and f.name not in config_fields


def test_the_config_holds_the_chosen_algorithms_settings_and_config_json_all_of_them():
    # --draft-steps is draft's: given with --algo rtb it sets nothing, as before the settings moved
    config = config_for({"run": "missing", "algo": "rtb", "replay_size": 64, "draft_steps": 3})
    assert config.algo_args == {"replay_size": 64, "explore_scale": 2.45}  # rtb's default of a shared setting
    assert config.settings == algorithm_settings()["rtb"](replay_size=64, explore_scale=2.45)
    saved = config.to_dict()
    assert {name: saved[name] for name in RTB_DEFAULTS} == {**RTB_DEFAULTS, "replay_size": 64, "explore_scale": 2.45}
    assert "draft_steps" not in saved and "algo_args" not in saved
    assert config_from_dict(FinetuneConfig, saved).to_dict() == saved


def test_a_config_json_holding_every_algorithms_settings_loads_with_its_own():
    """Before the settings moved to the algorithms, config.json held every native algorithm's as flat fields."""
    every = {f.name: f.default for settings in algorithm_settings().values() for f in dataclasses.fields(settings)}
    old = {**every, **FinetuneConfig(run="r", algo="draft").to_dict(), "draft_steps": 5, "pool_size": 7}
    assert config_from_dict(FinetuneConfig, old).algo_args == {"draft_steps": 5}


@pytest.mark.parametrize(
    "algo, algo_args, message",
    [
        ("rtb", {"draft_steps": 1}, "--algo rtb has no setting draft_steps; its own: delta_clip, explore_decay_epochs"),
        ("sb3-ppo", {"replay_size": 1}, "--algo sb3-ppo has no setting replay_size; its own: none"),
    ],
)
def test_a_setting_the_algorithm_does_not_declare_is_refused(algo, algo_args, message):
    with pytest.raises(UserError, match=message):
        FinetuneConfig(run="r", algo=algo, kl_coef=1.0, algo_args=algo_args).validate()


def test_a_renamed_field_of_an_older_config_json_reads_under_its_new_name():
    from pretrain.train import PretrainConfig

    assert config_from_dict(PretrainConfig, {"clip_denoised": False}).clip_x0 is False
    with pytest.raises(UserError, match="unknown config field"):
        config_from_dict(PretrainConfig, {"clip_sample": False})
