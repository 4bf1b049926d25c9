"""--precision: the network's forward under autocast, the log-probs, ratios and KL in float32.

Mirrors tests/test_ddpo.py's ratio test in bf16: the actions a batch recorded while sampling, rescored by
the same network before any update, give ratios within RATIO_TOLERANCE of 1 (measured on CPUs: exactly 1,
bf16 and fp16 alike, since a row's forward does not depend on the batch it is in), and the recorded
log-probs are the float32 Gaussian log-densities of the recorded means (a bf16 sum would be off by ~1e-2).
"""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.train import PretrainConfig, optimizer_step, start_run
from rl_diffusion.algos.base import Algorithm
from rl_diffusion.errors import UserError
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.path_kl import path_kls, policy_step
from rl_diffusion.run import setup

RATIO_TOLERANCE = 1e-3  # |pi / pi_old - 1| before the first update; PPO's clip range is 0.2


def sampled(pretrained, tmp_path, precision: str):
    cfg = FinetuneConfig(
        run=str(pretrained),
        reward="target_point",
        reward_args={"point": [1.5, 1.5]},
        chains=32,
        minibatch_size=100,
        precision=precision,
    )
    run = setup(cfg, tmp_path / precision, overwrite=True)
    pairs, x0, _ = Algorithm(run).sample(torch.Generator().manual_seed(0))
    return run, pairs, x0


def test_bf16_ratio_is_one_and_log_probs_are_float32_before_the_first_update(pretrained_moons, tmp_path):
    run, pairs, x0 = sampled(pretrained_moons, tmp_path, "bf16")
    _, _, x0_fp32 = sampled(pretrained_moons, tmp_path, "fp32")
    assert 1e-4 < (x0 - x0_fp32).abs().max() < 0.1  # the network did run in bf16 (measured: 0.016)
    idx = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1))[:100]
    with torch.no_grad():
        new = policy_step(run.diffusion, run.config, run.policy, pairs, idx)
    assert new.log_prob.dtype == pairs.log_prob_old.dtype == torch.float32
    ratio = torch.exp(new.log_prob - pairs.log_prob_old[idx])
    print(f"bf16: max |ratio - 1| {(ratio - 1).abs().max().item():.3g}")
    assert (ratio - 1).abs().max() <= RATIO_TOLERANCE
    # the recorded log-probs are log N(x_prev; mean, sigma^2 I) of the recorded means, summed in float32
    sigma = new.sigma[0].double()
    squared = ((pairs.x_prev.double() - pairs.mean_old.double()) ** 2).sum(1)
    exact = -squared / (2 * sigma**2) - 2 * (sigma.log() + 0.5 * math.log(2 * math.pi))
    rows = pairs.t == pairs.t[idx[0]]  # one timestep: one sigma
    torch.testing.assert_close(pairs.log_prob_old[rows].double(), exact[rows], rtol=1e-6, atol=1e-5)
    assert path_kls(run.diffusion, run.config, run.policy, run.reference, pairs, 20).abs().max().item() == 0.0


def test_bf16_pretraining_keeps_float32_weights_and_a_close_loss(tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        config = PretrainConfig(dataset="moons", steps=3, batch_size=64, hidden_size=32, precision=precision)
        run = start_run(config, tmp_path / precision, overwrite=False, resume=False)
        losses[precision] = [optimizer_step(run)[0].item() for _ in range(3)]
        assert all(p.dtype == torch.float32 for p in run.model.parameters())
    print(f"pretraining losses: {losses}")
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-3)  # measured: 3e-4


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"precision": "fp8"}, "unknown --precision 'fp8'"),
        ({"precision": "bf16", "algo": "sb3-sac"}, "--precision applies to the native algorithms"),
    ],
)
def test_bad_precision_settings_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        FinetuneConfig(run="r", **fields).validate()
