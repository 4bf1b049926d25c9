"""End to end against an exact answer: fine-tuning a gmm25 model towards its 9-mode posterior.

At kl_coef 1 the reward gmm_posterior = log p_post - log p_prior tilts the 25-mode prior into
the 9-mode posterior of Relative Trajectory Balance (rescaled grid), whose mode masses are known.
"""

import json

import pytest

from rl_diffusion import evaluation
from rl_diffusion.cli import main

TINY_GMM25 = [
    "--dataset",
    "gmm25",
    "--steps",
    "1500",
    "--num-timesteps",
    "20",
    "--hidden-size",
    "64",
    "--batch-size",
    "512",
    "--eval-every",
    "1500",
    "--eval-samples",
    "500",
    "--quiet",
]


@pytest.fixture(scope="module")
def pretrained_gmm25(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gmm25"
    assert main(["pretrain", "--out", str(out), *TINY_GMM25, "--no-final-eval"]) == 0
    return out


def test_finetuning_towards_the_posterior_lowers_the_mode_mass_error(pretrained_gmm25, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluation, "TILTED_POOL", 10_000)
    out = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--run",
                str(pretrained_gmm25),
                "--out",
                str(out),
                "--reward",
                "gmm_posterior",
                "--kl-coef",
                "1",
                "--algo",
                "ddpo-is",
                "--chains",
                "128",
                "--epochs",
                "8",
                "--minibatch-size",
                "640",
                "--quiet",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["memoryless"] and len(m["target_mode_masses"]) == 25
    # the posterior's masses: 4, 10, 4, 5, 10, 5, 4, 15, 4 over 61 on 9 of the 25 modes
    assert sorted(round(61 * w) for w in m["target_mode_masses"] if w > 0) == [4, 4, 4, 4, 5, 5, 10, 10, 15]
    # the pretrained model spreads ~1/25 over every mode: L1 error ~ 2 * 16/25
    assert m["target_mode_mass_l1_pretrained"] > 1.0
    assert m["target_mode_mass_l1"] < 0.75 * m["target_mode_mass_l1_pretrained"], m
    assert m["reward_mean"] > m["reward_mean_pretrained"] + 5
    # the 16 prior modes the posterior leaves out hold ~16/25 of the pretrained mass, and lose most of it
    left_out = [w == 0 for w in m["target_mode_masses"]]
    mass_left_out = {
        k: sum(x for x, out in zip(m[k], left_out, strict=True) if out)
        for k in ("mode_masses", "mode_masses_pretrained")
    }
    assert mass_left_out["mode_masses_pretrained"] > 0.5 and mass_left_out["mode_masses"] < 0.2, mass_left_out

    # the same run against the sharper tilt of beta 0.5: the posterior's heaviest mode holds 15^2 / sum of v^2
    sharper = evaluation.evaluate_finetuned(out, num_samples=2000, kl_coef=0.5)
    assert sharper["kl_coef"] == 0.5 and max(sharper["target_mode_masses"]) == pytest.approx(225 / 539, abs=0.01)
    # the pretrained model's pools behind tilted_* are drawn once and kept with it
    assert len(list((pretrained_gmm25 / "cache").glob("pool_*.npy"))) == 2


def test_evaluate_of_the_pretrained_mixture_reports_its_mode_masses(pretrained_gmm25, capsys):
    assert main(["evaluate", "--run", str(pretrained_gmm25), "--num-samples", "2000"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert len(m["mode_masses"]) == 25 and m["data_mode_masses"] == pytest.approx([0.04] * 25)
    # a small model of 25 narrow modes: every mode held, nothing far off
    assert min(m["mode_masses"]) > 0.01 and m["far_fraction"] == 0.0
