"""A weighted sum of rewards (rewards/weighted.py): --reward "0.7*in_region+0.3*target_point"."""

import pytest
import torch

from rewards import build_reward, fingerprint_changes
from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.cli import main
from rl_diffusion.errors import UserError


def test_a_sum_is_the_weighted_sum_of_its_components_with_their_own_arguments():
    total = build_reward("0.7*in_region + 0.3*near=target_point", {"in_region:radius": 0.5, "near:point": [1.0, 0.0]})
    region, near = build_reward("in_region", {"radius": 0.5}), build_reward("target_point", {"point": [1.0, 0.0]})
    x = torch.randn(64, 2)
    torch.testing.assert_close(total(x), 0.7 * region(x) + 0.3 * near(x))
    assert total.components.keys() == {"in_region", "near"} and torch.equal(total.components["near"], near(x))
    assert total.differentiable and total.max_value == pytest.approx(0.7 * 1.0 + 0.3 * 0.0)
    rewards, grad = total.gradient(x)
    torch.testing.assert_close(grad, 0.7 * region.gradient(x)[1] + 0.3 * near.gradient(x)[1])
    assert total.fingerprint["components"]["near"]["weight"] == 0.3
    other = build_reward("0.7*in_region + 0.3*near=target_point", {"near:point": [1.0, 0.0]})
    assert fingerprint_changes(total.fingerprint, other.fingerprint) == [
        'components.in_region.arguments: {"radius": 0.5} -> {}'
    ]
    assert build_reward("2*target_point")(x).equal(2 * build_reward("target_point")(x))


@pytest.mark.parametrize(
    "spec, kwargs, message",
    [
        ("0.5*target_point+0.5*target_point", {}, "label 'target_point' is used twice"),
        ("in_region+target_point", {"radius": 1.0}, "give each term's arguments as LABEL:KEY=VALUE"),
        ("in_region+target_point", {"region:radius": 1.0}, "names no term"),
        ("in_region+", {}, "is not [WEIGHT*][LABEL=]REWARD"),
        ("in_region+0.5*nope", {}, "unknown reward 'nope'"),
        ("in_region+target_point", {"target_point:width": 1}, "reward 'target_point' got unknown argument"),
    ],
)
def test_sum_mistakes_are_user_errors(spec, kwargs, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("*", r"\*")):
        build_reward(spec, kwargs)


def test_finetune_on_a_sum_logs_each_component(tmp_path, pretrained_moons):
    out = tmp_path / "run"
    args = ["--reward", "0.7*in_region+0.3*target_point", "--reward-arg", "target_point:point=[1,0]"]
    common = ["--chains", "16", "--epochs", "2", "--quiet", "--checkpoint-every", "1", "--no-final-eval"]
    assert main(["finetune", "--run", str(pretrained_moons), "--out", str(out), *args, *common]) == 0
    history = CheckpointManager(out).load_latest()["train_state"]["history"]
    for h in history:
        region, point = h["reward/component/in_region/mean"], h["reward/component/target_point/mean"]
        assert h["reward/mean"] == pytest.approx(0.7 * region + 0.3 * point, abs=1e-5)
