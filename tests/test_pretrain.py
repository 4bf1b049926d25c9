import json

import numpy as np
import torch

from pretrain.datasets import sample_2d
from rl_diffusion.checkpoint import CheckpointManager, load_run
from rl_diffusion.cli import main
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
