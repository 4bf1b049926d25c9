"""`frontier --ray ADDRESS`: the runs go to a Ray cluster as the same commands and land as local runs land."""

import json
import logging
import os
import subprocess
import sys

import pytest

from rl_diffusion.algos import loop
from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.cli import main

TINY_FINETUNE = [
    "--reward",
    "linear",  # unbounded: the evaluation skips the rejection-sampled target, the slow part of a run this small
    "--chains",
    "16",
    "--epochs",
    "2",
    "--eval-samples",
    "1000",
]


@pytest.fixture(scope="module")
def ray_address():
    """A 2-CPU Ray instance started by this process, stopped (with every process it started) at the end."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        yield context.address_info["address"]
    finally:
        ray.shutdown()


def test_ray_without_ray_installed_is_a_user_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    args = ["ablate", "pretrain", "--param", "lr", "--values", "1e-3", "--out", str(tmp_path / "a"), "--ray", "local"]
    assert main(args) == 2
    assert "pip install -e .[ray]" in capsys.readouterr().err


def test_frontier_through_ray_writes_the_runs_and_numbers_of_a_local_run(pretrained_moons, ray_address, tmp_path):
    out = tmp_path / "frontier"
    command = ["frontier", "--run", str(pretrained_moons), "--kl-coefs", "0.1,0.3", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "rl_diffusion.cli", *command, *TINY_FINETUNE, "--ray", ray_address],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count(": ok (") == 2
    summary = json.loads((out / "frontier.json").read_text())
    assert list(summary["runs"]) == ["0.1", "0.3"] and (out / "frontier.png").stat().st_size > 5000
    assert set(summary) == {"kl_coefs", "runs", "mix"} and len(summary["mix"]["points"]) == 5  # as drawn locally
    for beta in ("0.1", "0.3"):
        run_dir = out / f"kl_coef={beta}"
        assert (run_dir / "config.json").exists() and list((run_dir / "checkpoints").glob("step_*.pt"))
        assert summary["runs"][beta]["reward_mean"] == json.loads((run_dir / "metrics.json").read_text())["reward_mean"]
    # the same setting trained here, in this process (without its final evaluation): seeded runs agree
    # whichever machine ran them
    local = tmp_path / "local"
    flags = ["--run", str(pretrained_moons), "--out", str(local), "--kl-coef", "0.3", "--quiet"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "finish_run", lambda run: {})
        assert main(["finetune", *flags, *TINY_FINETUNE]) == 0
    history = CheckpointManager(local).load_latest()["train_state"]["history"]
    curve = summary["runs"]["0.3"]["curve"]
    # measured equal; the tolerance leaves room for thread counts that round differently
    assert curve["reward_mean"] == pytest.approx([h["reward/mean"] for h in history], rel=1e-5)
    assert curve["kl_to_pretrained"] == pytest.approx([h["kl/to_pretrained"] for h in history], rel=1e-5, abs=1e-9)
