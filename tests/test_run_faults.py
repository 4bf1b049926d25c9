"""Faults of the machine, not of the input: one process per run directory, and a full disk ends in one line with
the last good checkpoint kept."""

import errno
import json
import os
import subprocess
import sys

import torch

from rl_diffusion import checkpoint
from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.cli import main
from rl_diffusion.runlock import LOCK_FILE, run_lock


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def tiny_finetune(pretrained, out, *extra: str) -> list[str]:
    return ["finetune", "--run", str(pretrained), "--out", str(out), "--chains", "16", "--quiet", *extra]


def test_a_run_in_use_is_refused_and_free_again_once_its_process_dies(capsys, pretrained_moons, tmp_path):
    out = tmp_path / "ft"
    assert main(tiny_finetune(pretrained_moons, out, "--epochs", "1", "--no-final-eval")) == 0
    before = CheckpointManager(out).load_latest()["model"]
    holder = subprocess.Popen(  # another process that has the run: it takes the lock, then waits to be killed
        [
            sys.executable,
            "-c",
            "import sys, time; from rl_diffusion.runlock import run_lock\n"
            f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["finetune", "--resume", str(out)]) == 2
        assert f"{out} is in use by process {holder.pid}" in one_line_error(capsys)
        assert main(tiny_finetune(pretrained_moons, out, "--overwrite")) == 2  # nor replaced under it
        assert f"in use by process {holder.pid}" in one_line_error(capsys)
        after = CheckpointManager(out).load_latest()["model"]
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        holder.kill()  # SIGKILL: nothing is released by the process itself
        holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # the dead holder's file stays
    assert main(["finetune", "--resume", str(out)]) == 0  # and the run is not locked by it


def test_a_lock_is_released_when_its_block_ends_and_shared_by_torchrun_ranks(tmp_path, monkeypatch):
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        monkeypatch.setenv("RANK", "1")
        with run_lock(tmp_path):  # rank 1 of the same run: rank 0 holds it for both
            pass
        monkeypatch.delenv("RANK")
    with run_lock(tmp_path):  # released: taken again
        pass


def test_a_full_disk_ends_in_one_line_and_the_last_checkpoint_resumes(capsys, pretrained_moons, tmp_path, monkeypatch):
    out = tmp_path / "ft"
    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, f):
        saves.append(1)
        if len(saves) == 2:  # the checkpoint of epoch 2
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_fills)
    assert (
        main(tiny_finetune(pretrained_moons, out, "--epochs", "3", "--checkpoint-every", "1", "--no-final-eval")) == 2
    )
    line = one_line_error(capsys)
    assert "step_00000002.pt: No space left on device" in line and "step_00000001.pt, is kept" in line, line
    assert [p.name for p in CheckpointManager(out).paths()] == ["step_00000001.pt"]
    assert not list((out / "checkpoints").glob("*.tmp"))  # nothing half-written is left to be taken as the latest
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert main(["finetune", "--resume", str(out)]) == 0
    assert CheckpointManager(out).load_latest()["train_state"]["epoch"] == 3


def test_an_os_error_outside_a_checkpoint_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["pretrain", "--out", str(blocker / "run"), "--steps", "10", "--quiet"]) == 2
    assert str(blocker) in one_line_error(capsys)
