"""Inference-time mixing of the pretrained and fine-tuned eps (`sample --mix`) and the reward-KL frontier."""

import json

import numpy as np
import pytest

from rl_diffusion.algos import loop
from rl_diffusion.cli import main
from rl_diffusion.frontier import mixed_point


def target_point_reward(samples: np.ndarray) -> float:
    return float(-np.linalg.norm(samples - np.array([1.5, 1.5]), axis=1).mean())


@pytest.fixture(scope="module")
def finetuned(pretrained_moons, tmp_path_factory):
    """A few ddpo-is epochs of the fixture towards (1.5, 1.5), without the final evaluation."""
    out = tmp_path_factory.mktemp("mix") / "ft"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "finish_run", lambda run: {})
        assert (
            main(
                [
                    "finetune",
                    "--run",
                    str(pretrained_moons),
                    "--out",
                    str(out),
                    "--algo",
                    "ddpo-is",
                    "--reward",
                    "target_point",
                    "--reward-arg",
                    "point=[1.5,1.5]",
                    "--chains",
                    "64",
                    "--epochs",
                    "4",
                    "--lr",
                    "3e-3",
                    "--minibatch-size",
                    "256",
                    "--kl-coef",
                    "0.1",
                    "--quiet",
                ]
            )
            == 0
        )
    return out


def draw(run, tmp_path, *flags) -> np.ndarray:
    out = tmp_path / f"s{len(list(tmp_path.glob('*.npy')))}.npy"
    assert main(["sample", "--run", str(run), "--num-samples", "2000", "--out", str(out), *flags]) == 0
    return np.load(out)


def test_mix_0_and_1_are_the_pretrained_and_finetuned_samples_and_0_5_lies_between(
    pretrained_moons, finetuned, tmp_path
):
    before, after = draw(pretrained_moons, tmp_path), draw(finetuned, tmp_path)
    assert np.array_equal(draw(finetuned, tmp_path, "--mix", "0"), before)
    assert np.array_equal(draw(finetuned, tmp_path, "--mix", "1"), after)
    r0, r1, r_half = (
        target_point_reward(before),
        target_point_reward(after),
        target_point_reward(draw(finetuned, tmp_path, "--mix", "0.5")),
    )
    assert r1 > r0 + 0.2  # the fine-tune moved the samples towards the point
    assert r0 < r_half < r1


def test_mixed_path_kl_is_zero_at_mix_0_and_grows_with_mix(finetuned):
    points = [mixed_point(finetuned, m, 500, seed=0, device="cpu") for m in (0.0, 0.5, 1.0)]
    assert points[0]["kl_to_pretrained"] == 0.0
    assert 0.1 < points[1]["kl_to_pretrained"] < points[2]["kl_to_pretrained"]
    assert points[0]["reward_mean"] < points[1]["reward_mean"] < points[2]["reward_mean"]


@pytest.mark.parametrize(
    "run, mix, message",
    [
        ("finetuned", "1.5", "--mix must be in [0, 1]"),
        ("finetuned", "-0.1", "--mix must be in [0, 1]"),
        ("pretrained_moons", "0.5", "is a pretrain run"),
    ],
)
def test_bad_mixes_are_user_errors(run, mix, message, request, tmp_path, capsys):
    assert (
        main(["sample", "--run", str(request.getfixturevalue(run)), "--mix", mix, "--out", str(tmp_path / "s.npy")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_frontier_runs_each_beta_draws_the_figure_and_skips_finished_runs_on_rerun(pretrained_moons, tmp_path, capsys):
    out = tmp_path / "frontier"
    args = [
        "frontier",
        "--run",
        str(pretrained_moons),
        "--reward",
        "target_point",
        "--reward-arg",
        "point=[1.5,1.5]",
        "--kl-coefs",
        "0.1,0.3,1",
        "--out",
        str(out),
        "--jobs",
        "2",
        "--chains",
        "16",
        "--epochs",
        "2",
        "--eval-samples",
        "1000",
    ]
    assert main(args) == 0
    summary = json.loads((out / "frontier.json").read_text())
    assert summary["kl_coefs"] == [0.1, 0.3, 1.0] and list(summary["runs"]) == ["0.1", "0.3", "1.0"]
    for beta, run in summary["runs"].items():
        metrics = json.loads((out / f"kl_coef={beta}" / "metrics.json").read_text())
        assert run["reward_mean"] == metrics["reward_mean"] and run["kl_to_pretrained"] == metrics["kl_to_pretrained"]
        assert len(run["curve"]["reward_mean"]) == 2 and run["curve"]["kl_to_pretrained"][0] == 0.0
    points = summary["mix"]["points"]
    assert [p["mix"] for p in points] == [0.0, 0.25, 0.5, 0.75, 1.0] and summary["mix"]["kl_coef"] == 0.1
    assert points[0]["kl_to_pretrained"] == 0.0
    # the mix at 1 is the run itself, drawn as its evaluation draws it
    assert points[-1]["reward_mean"] == summary["runs"]["0.1"]["reward_mean"]
    assert points[-1]["kl_to_pretrained"] == summary["runs"]["0.1"]["kl_to_pretrained"]
    assert (out / "frontier.png").stat().st_size > 5000
    kept = (out / "kl_coef=0.3" / "metrics.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().err.count("ok (complete, skipped)") == 3
    assert (out / "kl_coef=0.3" / "metrics.json").stat().st_mtime_ns == kept


def test_frontier_refuses_its_own_kl_flags(pretrained_moons, tmp_path, capsys):
    assert (
        main(
            [
                "frontier",
                "--run",
                str(pretrained_moons),
                "--kl-coefs",
                "0.1",
                "--out",
                str(tmp_path / "f"),
                "--kl-coef",
                "1",
            ]
        )
        == 2
    )
    assert "drop --kl-coef" in capsys.readouterr().err
    assert main(["frontier", "--run", str(pretrained_moons), "--kl-coefs", "0,1", "--out", str(tmp_path / "f")]) == 2
    assert "positive betas" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
