"""Data parallelism (torchrun + DDP, gloo on CPU): 2 ranks compute what 1 rank computes for the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl_diffusion.cli import main
from rl_diffusion.distributed import Ranks
from rl_diffusion.errors import UserError

TESTS = Path(__file__).parent
# one thread per rank: two ranks on two cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def latest_checkpoint(run: Path) -> dict:
    return torch.load(sorted((run / "checkpoints").glob("step_*.pt"))[-1], weights_only=False)


def assert_same_parameters(a: dict, b: dict) -> None:
    """Equal to float rounding: every entry within 1e-5, but for at most 1 in 1,000 entries within 1e-4.

    Two ranks sum the same gradients in another order; Adam divides each gradient by its own running
    scale, so an entry whose gradient is nearly zero (rounding noise against rounding noise) can move by
    up to about the learning rate either way. One such entry of 4,096 moved by 1.7e-5 in a 2-epoch rtb run
    whose losses agreed to 1e-6."""
    assert a.keys() == b.keys()
    for name in a:
        diff = (a[name] - b[name]).abs()
        assert diff.max() <= 1e-4 and (diff > 1e-5 + 1e-4 * b[name].abs()).float().mean() <= 1e-3, name


def written_files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and not p.name.startswith("events."))


def test_a_batch_that_does_not_split_evenly_is_refused():
    assert Ranks(1, 2).shard(8, "--chains") == slice(4, 8)
    assert Ranks(0, 1).shard(7, "--chains") == slice(0, 7)
    with pytest.raises(UserError, match="--chains 9 does not split evenly over 2 ranks"):
        Ranks(0, 2).shard(9, "--chains")


@pytest.mark.parametrize("model_type", ["ddpm", "flow"])
def test_pretraining_on_two_ranks_matches_one_rank(tmp_path, model_type):
    flags = [
        "--model-type",
        model_type,
        "--dataset",
        "moons",
        "--steps",
        "30",
        "--num-timesteps",
        "20",
        "--hidden-size",
        "32",
        "--batch-size",
        "64",
        "--eval-every",
        "30",
        "--eval-samples",
        "200",
        "--checkpoint-every",
        "10",
        "--no-final-eval",  # weights are compared; 2 ranks' final metrics and figures: the ddpo-is test below
        "--quiet",
    ]
    two = torchrun("-m", "rl_diffusion.cli", "pretrain", "--out", str(tmp_path / "two"), *flags)
    assert two.returncode == 0, two.stderr[-2000:]
    assert main(["pretrain", "--out", str(tmp_path / "one"), *flags]) == 0
    one_ckpt, two_ckpt = latest_checkpoint(tmp_path / "one"), latest_checkpoint(tmp_path / "two")
    assert two_ckpt["train_state"]["step"] == 30
    assert_same_parameters(two_ckpt["train_state"]["model"], one_ckpt["train_state"]["model"])
    assert_same_parameters(two_ckpt["model"], one_ckpt["model"])  # the EMA
    # only rank 0 wrote: the same files as one process, and one TensorBoard event file
    assert written_files(tmp_path / "two") == written_files(tmp_path / "one")
    assert len(list((tmp_path / "two").glob("events.*"))) == 1
    assert two.stdout.count("run written to") == 1  # the summary is printed once


def on_two_ranks_and_one(pretrained: Path, tmp_path: Path, runs: dict) -> tuple[Path, Path]:
    """The runs {name: config overrides} on 2 ranks under torchrun and in one process, each in one launch of
    the worker; the two output folders."""
    worker, spec = str(TESTS / "ddp_finetune_worker.py"), tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    two = torchrun(worker, str(pretrained), str(spec), str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, worker, str(pretrained), str(spec), str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    return tmp_path / "two", tmp_path / "one"


def test_ddpo_is_on_two_ranks_matches_one_rank_and_resumes_on_one(pretrained_moons, tmp_path):
    # kl_coef > 0 and a timestep fraction exercise the gathered KLs and the minibatches drawn over
    # the whole batch's pairs; 100 pairs per minibatch leave each rank unequal shares of them. This run keeps
    # the final evaluation: rank 0 alone writes metrics.json and the figures, as one process does.
    config = {"algo": "ddpo-is", "chains": 32, "epochs": 2, "minibatch_size": 100, "kl_coef": 0.1, "eval_samples": 1000}
    config |= {"timestep_fraction": 0.5, "reward": "target_point", "reward_args": {"point": [1.5, 1.5]}}
    two, one = on_two_ranks_and_one(pretrained_moons, tmp_path, {"ddpo-is": {**config, "checkpoint_every": 1}})
    rank0, rank1 = (torch.load(two / "ddpo-is" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(one / "ddpo-is" / "rank0.pt")
    assert (rank0["world_size"], single["world_size"]) == (2, 1)
    stats = ("reward/mean", "reward/std", "reward/min", "reward/max", "kl/to_pretrained", "loss/policy", "ppo/clipfrac")
    for h0, h1, h in zip(rank0["history"], rank1["history"], single["history"], strict=True):
        for tag in stats:
            assert h0[tag] == h1[tag], tag  # every rank logged the statistics of the whole batch
            assert h0[tag] == pytest.approx(h[tag], rel=1e-4, abs=1e-5), tag
    assert rank0["history"][-1]["kl/to_pretrained"] > 0  # the update moved the policy
    assert_same_parameters(rank0["policy"], rank1["policy"])
    assert_same_parameters(rank0["policy"], single["policy"])
    run_two, run_one = two / "ddpo-is" / "run", one / "ddpo-is" / "run"
    assert "metrics.json" in written_files(run_two) and written_files(run_two) == written_files(run_one)
    assert len(list(run_two.glob("events.*"))) == 1

    # resume with another number of ranks: drop the 2-rank run's last epoch and redo it in one process
    (run_two / "checkpoints" / "step_00000002.pt").unlink()
    assert main(["finetune", "--resume", str(run_two), "--quiet"]) == 0
    assert_same_parameters(latest_checkpoint(run_two)["model"], single["policy"])


NATIVE = {  # algorithm: its settings on top of the shared ones
    "ddpo-sf": {"kl_coef": 0.1},
    "rwr": {},
    "nft": {"kl_coef": 0.1, "algo_args": {"nft_strength": 0.5, "old_decay_rate": 0.3}},
    "flow-grpo": {
        "kl_coef": 0.1,
        "sampler": "ddim",
        "algo_args": {"group_size": 8, "train_steps": 6, "window_shift": 4, "ode_outside_window": True},
    },
    "awm": {"kl_coef": 0.1},
    "adjoint": {"kl_coef": 1.0},
    "rtb": {"kl_coef": 1.0, "algo_args": {"replay_size": 64}},
    "draft": {"kl_coef": 0.1, "algo_args": {"draft_steps": 5}},
    "iw-distill": {"kl_coef": 0.1, "algo_args": {"pool_size": 64, "distill_steps": 5, "ess_target": 0.9}},
}


def test_native_algorithms_on_two_ranks_match_one_rank(pretrained_moons, tmp_path):
    shared = {"reward": "target_point", "chains": 32, "epochs": 2, "minibatch_size": 100, "final_eval": False}
    runs = {algo: {**shared, "algo": algo, **extra} for algo, extra in NATIVE.items()}
    two, one = on_two_ranks_and_one(pretrained_moons, tmp_path, runs)
    for algo in NATIVE:
        rank0, rank1 = (torch.load(two / algo / f"rank{r}.pt") for r in (0, 1))
        single = torch.load(one / algo / "rank0.pt")
        assert_same_parameters(rank0["policy"], rank1["policy"])
        assert_same_parameters(rank0["policy"], single["policy"])
        for h1, h2 in zip(single["history"], rank0["history"], strict=True):
            assert h2["loss/policy"] == pytest.approx(h1["loss/policy"], rel=1e-4, abs=1e-6), algo
