"""Held-out rewards, early stopping on one, and the monitors of reward hacking (realism, Vendi score, modes held,
label entropy, the variety within each class)."""

import json
import math

import numpy as np
import pytest
import torch

from pretrain.images import load_digits_images
from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.cli import main
from rl_diffusion.metrics import VENDI_BANDWIDTH, vendi_score, within_class_diversity
from rl_diffusion.run import hacking_warnings, label_classifier, monitor_scalars, read_labels
from rl_diffusion.targets import dataset_modes


def test_vendi_score_closed_forms():
    assert vendi_score(torch.zeros(50, 2)) == pytest.approx(1.0, abs=1e-9)
    clusters = torch.cat(
        [torch.full((40, 2), 5.0 * i) for i in range(4)]
    )  # 4 equal clusters, 7 bandwidths apart at least
    assert vendi_score(clusters) == pytest.approx(4.0, abs=1e-6)
    # two points d apart: K / 2 has eigenvalues (1 +- a) / 2, a = exp(-d^2 / (2 h^2))
    d = VENDI_BANDWIDTH
    a = math.exp(-0.5)
    lam = np.array([(1 + a) / 2, (1 - a) / 2])
    assert vendi_score(torch.tensor([[0.0, 0.0], [d, 0.0]], dtype=torch.float64)) == pytest.approx(
        math.exp(-(lam * np.log(lam)).sum()), rel=1e-9
    )


def test_monitors_count_modes_holding_one_percent_and_the_distance_off_the_data():
    modes = dataset_modes("gmm25")
    counts = {0: 300, 4: 300, 20: 100, 24: 5}  # the grid's corners; the last holds 5 / 715 = 0.7%: below 1%
    x0 = torch.cat(
        [torch.tensor(modes.means[m]).float().expand(n, 2) for m, n in counts.items()] + [torch.full((10, 2), 10.0)]
    )  # 10 points outside every mode
    values = monitor_scalars(x0, modes.means, modes)  # the data: the 25 mode centres
    assert values["diversity/modes_held"] == 3.0
    assert values["diversity/outside_mass"] == pytest.approx(10 / 715)
    # identical points per cluster, clusters far apart: K is block-diagonal, the score exp(entropy of the
    # cluster masses)
    p = np.array([*counts.values(), 10]) / 715
    assert values["diversity/vendi"] == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    # 705 points on a centre, 10 at (10, 10): its nearest centre (2, 2) is 8 away per coordinate
    assert values["realism/nearest_data"] == pytest.approx(10 * 8 / 715)


def test_hacking_warnings_compare_the_last_epoch_with_the_pretrained_models():
    data = np.random.default_rng(0).normal(size=(100, 2))  # std 1: the realism margin is 0.1
    first = {"realism/nearest_data": 0.3, "diversity/pairwise": 2.0}

    def warnings(realism, pairwise):
        return hacking_warnings([first, {"realism/nearest_data": realism, "diversity/pairwise": pairwise}], data)

    assert warnings(0.449, 1.01) == []  # below 1.5x, above half
    left = warnings(0.46, 1.0)
    assert len(left) == 1 and left[0].startswith("samples left the data") and "from 0.3 to 0.46" in left[0]
    assert "samples collapsed" in warnings(0.3, 0.99)[0]
    assert len(warnings(0.5, 0.1)) == 2
    tiny = {"realism/nearest_data": 0.01, "diversity/pairwise": 2.0}  # x3, but 0.02 is a fifth of the margin
    assert hacking_warnings([tiny, {**tiny, "realism/nearest_data": 0.03}], data) == []
    assert hacking_warnings([first], data) == []  # one epoch: nothing to compare


def test_label_entropy_of_grey_images_counts_the_digits_the_classifier_reads():
    images, labels = load_digits_images()
    zeros, ones = images[labels == 0][:40], images[labels == 1][:40]
    classifier = label_classifier(images.shape[1:], torch.device("cpu"))
    one_digit = monitor_scalars(torch.as_tensor(zeros), images, None, classifier)
    two_digits = monitor_scalars(torch.as_tensor(np.concatenate([zeros, ones])), images, None, classifier)
    assert one_digit["diversity/label_entropy"] == pytest.approx(0.0, abs=0.15)
    assert two_digits["diversity/label_entropy"] == pytest.approx(math.log(2), abs=0.1)
    assert one_digit["realism/nearest_data"] == 0.0  # real images are data
    noise = monitor_scalars(torch.rand(40, 1, 8, 8) * 2 - 1, images, None, classifier)
    assert noise["realism/nearest_data"] > 0.3  # pixels in [-1, 1]: noise is far from every digit


def test_within_class_diversity_weighs_each_labels_spread_against_the_references():
    # label 0: two points 1 apart against the reference's 2 apart (ratio 1/2), 2 of the 6 points; label 1: four
    # corners of a unit square (mean distance (4 + 2 sqrt 2) / 6) against the same (ratio 1), 4 of 6; label 2
    # exists only in the reference, label 3 has one point: neither counts
    square = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = torch.cat([torch.tensor([[0.0, 0.0], [1.0, 0.0]]), square, torch.tensor([[9.0, 9.0]])])
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 3])
    reference = torch.cat([torch.tensor([[0.0, 0.0], [2.0, 0.0]]), square, torch.tensor([[5.0, 5.0], [6.0, 5.0]])])
    reference_labels = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    assert within_class_diversity(x, labels, reference, reference_labels) == pytest.approx((2 * 0.5 + 4 * 1) / 6)
    assert math.isnan(within_class_diversity(x[6:], labels[6:], reference, reference_labels))


def test_a_collapse_inside_one_class_warns():
    # the pretrained model draws every digit; the fine-tuned one only 3s: the real 3s (varied), or two real 3s
    # repeated with a little noise (a few shapes, as a mode-seeking fine-tune leaves them). A class reward lowers
    # the mean pairwise distance either way (one class is less spread than ten); the variety within the class
    # tells the two apart
    images, labels = load_digits_images()
    classifier = label_classifier(images.shape[1:], torch.device("cpu"))
    shuffled = torch.as_tensor(images)[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
    threes = torch.as_tensor(images[labels == 3])[torch.randperm(99, generator=torch.Generator().manual_seed(1))]
    noise = 0.05 * torch.randn(99, *threes.shape[1:], generator=torch.Generator().manual_seed(0))
    few_shapes = threes[:2].repeat(50, 1, 1, 1)[:99] + noise
    data_labels = read_labels(classifier, images)
    first = monitor_scalars(shuffled[:200], images, None, classifier, data_labels)
    varied, collapsed = (monitor_scalars(x, images, None, classifier, data_labels) for x in (threes, few_shapes))
    assert first["diversity/within_class"] == pytest.approx(1.0, abs=0.05)  # real digits against real digits
    assert varied["diversity/within_class"] == pytest.approx(1.0, abs=0.05)
    assert collapsed["diversity/within_class"] < 0.75
    assert varied["diversity/pairwise"] < 0.75 * first["diversity/pairwise"]
    assert hacking_warnings([first, varied], images) == []
    warnings = hacking_warnings([first, collapsed], images)
    assert any(w.startswith("samples collapsed within their class") for w in warnings)


def finetune(pretrained, out, *args: str) -> list[dict]:
    """A tiny ddpo-is run (32 chains, DDIM with 5 steps) towards (1.5, 1.5); its per-epoch history."""
    assert (
        main(
            [
                "finetune",
                "--run",
                str(pretrained),
                "--out",
                str(out),
                "--algo",
                "ddpo-is",
                "--reward",
                "target_point",
                "--reward-arg",
                "point=[1.5, 1.5]",
                "--sampler",
                "ddim",
                "--sampling-steps",
                "5",
                "--chains",
                "32",
                "--lr",
                "1e-3",
                "--eval-samples",
                "500",
                "--quiet",
                *args,
            ]
        )
        == 0
    )
    return CheckpointManager(out).load_latest()["train_state"]["history"]


def test_eval_rewards_are_logged_and_leave_training_alone(pretrained_moons, tmp_path):
    held_out = [
        "--eval-reward",
        "same=target_point",
        "--eval-reward-arg",
        "same:point=[1.5, 1.5]",
        "--eval-reward",
        "left=target_point",
        "--eval-reward-arg",
        "left:point=[-3, 0]",
    ]
    history = finetune(pretrained_moons, tmp_path / "with", "--epochs", "3", *held_out)
    plain = finetune(pretrained_moons, tmp_path / "without", "--epochs", "3")
    with_weights = CheckpointManager(tmp_path / "with").load_latest()["model"]
    without_weights = CheckpointManager(tmp_path / "without").load_latest()["model"]
    assert all(torch.equal(with_weights[k], without_weights[k]) for k in with_weights)
    # the training reward, held out under another label, scores the same samples the same
    assert (
        [h["eval_reward/same/mean"] for h in history]
        == [h["reward/mean"] for h in history]
        == [h["reward/mean"] for h in plain]
    )
    assert all(
        h["eval_reward/left/mean"] < h["eval_reward/same/mean"] for h in history
    )  # moons lie nearer (1.5, 1.5) than (-3, 0)
    assert (
        all(1 < h["diversity/vendi"] < 32 for h in history) and "diversity/modes_held" not in history[0]
    )  # moons: no modes
    saved = json.loads((tmp_path / "with" / "config.json").read_text())["eval_rewards"]
    assert saved == {
        "same": {"reward": "target_point", "reward_args": {"point": [1.5, 1.5]}},
        "left": {"reward": "target_point", "reward_args": {"point": [-3, 0]}},
    }
    metrics = json.loads((tmp_path / "with" / "metrics.json").read_text())
    assert metrics["eval_reward/same"] == metrics["reward_mean"]
    assert metrics["eval_reward/same_pretrained"] == metrics["reward_mean_pretrained"]
    assert metrics["eval_reward/left"] < metrics["eval_reward/same"]
    assert 1 < metrics["vendi"] < 1000 and 1 < metrics["vendi_pretrained"] < 1000


def test_early_stop_keeps_the_best_held_out_checkpoint(pretrained_moons, tmp_path, capsys):
    out = tmp_path / "run"
    history = finetune(
        pretrained_moons,
        out,
        "--epochs",
        "20",
        "--lr",
        "3e-3",
        "--reward-arg",
        "point=[3, 0]",
        "--eval-reward",
        "left=target_point",
        "--eval-reward-arg",
        "left:point=[-3, 0]",
        "--early-stop-on",
        "left",
        "--patience",
        "2",
        "--checkpoint-every",
        "100",
        "--keep-checkpoints",
        "1",
    )
    held_out = [h["eval_reward/left/mean"] for h in history]
    best = 1 + int(np.argmax(held_out))
    assert len(history) < 20 and len(history) == best + 2  # stopped two epochs after its best
    assert history[-1]["reward/mean"] > history[0]["reward/mean"]  # the proxy rose while the held-out reward fell
    assert json.loads((out / "checkpoints" / "index.json").read_text())["best_step"] == best
    kept = CheckpointManager(out).paths()
    assert [p.name for p in kept] == [f"step_{best:08d}.pt", f"step_{len(history):08d}.pt"]
    assert torch.load(kept[0], weights_only=False)["train_state"]["epoch"] == best
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == best
    assert f"early stop after epoch {len(history)}: held-out reward 'left'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--early-stop-on", "left", "--patience", "2"], "--early-stop-on 'left' names no --eval-reward"),
        (["--eval-reward", "left=target_point", "--early-stop-on", "left"], "--patience of at least 1"),
        (["--patience", "3"], "--patience applies to --early-stop-on"),
        (["--eval-reward", "target_point", "--eval-reward-arg", "point=[1, 0]"], "expects LABEL:KEY=VALUE"),
        (["--eval-reward", "target_point", "--eval-reward-arg", "lft:point=[1, 0]"], "names no --eval-reward"),
        (
            ["--algo", "sb3-ppo", "--eval-reward", "l=target_point", "--early-stop-on", "l", "--patience", "1"],
            "runs SB3's own loop",
        ),
    ],
)
def test_held_out_flag_mistakes_are_user_errors(tmp_path, capsys, args, message):
    assert main(["finetune", "--run", str(tmp_path / "none"), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
