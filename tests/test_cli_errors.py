"""Bad input: one line `error: ...` on stderr, exit status 2, no traceback, nothing lost."""

import json
import subprocess
import sys

import pytest
import torch

from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.cli import main


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_unknown_dataset_suggests_the_nearest(capsys, tmp_path):
    code, err = run_cli(capsys, "pretrain", "--dataset", "dinoo", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "unknown data set 'dinoo'", "did you mean 'dino'")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["pretrain", "--steps", "abc"], "invalid int value"),
        (["pretrain", "--out", "X", "--beta-schedule", "cosin"], "did you mean 'cosine'"),
        (["pretrain", "--out", "X", "--time-embedding", "sinus"], "unknown time embedding 'sinus'"),
        (["pretrain", "--out", "X", "--lr", "-1"], "--lr must be positive"),
        (["pretrain", "--out", "X", "--device", "cuda:7"], "device"),
        (["sample", "--run", "no/such/run", "--out", "x.npy"], "not a run directory"),
        (["evaluate", "--run", "no/such/run"], "not a run directory"),
        (["data", "moon", "--out", "x.npy"], "did you mean 'moons'"),
        (
            ["finetune", "--run", "r", "--out", "X", "--sampler", "ddim", "--eta", "1.5"],
            "--eta must be in [0, 1], got 1.5",
        ),
        (
            ["finetune", "--run", "r", "--out", "X", "--algo", "rwr", "--kl-coef", "0.1"],
            "tilt that compounds over epochs",
        ),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_flags_and_names(capsys, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(capsys, *args)
    assert_one_line_error(code, err, fragment)
    assert list(tmp_path.iterdir()) == []


def test_existing_run_is_refused_without_overwrite_and_left_as_it_was(capsys, pretrained_moons):
    before = {p: p.stat().st_mtime_ns for p in pretrained_moons.rglob("*")}
    code, err = run_cli(capsys, "pretrain", "--dataset", "moons", "--out", str(pretrained_moons), "--steps", "5")
    assert_one_line_error(code, err, "already holds files", "--resume", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in pretrained_moons.rglob("*")} == before


def test_resume_refuses_flags_that_change_the_run(capsys, pretrained_moons):
    code, err = run_cli(capsys, "pretrain", "--resume", str(pretrained_moons), "--lr", "0.1")
    assert_one_line_error(code, err, "--lr would change the resumed run")


def test_foreign_checkpoint_says_what_it_expected(capsys, pretrained_moons, tmp_path):
    ckpt = CheckpointManager(pretrained_moons).load_latest()
    ckpt["model_config"]["hidden_size"] = 32  # the weights are 64 wide
    run = tmp_path / "foreign"
    run.mkdir()
    (run / "config.json").write_text('{"kind": "pretrain"}')
    CheckpointManager(run).save(ckpt, 1)
    code, err = run_cli(capsys, "sample", "--run", str(run), "--out", str(tmp_path / "x.npy"))
    assert_one_line_error(code, err, "does not fit this model", "expected")


@pytest.mark.parametrize(
    "reward_args, fragment",
    [
        (["--reward", "targt_point"], "did you mean 'target_point'"),
        (
            ["--reward", "target_point", "--reward-arg", "pont=[1,1]"],
            "got unknown argument(s) pont (did you mean 'point'?)",
        ),
        (["--reward", "target_point", "--reward-arg", "point"], "key=value"),
        (["--reward", "no_such_module_xyz:factory"], "could not be imported"),
        (
            [
                "--reward",
                "tests.reward_plugin_example:broken_after",
                "--reward-arg",
                "calls=0",
                "--reward-arg",
                "mode=raise",
            ],
            "reward 'tests.reward_plugin_example:broken_after' raised RuntimeError",
        ),
        (
            [
                "--reward",
                "tests.reward_plugin_example:broken_after",
                "--reward-arg",
                "calls=0",
                "--reward-arg",
                "mode=shape",
            ],
            "expected (B,)",
        ),
    ],
)
def test_bad_rewards_fail_before_any_work(capsys, pretrained_moons, tmp_path, reward_args, fragment):
    out = tmp_path / "ft"
    code, err = run_cli(capsys, "finetune", "--run", str(pretrained_moons), "--out", str(out), *reward_args)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_one_step_ddim_is_refused_before_any_work(capsys, pretrained_moons, tmp_path):
    out = tmp_path / "ft"
    code, err = run_cli(
        capsys,
        "finetune",
        "--run",
        str(pretrained_moons),
        "--out",
        str(out),
        "--sampler",
        "ddim",
        "--sampling-steps",
        "1",
    )
    assert_one_line_error(code, err, "--sampling-steps must be between 2 and 20, got 1")
    assert not out.exists()


def test_a_kl_run_on_a_sampler_that_remembers_x_T_is_warned_and_flagged(capsys, pretrained_moons, tmp_path):
    out = tmp_path / "ft"
    code, err = run_cli(
        capsys,
        "finetune",
        "--run",
        str(pretrained_moons),
        "--out",
        str(out),
        "--sampler",
        "ddim",
        "--sampling-steps",
        "5",
        "--eta",
        "0.5",
        "--kl-coef",
        "0.3",
        "--chains",
        "16",
        "--epochs",
        "1",
        "--quiet",
    )
    assert code == 0 and len(err) == 1, err
    assert err[0].startswith("warning: --sampler ddim with --eta 0.5 keeps memory of x_T"), err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["memoryless"] is False and "not reachable" in metrics["note"]


def test_reward_turning_nan_mid_run_keeps_the_last_good_checkpoint(capsys, pretrained_moons, tmp_path):
    out = tmp_path / "ft"
    # call 1 validates the reward, calls 2-3 are epochs 1-2, call 4 (epoch 3) returns NaN
    code, err = run_cli(
        capsys,
        "finetune",
        "--run",
        str(pretrained_moons),
        "--out",
        str(out),
        "--chains",
        "16",
        "--reward",
        "tests.reward_plugin_example:broken_after",
        "--reward-arg",
        "calls=3",
        "--epochs",
        "5",
        "--checkpoint-every",
        "1",
        "--quiet",
    )
    assert_one_line_error(code, err, "non-finite", "epoch 3", str(out))
    ckpt = CheckpointManager(out).load_latest()
    assert ckpt["train_state"]["epoch"] == 2 and torch.isfinite(next(iter(ckpt["model"].values()))).all()


def test_skip_nonfinite_rewards_drops_and_counts(pretrained_moons, tmp_path):
    out = tmp_path / "ft"
    assert (
        main(
            [
                "finetune",
                "--run",
                str(pretrained_moons),
                "--out",
                str(out),
                "--chains",
                "16",
                "--epochs",
                "3",
                "--reward",
                "tests.reward_plugin_example:broken_after",
                "--reward-arg",
                "calls=2",
                "--reward-arg",
                "mode=half",
                "--skip-nonfinite-rewards",
                "--quiet",
            ]
        )
        == 0
    )
    history = CheckpointManager(out).load_latest()["train_state"]["history"]
    assert [h["reward/nonfinite"] for h in history] == [0.0, 8.0, 8.0]
    assert all(torch.isfinite(torch.tensor(h["reward/mean"])) for h in history)


def test_console_script_prints_one_line_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rl_diffusion.cli", "pretrain", "--dataset", "nope", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown data set 'nope'") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_run_stopped_before_its_first_checkpoint_names_the_way_out(capsys, pretrained_moons, tmp_path, monkeypatch):
    out = tmp_path / "ft"
    start = [
        "finetune",
        "--run",
        str(pretrained_moons),
        "--out",
        str(out),
        "--chains",
        "16",
        "--epochs",
        "1",
        "--quiet",
    ]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("rl_diffusion.algos.trainer", lambda algo: killed)
        assert_one_line_error(*run_cli(capsys, *start), "interrupted")
    assert (out / "config.json").exists() and CheckpointManager(out).paths() == []

    code, err = run_cli(capsys, "finetune", "--resume", str(out))
    assert_one_line_error(code, err, "no checkpoint", f"start it again with --out {out} --overwrite")
    code, err = run_cli(capsys, *start)
    assert_one_line_error(code, err, "stopped before its first checkpoint", "pass --overwrite to start it again")
    assert run_cli(capsys, *start, "--overwrite")[0] == 0
    assert CheckpointManager(out).paths()


def test_saved_config_with_a_non_finite_number_is_refused(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kind": "pretrain", "lr": float("nan")}))  # JSON's NaN
    code, err = run_cli(capsys, "pretrain", "--resume", str(run))
    assert_one_line_error(code, err, "PretrainConfig field lr must be a finite number, got nan")
