"""--kl-target: beta adapted after each epoch (Ziegler et al. 2019) holds the mean path KL near a budget."""

import pytest

from rl_diffusion import evaluation
from rl_diffusion.algos import loop
from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.cli import main
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.run import setup
from tests.test_resume import assert_same_weights, finetuned_straight_and_resumed


def test_adapted_kl_coef_follows_the_clipped_proportional_rule():
    # e = clip(KL / target - 1, -0.2, 0.2); beta (1 + K e)
    assert loop.adapted_kl_coef(0.5, kl=1.1, kl_target=1.0, kl_gain=0.5) == pytest.approx(0.5 * (1 + 0.5 * 0.1))
    assert loop.adapted_kl_coef(0.5, kl=3.0, kl_target=1.0, kl_gain=0.5) == pytest.approx(0.5 * 1.1)  # clipped at +0.2
    assert loop.adapted_kl_coef(0.5, kl=0.0, kl_target=2.0, kl_gain=1.0) == pytest.approx(0.5 * 0.8)  # clipped at -0.2
    assert loop.adapted_kl_coef(0.5, kl=2.0, kl_target=2.0, kl_gain=1.0) == 0.5


def path_kl_per_epoch(pretrained, out, monkeypatch, **overrides) -> tuple[list[float], list[float]]:
    """Mean path KL and beta of each epoch of a ddpo-is run pulled towards (3, 3), far off the moons."""
    monkeypatch.setattr(loop, "finish_run", lambda run: {})  # the final evaluation is not what is tested
    cfg = FinetuneConfig(
        run=str(pretrained),
        reward="target_point",
        reward_args={"point": [3.0, 3.0]},
        algo="ddpo-is",
        chains=128,
        epochs=24,
        lr=3e-3,
        minibatch_size=256,
        kl_coef=0.3,
        checkpoint_every=100,
        **overrides,
    )
    run = setup(cfg, out, overwrite=True)
    loop.train(run, progress=False)
    return [h["kl/to_pretrained"] for h in run.history], [h["kl/beta"] for h in run.history]


def test_kl_target_holds_the_path_kl_where_a_fixed_beta_does_not(pretrained_moons, tmp_path, monkeypatch):
    kl, beta = path_kl_per_epoch(pretrained_moons, tmp_path / "adaptive", monkeypatch, kl_target=1.0, kl_gain=0.5)
    assert beta[0] == 0.3 and beta[1] == pytest.approx(0.3 * 0.9)  # KL 0 before the first update: beta lowered by 10%
    assert sum(kl[-8:]) / 8 == pytest.approx(1.0, rel=0.2)
    assert max(beta) > 0.5  # it had to raise beta well above its start to get there
    # evaluate measures the run against the tilt of its last beta, kept in the checkpoint
    last_beta = CheckpointManager(tmp_path / "adaptive").load_latest()["train_state"]["kl_coef"]
    monkeypatch.setattr(evaluation, "TILTED_POOL", 2000)
    assert evaluation.evaluate_finetuned(tmp_path / "adaptive", num_samples=500)["kl_coef"] == last_beta != 0.3
    fixed, fixed_beta = path_kl_per_epoch(pretrained_moons, tmp_path / "fixed", monkeypatch)
    assert set(fixed_beta) == {0.3}
    assert sum(fixed[-8:]) / 8 > 2.0


def test_kl_target_run_resumed_mid_run_is_bit_identical(pretrained_moons, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "finish_run", lambda run: {})
    args = [
        "--run",
        str(pretrained_moons),
        "--algo",
        "ddpo-sf",
        "--reward",
        "target_point",
        "--reward-arg",
        "point=[1,1]",
        "--chains",
        "16",
        "--epochs",
        "4",
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "10",
        "--lr",
        "3e-3",
        "--kl-coef",
        "0.1",
        "--kl-target",
        "0.05",
        "--kl-gain",
        "2",
        "--quiet",
    ]
    a, b = finetuned_straight_and_resumed(args, tmp_path)
    assert_same_weights(a["model"], b["model"])
    betas = [h["kl/beta"] for h in a["train_state"]["history"]]
    assert betas == [h["kl/beta"] for h in b["train_state"]["history"]]
    assert len(set(betas)) == 4 and a["train_state"]["kl_coef"] == b["train_state"]["kl_coef"] != betas[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--algo", "rwr", "--kl-target", "1"], "--kl-target adapts the beta of the native algorithms with a KL term"),
        (
            ["--algo", "sb3-ppo", "--kl-target", "1", "--kl-coef", "0.1"],
            "--kl-target adapts the beta of the native algorithms with a KL term",
        ),
        (["--kl-target", "1"], "give a starting --kl-coef > 0"),
        (["--kl-target", "-1", "--kl-coef", "0.1"], "--kl-target must be >= 0"),
        (["--kl-target", "1", "--kl-coef", "0.1", "--kl-gain", "5"], "--kl-gain must be in (0, 5)"),
    ],
)
def test_bad_kl_target_flags_are_user_errors(flags, message, tmp_path, capsys):
    assert main(["finetune", "--run", "unused", "--out", str(tmp_path / "r"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert not (tmp_path / "r").exists()
