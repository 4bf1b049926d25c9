"""Runs that survive: resume ends bit-identical to an uninterrupted run; corrupt checkpoints are skipped."""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.cli import main
from rl_diffusion.config import saved_config
from rl_diffusion.finetune import FinetuneConfig, algorithm_settings

TINY = [  # without the final evaluation and figures: these tests compare weights and histories
    "--no-final-eval",
    "--dataset",
    "moons",
    "--num-timesteps",
    "10",
    "--hidden-size",
    "32",
    "--batch-size",
    "128",
    "--eval-every",
    "40",
    "--eval-samples",
    "200",
    "--checkpoint-every",
    "20",
    "--keep-checkpoints",
    "10",
    "--quiet",
]


def final_state(run):
    ckpt = CheckpointManager(run).load_latest()
    return ckpt["model"], ckpt["train_state"]["model"]


def finetuned_straight_and_resumed(args: list[str], tmp_path) -> tuple[dict, dict]:
    """The last checkpoints of a finetune run straight through and of a copy of it resumed after losing its last
    two (the copy holds what a run that died there holds: its config, checkpoints and event file). Without the
    final evaluation: the comparison is of weights and histories."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["finetune", "--out", str(full), *args, "--no-final-eval"]) == 0
    shutil.copytree(full, cut)
    for path in CheckpointManager(cut).paths()[-2:]:
        path.unlink()
    assert main(["finetune", "--resume", str(cut)]) == 0
    return CheckpointManager(full).load_latest(), CheckpointManager(cut).load_latest()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_pretrain_resumed_from_a_mid_run_checkpoint_is_bit_identical(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["pretrain", "--out", str(full), "--steps", "80", *TINY]) == 0
    assert main(["pretrain", "--out", str(cut), "--steps", "80", *TINY]) == 0
    for path in CheckpointManager(cut).paths()[-2:]:  # forget steps 60 and 80: the run "died" after step 40
        path.unlink()
    assert CheckpointManager(cut).load_latest()["train_state"]["step"] == 40
    assert main(["pretrain", "--resume", str(cut)]) == 0
    for a, b in zip(final_state(full), final_state(cut), strict=True):
        assert_same_weights(a, b)


def test_pretrain_killed_with_sigkill_and_resumed_is_bit_identical(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["--steps", "400", *TINY]
    assert main(["pretrain", "--out", str(full), *args]) == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "rl_diffusion.cli", "pretrain", "--out", str(killed), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while (
        not any(p.name == "step_00000060.pt" for p in (killed / "checkpoints").glob("*.pt")) and time.time() < deadline
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = CheckpointManager(killed).load_latest()["train_state"]["step"]
    assert 60 <= step < 400, "the run should have died part-way"
    time.sleep(1.1)  # TensorBoard orders event files by the second they were created, as a later resume would be
    assert main(["pretrain", "--resume", str(killed)]) == 0
    for a, b in zip(final_state(full), final_state(killed), strict=True):
        assert_same_weights(a, b)
    # TensorBoard continues on the same step axis: every point once, the same values as the full run
    assert scalars(killed, "loss/train") == scalars(full, "loss/train")
    assert [s for s, _ in scalars(killed, "eval/sw2")] == list(range(40, 401, 40))


def scalars(run, tag):
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_ddpo_is_resumed_from_a_mid_run_checkpoint_is_bit_identical(pretrained_moons, tmp_path):
    args = [
        "--run",
        str(pretrained_moons),
        "--algo",
        "ddpo-is",
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
        "--minibatch-size",
        "64",
        "--inner-epochs",
        "2",
        "--timestep-fraction",
        "0.5",
        "--kl-coef",
        "0.1",
        "--quiet",
    ]
    a, b = finetuned_straight_and_resumed(args, tmp_path)
    assert_same_weights(a["model"], b["model"])
    assert [h["reward/mean"] for h in a["train_state"]["history"]] == [
        h["reward/mean"] for h in b["train_state"]["history"]
    ]


@pytest.mark.parametrize(
    "algo, extra",
    [
        ("awm", ["--kl-coef", "0.1"]),
        ("nft", ["--kl-coef", "0.1", "--nft-strength", "0.5", "--old-decay-rate", "0.3"]),  # the old policy averaged
        # the window of trained steps moves each epoch: the resumed epochs continue where it was, and so do the
        # deterministic steps outside it
        (
            "flow-grpo",
            ["--kl-coef", "0.1", "--group-size", "4", "--train-steps", "5", "--window-shift", "3"]
            + ["--sampler", "ddim", "--ode-outside-window"],
        ),
        ("adjoint", ["--kl-coef", "1"]),
        ("rtb", ["--kl-coef", "1", "--replay-size", "32"]),
        # the running log Z and the exploration schedule continue where they were
        ("ddpo-is", ["--kl-coef", "1", "--kl-return", "path", "--explore-scale", "2", "--explore-epochs", "1"]),
        ("draft", ["--kl-coef", "0.1", "--draft-steps", "5"]),
        # tempering: the resumed epochs continue at an intermediate beta (iw/lambda) mid-way to 0.1
        ("iw-distill", ["--kl-coef", "0.1", "--pool-size", "64", "--distill-steps", "5", "--ess-target", "0.9"]),
    ],
)
def test_native_algorithms_resumed_from_a_mid_run_checkpoint_are_bit_identical(pretrained_moons, tmp_path, algo, extra):
    args = ["--run", str(pretrained_moons), "--algo", algo, "--reward", "target_point", "--reward-arg", "point=[1,1]"]
    args += ["--chains", "16", "--epochs", "4", "--checkpoint-every", "1", "--keep-checkpoints", "10"]
    args += ["--minibatch-size", "64", "--quiet", *extra]
    a, b = finetuned_straight_and_resumed(args, tmp_path)
    assert_same_weights(a["model"], b["model"])
    assert [h["reward/mean"] for h in a["train_state"]["history"]] == [
        h["reward/mean"] for h in b["train_state"]["history"]
    ]


def test_a_run_saved_with_every_algorithms_settings_resumes_bit_identical_and_evaluates(pretrained_moons, tmp_path):
    """config.json as written before the settings moved to the algorithms: every native algorithm's among its
    fields."""
    args = ["--run", str(pretrained_moons), "--algo", "rtb", "--reward", "target_point", "--reward-arg", "point=[1,1]"]
    args += ["--chains", "16", "--epochs", "4", "--checkpoint-every", "1", "--keep-checkpoints", "10", "--quiet"]
    args += ["--kl-coef", "1", "--replay-size", "32", "--explore-scale", "1.5", "--no-final-eval"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["finetune", "--out", str(full), *args]) == 0
    shutil.copytree(full, cut)
    every = {f.name: f.default for settings in algorithm_settings().values() for f in dataclasses.fields(settings)}
    (cut / "config.json").write_text(json.dumps({**every, **json.loads((full / "config.json").read_text())}))
    for path in CheckpointManager(cut).paths()[-2:]:
        path.unlink()
    assert main(["finetune", "--resume", str(cut), "--replay-size", "32"]) == 0  # the saved value: no change
    assert_same_weights(CheckpointManager(full).load_latest()["model"], CheckpointManager(cut).load_latest()["model"])
    assert saved_config(FinetuneConfig, cut) == saved_config(FinetuneConfig, full)
    assert main(["evaluate", "--run", str(cut), "--num-samples", "100"]) == 0


def test_sigterm_leaves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "r"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rl_diffusion.cli",
            "pretrain",
            "--out",
            str(run),
            "--steps",
            "100000",
            "--checkpoint-every",
            "100000",
            *TINY[:-5],
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not list(run.glob("events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.strip().startswith("error: stopped by signal") and "--resume" in err
    ckpt = CheckpointManager(run).load_latest()
    assert 0 < ckpt["train_state"]["step"] < 100000


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_used(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["pretrain", "--out", str(run), "--steps", "40", *TINY]) == 0
    newest = CheckpointManager(run).paths()[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    ckpt = CheckpointManager(run).load_latest()
    assert ckpt["train_state"]["step"] == 20
    assert f"checkpoint {newest} is unreadable" in capsys.readouterr().err


def test_keep_checkpoints_keeps_the_last_k_plus_the_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step, score in [(1, 0.0), (2, 5.0), (3, 1.0), (4, 2.0), (5, 3.0)]:
        manager.save({"step": step}, step, score)
    assert [p.name for p in manager.paths()] == ["step_00000002.pt", "step_00000004.pt", "step_00000005.pt"]


def test_atomic_save_leaves_no_temporary_files(tmp_path):
    CheckpointManager(tmp_path).save({"x": torch.zeros(3)}, 7)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000007.pt"]


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    run = tmp_path / "r"
    assert main(["pretrain", "--out", str(run), "--steps", "20", *TINY]) == 0
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
