"""DiffusionNFT: the implicit policies, the adaptive weighting and the loss against hand values, the moving-average
old policy."""

import torch

from rl_diffusion.algos.nft import DiffusionNFT, adaptive_error, implicit_policies, old_decay
from rl_diffusion.diffusion import GaussianDiffusion
from tests.test_kl_objective import closed_form_setup


def test_implicit_policies_and_the_adaptive_weighting_by_hand():
    positive, negative = implicit_policies(torch.tensor([1.0]), torch.tensor([3.0]), 0.5)
    assert (positive.item(), negative.item()) == (2.0, 4.0)  # 0.5 + 1.5; 4.5 - 0.5
    # errors (1, 3): mean square 5 over mean absolute 2
    assert adaptive_error(torch.tensor([[1.0, 3.0]]), torch.zeros(1, 2)).item() == 2.5


def test_the_loss_in_x0_space_against_a_hand_computation():
    # a DDPM's eps predictions: x0(eps) = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), written out here
    run = closed_form_setup(0.0, algo="nft", algo_args={"nft_strength": 0.5})
    run.diffusion = GaussianDiffusion("linear", 10)
    nft = DiffusionNFT(run)
    g = torch.Generator().manual_seed(0)
    pred, old, x_t, x0 = (torch.randn(3, 2, generator=g) for _ in range(4))
    t, w = torch.tensor([1, 5, 10]), torch.tensor([0.9, 0.5, 0.1])
    loss = nft.matching_loss(pred, old, None, x_t, t, x0, w)
    abar = torch.tensor(run.diffusion.np["abar"], dtype=torch.float32)[t, None]
    expected = []
    for v, weight in ((0.5 * pred + 0.5 * old, w), (1.5 * old - 0.5 * pred, 1 - w)):
        error = (x_t - (1 - abar).sqrt() * v) / abar.sqrt() - x0
        expected.append(weight * error.square().mean(1) / error.abs().mean(1))
    torch.testing.assert_close(loss, (expected[0] + expected[1]) / 0.5)


def test_the_old_policy_is_a_moving_average_whose_decay_grows_to_its_cap():
    assert [old_decay(e, 0.2, 0.5) for e in range(5)] == [0.0, 0.2, 0.4, 0.5, 0.5]
    run = closed_form_setup(0.0, algo="nft", algo_args={"old_decay_rate": 0.25, "old_decay_max": 0.5})
    nft = DiffusionNFT(run)
    with torch.no_grad():
        run.policy.theta.fill_(1.0)
    nft.refresh_old()  # epoch 0: d = 0, a copy
    assert torch.equal(nft.old.theta, run.policy.theta)
    with torch.no_grad():
        run.policy.theta.fill_(3.0)
    nft.epoch = 1  # as the loop advances it after each update
    nft.refresh_old()  # epoch 1: d = 0.25: 0.25 * 1 + 0.75 * 3
    torch.testing.assert_close(nft.old.theta, torch.full_like(nft.old.theta, 2.5))
    resumed = DiffusionNFT(run)
    resumed.load_state_dict(nft.state_dict())
    assert resumed.epoch == 1 and torch.equal(resumed.old.theta, nft.old.theta)
