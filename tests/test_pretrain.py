import json

import numpy as np
import pytest
import torch

from pretrain.datasets import sample_2d
from pretrain.train import PHASES, PhaseClock, PretrainConfig, eval_sampling, start_run, train
from rl_diffusion.checkpoint import CheckpointManager, load_run
from rl_diffusion.cli import main
from rl_diffusion.diffusion import GaussianDiffusion
from rl_diffusion.errors import UserError
from rl_diffusion.flow import FlowMatching
from rl_diffusion.metrics import gaussian_fit, sample_quality


def test_short_moons_run_beats_a_gaussian_fit_on_every_metric(pretrained_moons):
    metrics = json.loads((pretrained_moons / "metrics.json").read_text())
    data, again = sample_2d("moons", 5000, 12345), sample_2d("moons", 5000, 12346)
    baseline = sample_quality(gaussian_fit(data, 5000, seed=0), data, again)
    for name in ("sw2", "mmd", "energy"):
        assert metrics[name] < 0.6 * baseline[name], (name, metrics[name], baseline[name])
    assert metrics["sw2"] < 6 * metrics["sw2_floor"]


def test_run_directory_holds_config_events_checkpoint_and_figures(pretrained_moons):
    config = json.loads((pretrained_moons / "config.json").read_text())
    assert config["kind"] == "pretrain" and config["dataset"] == "moons" and config["num_timesteps"] == 20
    assert list(pretrained_moons.glob("events.out.tfevents.*"))
    for name in (
        "samples_vs_data.png",
        "forward_process.png",
        "reverse_process.png",
        "reverse_process.gif",
        "training.gif",
    ):
        assert (pretrained_moons / "figures" / name).stat().st_size > 1000
    ckpt = CheckpointManager(pretrained_moons).load_latest()
    assert ckpt["train_state"]["step"] == 1500 and ckpt["data"] == {
        "dataset": "moons",
        "shape": [2],
        "num_classes": 0,
        "root": "",
        "image_size": 0,
        "seed": 0,
    }


def test_sample_writes_points_in_data_coordinates(pretrained_moons, tmp_path):
    out = tmp_path / "s.npy"
    assert (
        main(["sample", "--run", str(pretrained_moons), "--num-samples", "300", "--out", str(out), "--seed", "3"]) == 0
    )
    x = np.load(out)
    assert x.shape == (300, 2) and x.dtype == np.float32
    assert (
        main(
            [
                "sample",
                "--run",
                str(pretrained_moons),
                "--num-samples",
                "300",
                "--out",
                str(tmp_path / "d.npy"),
                "--sampler",
                "ddim",
                "--sampling-steps",
                "10",
                "--eta",
                "0",
            ]
        )
        == 0
    )
    # the moons live in x in [-3, 3], y in [-2.5, 2.5]; samples of a trained model do too
    assert np.abs(np.load(tmp_path / "d.npy")).max() < 4


def test_evaluate_prints_metrics_with_floors(pretrained_moons, capsys):
    assert main(["evaluate", "--run", str(pretrained_moons), "--num-samples", "1000"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["kind"] == "pretrain" and metrics["sw2_floor"] < metrics["sw2"] < 1.0


def test_data_command_matches_sample_2d(tmp_path):
    out = tmp_path / "dino.npy"
    assert main(["data", "dino", "--num-samples", "50", "--out", str(out), "--seed", "7"]) == 0
    np.testing.assert_array_equal(np.load(out), sample_2d("dino", 50, 7))


def test_loaded_model_is_the_ema(pretrained_moons):
    run = load_run(pretrained_moons)
    ckpt = run.checkpoint
    raw, ema = ckpt["train_state"]["model"], ckpt["model"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert all(torch.equal(run.model.state_dict()[k], ema[k]) for k in ema)


def test_timing_splits_the_run_into_its_phases(pretrained_moons):
    timing = json.loads((pretrained_moons / "timing.json").read_text())
    assert set(timing["seconds"]) == {*PHASES, "other"}
    assert all(timing["seconds"][phase] > 0 for phase in ("setup", "optimizer_steps", "final_evaluation", "figures"))
    assert sum(timing["seconds"].values()) == pytest.approx(timing["total_seconds"])


def test_in_training_evaluations_leave_the_training_unchanged(tmp_path):
    """However often and with whatever sampler it evaluates, a run trains the same weights: the evaluations
    draw from a generator of their own, never the training one."""
    tiny = dict(dataset="moons", steps=30, num_timesteps=10, hidden_size=16, batch_size=64, checkpoint_every=30)
    often = PretrainConfig(**tiny, eval_every=7, eval_samples=300, eval_sampling_steps=0)
    rarely = PretrainConfig(**tiny, eval_every=30, eval_samples=100, eval_sampling_steps=3)
    weights = []
    for name, config in (("often", often), ("rarely", rarely)):
        run = start_run(config, tmp_path / name, overwrite=False, resume=False)
        train(run, resume=False, progress=False, clock=PhaseClock())
        weights.append(run.model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_in_training_evaluations_sample_ddim_in_fewer_steps_or_the_full_chain():
    ddpm, small, flow = GaussianDiffusion(num_timesteps=200), GaussianDiffusion(num_timesteps=10), FlowMatching(200)
    assert eval_sampling(20, ddpm) == {"sampler": "ddim", "sampling_steps": 20, "eta": 0.0}
    assert eval_sampling(20, flow) == {"sampler": "euler", "sampling_steps": 20}
    assert eval_sampling(0, ddpm) == eval_sampling(200, ddpm) == eval_sampling(20, small) == {}
    assert eval_sampling(0, flow) == eval_sampling(200, flow) == {}
    for steps in (1, -1):
        with pytest.raises(UserError, match="--eval-sampling-steps"):
            PretrainConfig(dataset="moons", eval_sampling_steps=steps).validate()
