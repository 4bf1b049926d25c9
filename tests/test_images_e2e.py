"""End to end on the 8x8 digits, through the CLI: pretraining lowers the Frechet distance, sampling
with classifier-free guidance, the Gymnasium env on images, and fine-tuning towards one digit.

Two tiny runs of tests/conftest.py (T = 20, 16 base channels, 200 steps of 64) are shared by the session: a
class-conditional one (the default) and an unconditional one for fine-tuning. The digit classifier, which scores
the samples and rewards the fine-tuning, is trained once into the session's temporary cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from PIL import Image
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import rl_diffusion  # noqa: F401  (registers RLDiffusion/Denoise-v0)
from pretrain.data import EVAL_DATA_SEED, data_of_checkpoint, reference_draws
from rl_diffusion.checkpoint import load_run
from rl_diffusion.cli import main
from rl_diffusion.image_metrics import classifier_features, frechet_distance, kernel_inception_distance
from rl_diffusion.models import build_model
from rl_diffusion.sampling import draw_samples

CPU = torch.device("cpu")
DIGIT = 3


def predicted_labels(images: np.ndarray, classifier: torch.nn.Module) -> torch.Tensor:
    return classifier_features(torch.from_numpy(images), classifier)[1]


def digit_share(run_dir: Path, classifier: torch.nn.Module) -> float:
    """Share of 400 samples of a run (DDPM, seed 7) that the classifier reads as DIGIT."""
    run = load_run(run_dir)
    samples = draw_samples(run.diffusion, run.model, 400, seed=7, device=CPU)
    return (predicted_labels(samples, classifier) == DIGIT).float().mean().item()


def test_pretraining_lowers_the_frechet_distance(
    digits_run: Path, classifier: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    """`rl-diffusion evaluate` on the trained run vs the same measurement of the network at initialisation.

    Both: 300 DDPM samples (seed 1, labels 0..9 in turn), Frechet distance and KID in the digit
    classifier's features to the same 300 digits.
    """
    capsys.readouterr()
    assert main(["evaluate", "--run", str(digits_run), "--num-samples", "300", "--seed", "1"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    run = load_run(digits_run)
    torch.manual_seed(0)  # what pretrain seeds before building the network (--seed 0)
    initial = build_model(run.checkpoint["model_config"]).eval()
    reference, again = reference_draws(data_of_checkpoint(run.checkpoint["data"]), 300, EVAL_DATA_SEED)
    ref_feats = classifier_features(torch.from_numpy(reference), classifier)[0]

    def fd_and_kid(images: np.ndarray) -> tuple[float, float]:
        feats = classifier_features(torch.from_numpy(images), classifier)[0]
        return frechet_distance(feats, ref_feats), kernel_inception_distance(feats, ref_feats)

    fd_initial, kid_initial = fd_and_kid(draw_samples(run.diffusion, initial, 300, seed=1, device=CPU))
    # evaluate measured these samples against these digits with this classifier: the same four numbers
    fd, kid = fd_and_kid(draw_samples(run.diffusion, run.model, 300, seed=1, device=CPU))
    fd_floor, kid_floor = fd_and_kid(again)
    assert [evaluated[k] for k in ("fd", "kid", "fd_floor", "kid_floor")] == pytest.approx(
        [fd, kid, fd_floor, kid_floor], rel=1e-6
    )
    print(
        f"FD initial {fd_initial:.4g}, trained {fd:.4g}, floor {fd_floor:.4g}; "
        f"KID initial {kid_initial:.4g}, trained {kid:.4g}, floor {kid_floor:.4g} (300 samples)"
    )
    assert evaluated["num_samples"] == 300
    # measured: FD 206 -> 24 (floor 9.5), KID 1046 -> 203 (floor 21)
    assert fd < fd_initial / 3 and kid < kid_initial / 2.5
    assert fd < 5 * fd_floor  # a floor inflated by the small sample (1.7 at 898 samples)
    # The run's own final metrics (898 samples) carry the image entries next to their floors.
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert {"fd", "fd_floor", "kid", "kid_floor", "label_distribution", "mode_coverage"} <= metrics.keys()
    print(
        f"run metrics: fd {metrics['fd']:.3g} (floor {metrics['fd_floor']:.3g}), "
        f"kid {metrics['kid']:.3g} (floor {metrics['kid_floor']:.3g})"
    )
    assert metrics["fd_floor"] < metrics["fd"] < fd_initial / 3  # measured: 1.7 < 30
    assert metrics["mode_coverage"] == 10


def test_sample_writes_images_and_a_grid_and_guidance_follows_the_labels(
    digits_run: Path, classifier: torch.nn.Module, tmp_path: Path
) -> None:
    n = 100  # labels 0..9 ten times each
    samples = {}
    for scale in (1.0, 0.0, 3.0):
        out = tmp_path / f"samples_{scale:g}.npy"
        assert (
            main(
                [
                    "sample",
                    "--run",
                    str(digits_run),
                    "--num-samples",
                    str(n),
                    "--out",
                    str(out),
                    "--seed",
                    "0",
                    "--guidance-scale",
                    str(scale),
                ]
            )
            == 0
        )
        samples[scale] = np.load(out)
        with Image.open(out.with_suffix(".png")) as grid:
            assert grid.format == "PNG" and grid.size == (
                4 * (8 * 9 + 1),
                4 * (8 * 9 + 1),
            )  # 64 tiles of 8x8, 1 px gaps, x4
    x = samples[1.0]
    assert x.shape == (n, 1, 8, 8) and x.dtype == np.float32 and np.isfinite(x).all()
    print(f"pixel range [{x.min():.2f}, {x.max():.2f}]")
    print(f"pixels beyond 1.2: {(np.abs(x) > 1.2).mean():.3f}, beyond 1.5: {(np.abs(x) > 1.5).mean():.4f}")
    assert (
        np.abs(x).max() < 2.5 and (np.abs(x) <= 1.5).mean() > 0.99
    )  # the data is in [-1, 1]; a tiny model overshoots a little
    assert not np.allclose(samples[0.0], samples[3.0])
    labels = torch.arange(n) % 10
    agreement = {
        scale: (predicted_labels(s, classifier) == labels).float().mean().item() for scale, s in samples.items()
    }
    print(f"share of samples classified as their label, by guidance scale: {agreement}")
    assert agreement[0.0] < 0.3  # unconditional: about chance (0.1)
    assert agreement[3.0] > 0.8 and agreement[1.0] > 0.5


@pytest.mark.filterwarnings("ignore:.*symmetric and normalized.*")
@pytest.mark.filterwarnings("ignore:.*infinity.*")
@pytest.mark.filterwarnings("ignore:.*alternative render modes.*")
# SB3 advises uint8 images in [0, 255] and at least 36x36 for its CnnPolicy: not how the diffusion policy acts.
@pytest.mark.filterwarnings("ignore:.*is an image.*")
@pytest.mark.filterwarnings("ignore:.*minimal resolution.*")
def test_env_of_a_digits_run_has_image_observations_and_labels(digits_run: Path) -> None:
    env = gymnasium.make(
        "RLDiffusion/Denoise-v0", run=str(digits_run), reward="digit_classifier", reward_kwargs={"digit": DIGIT}
    )
    obs, _ = env.reset(seed=0)
    assert obs["x"].shape == (1, 8, 8) and obs["x"].dtype == np.float32
    assert env.observation_space["c"] == gymnasium.spaces.Discrete(10) and 0 <= int(obs["c"]) < 10
    assert env.action_space.shape == (1, 8, 8) and int(obs["t"][0]) == 20
    for _ in range(19):
        assert env.step(np.zeros((1, 8, 8), dtype=np.float32))[1] == 0.0
    _, reward, terminated, _, info = env.step(np.zeros((1, 8, 8), dtype=np.float32))
    assert terminated and info["x0"].shape == (1, 8, 8) and np.isfinite(reward) and reward <= 0.0  # a log-probability
    check_env(env.unwrapped)
    sb3_check_env(env.unwrapped)


def test_finetuning_with_the_digit_classifier_raises_that_digits_share(
    unconditional_run: Path, classifier: torch.nn.Module, tmp_path: Path
) -> None:
    out = tmp_path / "finetuned"
    assert (
        main(
            [
                "finetune",
                "--run",
                str(unconditional_run),
                "--out",
                str(out),
                "--reward",
                "digit_classifier",
                "--reward-arg",
                f"digit={DIGIT}",
                "--algo",
                "ddpo-is",
                "--chains",
                "64",
                "--epochs",
                "4",
                "--lr",
                "1e-3",  # the 2D default: 4 epochs at the image default 3e-4 move the tiny model too little to test
                "--quiet",
            ]
        )
        == 0
    )
    before, after = digit_share(unconditional_run, classifier), digit_share(out, classifier)
    metrics = json.loads((out / "metrics.json").read_text())
    print(
        f"share of {DIGIT}s: {before:.3f} -> {after:.3f}; "
        f"mean log p({DIGIT}) {metrics['reward_mean_pretrained']:.2f} -> {metrics['reward_mean']:.2f}, "
        f"path KL {metrics['kl_to_pretrained']:.1f}"
    )
    assert before < 0.25  # one digit of ten
    # the image defaults (finetune.IMAGE_DEFAULTS) hold the policy to the data with beta = 1: 4 epochs
    # took the share from 0.12 to 0.40 (beta = 0 went further, by fooling the classifier)
    assert after > before + 0.2
    config = json.loads((out / "config.json").read_text())
    # 50 DDIM steps, or all T where T is shorter (the tiny prior's T is 20)
    assert (config["sampler"], config["sampling_steps"], config["kl_coef"]) == ("ddim", 0, 1.0)
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 1.0
    for name in ("samples_before.png", "samples_after.png"):
        with Image.open(out / "figures" / name) as grid:
            assert grid.format == "PNG"


def test_labels_fight_warning_against_the_between_label_share_of_the_variance():
    from rl_diffusion.run import labels_fight_warning

    # labels 0, 0, 1, 1 with rewards 0, 2, 10, 12: total sum of squares 36 + 16 + 16 + 36 = 104, between labels
    # 4 * 25 = 100
    rewards, c = torch.tensor([0.0, 2.0, 10.0, 12.0]), torch.tensor([0, 0, 1, 1])
    assert "the labels explain 96% of the reward's variance" in labels_fight_warning(rewards, c)
    # within-label spread 10 apart, label means 1 apart: 1 / (1 + 100) of the variance
    assert labels_fight_warning(torch.tensor([0.0, 10.0, 1.0, 11.0]), c) is None


def test_a_class_reward_on_a_conditional_model_warns_and_the_null_label_lets_it_tilt(
    digits_run: Path, pretrained_moons: Path, tmp_path: Path, capsys
) -> None:
    from rl_diffusion.algos import algorithm
    from rl_diffusion.finetune import config_for
    from rl_diffusion.run import setup

    def finetune(pretrained: Path, out: Path, *flags: str) -> tuple[int, str]:
        args = ["finetune", "--run", str(pretrained), "--out", str(out), "--reward", "digit_classifier"]
        args += ["--reward-arg", f"digit={DIGIT}", "--chains", "32", "--epochs", "1", "--no-final-eval", "--quiet"]
        return main([*args, *flags]), capsys.readouterr().err

    status, err = finetune(digits_run, tmp_path / "labelled")
    assert status == 0 and "warning: the labels explain" in err and "--null-label" in err
    status, err = finetune(digits_run, tmp_path / "null", "--null-label")
    assert status == 0 and "the labels explain" not in err
    # the chains carry no label, so the network runs on its null label
    flags = {"run": str(digits_run), "reward": "digit_classifier", "null_label": True}
    run = setup(config_for(flags), tmp_path / "chains")
    assert algorithm("ddpo-is")(run).sample_chains(4, "--chains", torch.Generator())[2] is None
    status, err = finetune(pretrained_moons, tmp_path / "refused", "--null-label")  # no labels to drop
    assert status == 2 and err.startswith("error: --null-label needs a class-conditional model")


def test_an_algorithms_image_defaults_apply_on_image_runs_under_the_flags(digits_run, pretrained_moons):
    from rl_diffusion.finetune import config_for

    image = config_for({"run": str(digits_run), "algo": "iw-distill"})
    settings = image.settings
    assert (image.epochs, settings.pool_size, settings.ess_target, image.sampler) == (1, 4096, 0.05, "ddpm")
    assert config_for({"run": str(digits_run), "algo": "iw-distill", "pool_size": 64}).settings.pool_size == 64
    points = config_for({"run": str(pretrained_moons), "algo": "iw-distill"})
    assert (points.epochs, points.settings.pool_size, points.settings.ess_target) == (3, 10_000, 0.25)
    assert (settings.distill_ema, points.settings.distill_ema) == (0.995, 0.999)
    # rwr has no KL term: the images' beta of 1 is not its default, which it would refuse
    rwr = config_for({"run": str(digits_run), "algo": "rwr"})
    assert rwr.kl_coef == 0.0 and config_for({"run": str(digits_run), "algo": "ddpo-is"}).kl_coef == 1.0
    rwr.validate()
