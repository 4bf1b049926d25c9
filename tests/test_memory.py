"""Minibatches sized by memory: the bytes kept for backward against a hand count, and the groups that fit."""

import pytest
import torch

from rl_diffusion import memory


def test_bytes_per_unit_counts_what_backward_keeps_per_row():
    # tanh(x W^T + b) on rows of 3 float32 features, W trainable, x not: the matrix product keeps x (3 x 4 bytes)
    # for W's gradient and tanh keeps its output (5 x 4 bytes) for its own; W is kept once whatever the batch
    # (a storage counts whole: rows are fresh tensors here, not views of one big one)
    layer = torch.nn.Linear(3, 5)
    assert memory.bytes_per_unit(lambda n: torch.tanh(layer(torch.randn(n, 3))), units=4) == 3 * 4 + 5 * 4
    with torch.no_grad():  # nothing is kept without a graph
        assert memory.saved_bytes(lambda: torch.tanh(layer(torch.randn(64, 3)))) == 0


def test_groups_are_the_fewest_that_fit():
    mib = memory.MIB
    assert memory.groups(256, 1 * mib, 1024) == 1  # everything fits: one group
    assert memory.groups(256, 1 * mib, 100) == 3  # 100 units per group at most: 256 = 86 + 85 + 85
    assert memory.groups(10, 3 * mib, 1) == 10  # a unit over the budget alone gets a group of its own
    groups = memory.split(torch.arange(256), 1 * mib, 100)
    assert [len(g) for g in groups] == [86, 85, 85] and torch.equal(torch.cat(groups), torch.arange(256))


def test_the_budget_is_what_the_process_did_not_hold_at_its_first_update():
    # --memory-mib 3000 with 1000 MiB held: 2000 MiB for the update's tensors; the measure is taken once, kept in
    # the algorithm's state, and a resumed run takes it from there instead of measuring its own process again
    from rl_diffusion.algos import algorithm
    from tests.test_kl_objective import closed_form_setup

    run = closed_form_setup(0.5, memory_mib=3000.0)
    first = algorithm("ddpo-is")(run)
    held = memory.in_use_mib(torch.device("cpu"))
    assert 50 < held < 20_000  # a process with torch loaded holds tens of MiB at least
    first.in_use_mib = 1000.0
    assert first.memory_budget() == 2000.0
    resumed = algorithm("ddpo-is")(run)
    resumed.load_state_dict(first.state_dict())
    assert resumed.memory_budget() == 2000.0
    fresh = algorithm("ddpo-is")(run)
    assert fresh.memory_budget() == pytest.approx(3000.0 - held, abs=200) and fresh.in_use_mib is not None


@pytest.mark.parametrize("algo", ["ddpo-sf", "rtb", "ddpo-is", "adjoint"])
def test_accumulated_gradients_do_not_depend_on_the_memory_budget(algo):
    # the updates that sum one gradient over many pairs split them by --memory-mib: one group, or one pair per
    # group (ddpo-is and adjoint: the pairs of each minibatch, here one minibatch of them all)
    from rl_diffusion.algos import algorithm
    from tests.test_adjoint import LinearReward
    from tests.test_kl_objective import A, D, NoStep, batch_of, closed_form_setup

    grads, calls = [], []
    for memory_mib in (1e6, 1e-12):
        run = closed_form_setup(0.5, memory_mib=memory_mib)
        if algo == "adjoint":
            run.reward = LinearReward()  # r = A . x_0 with its gradient
        forwards = []
        run.policy.register_forward_hook(lambda *_, calls=forwards: calls.append(1))
        with torch.no_grad():
            run.policy.theta.normal_(generator=torch.Generator().manual_seed(0))
            traj = run.diffusion.sample(run.policy, (16, D), generator=torch.Generator().manual_seed(1), record=True)
        update = algorithm(algo)(run)
        update.optimizer = NoStep()
        update.update(batch_of(run, traj, traj.xs[-1] @ A), torch.Generator().manual_seed(2))
        assert update.pair_bytes > 0  # measured with a graph, even when rtb's first call is under no_grad
        grads.append(run.policy.theta.grad.clone())
        calls.append(len(forwards))
    assert calls[1] > calls[0]  # the small budget did split the pairs
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
