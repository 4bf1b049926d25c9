"""Flow matching (docs/design.md, section 10) against closed forms: Gaussian data N(m, s^2 I) has the exact velocity
v*(x, t) = -m + (t - (1 - t) s^2) / V_t (x - (1 - t) m), V_t = (1 - t)^2 s^2 + t^2, which stands in for the network;
and a tiny flow run through the CLI."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.datasets import sample_2d
from rl_diffusion.checkpoint import CheckpointManager, load_run
from rl_diffusion.cli import main
from rl_diffusion.diffusion import GaussianDiffusion, gaussian_log_prob
from rl_diffusion.errors import UserError
from rl_diffusion.finetune import config_for
from rl_diffusion.flow import FlowMatching
from rl_diffusion.metrics import gaussian_fit, sample_quality
from rl_diffusion.processes import is_memoryless
from tests.conftest import TINY_PRETRAIN

M, S = torch.tensor([0.7, -1.2]), 0.5  # the data: N(M, S^2 I) in 2D


class ExactVelocity(torch.nn.Module):
    """v*(x, t) = E[eps - x_0 | x_t = x] of the Gaussian data, at t = k / T."""

    def __init__(self, T: int, shift: float = 0.0):
        super().__init__()
        self.T, self.shift = T, shift

    def forward(self, x, k, c=None):
        t = (k.double() / self.T).reshape(-1, 1)
        variance = (1 - t) ** 2 * S**2 + t**2
        v = -M + (t - (1 - t) * S**2) / variance * (x - (1 - t) * M)
        return (v + self.shift).float()


def samples(sampler: str, T: int, eta: float = 1.0, n: int = 20_000, seed: int = 0):
    flow = FlowMatching(T)
    return flow.sample(
        ExactVelocity(T), (n, 2), sampler=sampler, eta=eta, generator=torch.Generator().manual_seed(seed), record=True
    )


def assert_data_moments(x0: torch.Tensor) -> None:
    """Mean and variance of N(M, S^2 I) within 4 standard errors of n samples (mean: S / sqrt(n); variance:
    S^2 sqrt(2 / n))."""
    n = len(x0)
    assert torch.allclose(x0.mean(0), M, atol=4 * S / math.sqrt(n)), x0.mean(0)
    assert torch.allclose(x0.var(0), torch.full((2,), S**2), atol=4 * S**2 * math.sqrt(2 / n)), x0.var(0)


def test_euler_with_the_exact_velocity_samples_the_data():
    assert_data_moments(samples("euler", 1000).xs[-1])


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_sde_with_the_exact_velocity_samples_the_data(eta):
    assert_data_moments(samples("sde", 200, eta).xs[-1])


def test_sde_step_is_the_euler_maruyama_step_and_scores_by_its_gaussian():
    """Each step against the formula written out here: x_s = x_t - dt [v + sigma_t^2 / (2 t) (x_t + (1 - t) v)]
    + sigma_t sqrt(dt) z, sigma_t^2 = 2 eta^2 t / (1 - t); its log-prob against torch's Normal and
    gaussian_log_prob. At t = 1 the first step reads 1 - t at its landing time."""
    T, eta = 10, 0.8
    flow, x = FlowMatching(T), torch.randn(6, 2, generator=torch.Generator().manual_seed(1))
    for k, k_prev in ((7, 6), (5, 2), (T, 8)):
        t, s = k / T, k_prev / T
        variance_rate = 2 * eta**2 * t / (1 - (s if k == T else t))
        v = ExactVelocity(T)(x, torch.full((6,), k))
        step = flow.reverse_step(v, x, k, t_prev=k_prev, sampler="sde", eta=eta)
        mean = x - (t - s) * (v + variance_rate / (2 * t) * (x + (1 - t) * v))
        sigma = math.sqrt(variance_rate * (t - s))
        torch.testing.assert_close(step.mean, mean)
        torch.testing.assert_close(step.sigma, torch.full((6,), sigma))
        density = torch.distributions.Normal(step.mean, sigma).log_prob(step.x_prev).sum(1)
        torch.testing.assert_close(step.log_prob, density)
        torch.testing.assert_close(step.log_prob, gaussian_log_prob(step.x_prev, step.mean, step.sigma))


def test_euler_is_deterministic_and_has_no_log_prob():
    T = 10
    flow, x = FlowMatching(T), torch.randn(4, 2)
    v = ExactVelocity(T)(x, torch.full((4,), 6))
    step = flow.reverse_step(v, x, 6, t_prev=3, sampler="euler")
    torch.testing.assert_close(step.x_prev, x - 0.3 * v)
    assert step.log_prob is None and torch.equal(step.sigma, torch.zeros(4))
    assert samples("euler", T, n=8).log_probs is None


def test_training_loss_at_the_exact_velocity_is_the_irreducible_value():
    """E ||eps - x_0 - v*||^2 / D = E_t Var(eps - x_0 | x_t) = E_t S^2 / V_t, with t uniform on {1/T, ..., 1}; a
    velocity off by delta in every coordinate pays delta^2 more."""
    T, n = 20, 200_000
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    irreducible = (S**2 / ((1 - t) ** 2 * S**2 + t**2)).mean().item()
    flow, x0 = FlowMatching(T), M + S * torch.randn(n, 2, generator=torch.Generator().manual_seed(2))
    exact, off = (
        flow.training_loss(ExactVelocity(T, shift), x0, generator=torch.Generator().manual_seed(3)).item()
        for shift in (0.0, 0.1)
    )
    assert exact == pytest.approx(irreducible, rel=0.01)
    assert off - exact == pytest.approx(0.1**2, rel=0.1)


def memory(sampler: str, eta: float = 1.0) -> float:
    """The slope of E[x_0 | x_T] on x_T over 20,000 exact chains of T = 100 steps, per coordinate (0: x_0 forgot
    its starting noise)."""
    traj = samples(sampler, 100, eta)
    x_T, x0 = traj.xs[0], traj.xs[-1]
    cov = ((x_T - x_T.mean(0)) * (x0 - x0.mean(0))).mean(0)
    return (cov / x_T.var(0)).abs().max().item()


def test_is_memoryless_answers_what_the_chains_remember():
    """Euler keeps x_T (slope S); the sde with eta = 1 (the memoryless schedule) and 1.5 forgets it (within
    sampling error, 0.007 per coordinate); eta = 0.5 keeps a slope of about 0.08 (T^(-eta^2))."""
    assert not is_memoryless("euler", 1.0) and memory("euler") > 0.45
    assert not is_memoryless("sde", 0.5) and memory("sde", 0.5) > 0.05
    for eta in (1.0, 1.5):
        assert is_memoryless("sde", eta) and memory("sde", eta) < 0.03


def test_timesteps_are_evenly_spaced_in_t():
    flow = FlowMatching(20)
    assert flow.timesteps("sde", 4) == [20, 15, 10, 5]
    assert flow.timesteps("euler") == list(range(20, 0, -1))
    assert flow.timesteps("euler", 1) == [20]
    with pytest.raises(UserError, match="--sampling-steps must be between 1 and 20"):
        flow.timesteps("euler", 21)


def test_clipped_x0_sets_the_velocity():
    """Where x_t - t v leaves the range, the step moves towards the clipped x_0: v = (x_t - x0_clipped) / t."""
    flow = FlowMatching(10, x0_range=(-1.0, 1.0))
    x, v = torch.tensor([[0.5, 0.5]]), torch.tensor([[-10.0, 0.2]])  # x_0 = x - 0.5 v = (5.5, 0.4)
    step = flow.reverse_step(v, x, 5, sampler="euler")
    torch.testing.assert_close(step.x_prev, x - 0.1 * torch.tensor([[(0.5 - 1.0) / 0.5, 0.2]]))


@pytest.mark.parametrize(
    ("process", "sampler", "eta", "message"),
    [
        (FlowMatching(10), "ddpm", 1.0, "unknown sampler 'ddpm' for a flow run; choose one of euler, sde"),
        (FlowMatching(10), "ddim", 1.0, "unknown sampler 'ddim' for a flow run"),
        (GaussianDiffusion(num_timesteps=10), "sde", 1.0, "unknown sampler 'sde' for a ddpm run; choose one of ddpm"),
        (FlowMatching(10), "sde", -0.5, "--eta must be a finite number >= 0"),
    ],
)
def test_a_sampler_of_the_other_process_is_refused(process, sampler, eta, message):
    x = torch.zeros(2, 2)
    with pytest.raises(UserError, match=message):
        process.reverse_step(x, x, 5, sampler=sampler, eta=eta)


TINY_FLOW = [  # the tests' tiny moons run (tests/conftest.py) as a flow, shorter, checkpointed every 200 steps
    *TINY_PRETRAIN,
    *("--model-type", "flow", "--steps", "600", "--batch-size", "256"),
    *("--eval-every", "200", "--eval-samples", "300", "--checkpoint-every", "200", "--final-samples", "1000"),
]


@pytest.fixture(scope="module")
def flow_moons(tmp_path_factory) -> Path:
    """A small flow run on moons (T = 20), trained through the real CLI."""
    out = tmp_path_factory.mktemp("runs") / "flow_moons"
    assert main(["pretrain", "--out", str(out), *TINY_FLOW]) == 0
    return out


def test_flow_pretraining_through_the_cli_resumes_bit_identical_and_samples(flow_moons, tmp_path, capsys):
    """A flow run on moons beats a Gaussian fit; a copy that lost its last checkpoint resumes from step 400 to the
    same weights; `sample` draws with either flow sampler and refuses a DDPM one."""
    full, cut = flow_moons, tmp_path / "cut"
    shutil.copytree(full, cut)
    CheckpointManager(cut).paths()[-1].unlink()
    assert main(["pretrain", "--resume", str(cut)]) == 0
    ckpt, resumed = CheckpointManager(full).load_latest(), CheckpointManager(cut).load_latest()
    for a, b in ((ckpt["model"], resumed["model"]), (ckpt["train_state"]["model"], resumed["train_state"]["model"])):
        assert all(torch.equal(a[name], b[name]) for name in a)

    assert json.loads((full / "config.json").read_text())["model_type"] == "flow"
    assert ckpt["diffusion_config"]["model_type"] == "flow"
    run = load_run(full)
    assert isinstance(run.diffusion, FlowMatching) and run.diffusion.x0_range is not None
    metrics = json.loads((full / "metrics.json").read_text())  # Euler over all 20 steps
    n = metrics["num_samples"]
    data, again = sample_2d("moons", n, 12345), sample_2d("moons", n, 12346)
    baseline = sample_quality(gaussian_fit(data, n, seed=0), data, again)
    for name in ("sw2", "mmd"):
        assert metrics[name] < 0.75 * baseline[name], (name, metrics[name], baseline[name])

    for sampler in ("euler", "sde"):
        out = tmp_path / f"{sampler}.npy"
        assert main(["sample", "--run", str(full), "--out", str(out), "--num-samples", "50", "--sampler", sampler]) == 0
        drawn = np.load(out)
        assert drawn.shape == (50, 2) and np.isfinite(drawn).all()
    capsys.readouterr()
    assert main(["sample", "--run", str(full), "--out", str(tmp_path / "x.npy"), "--sampler", "ddpm"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown sampler 'ddpm' for a flow run; choose one of euler, sde"


def test_ddpo_is_on_the_sde_of_a_flow_run_raises_the_reward(flow_moons, tmp_path, capsys):
    """finetune on a flow run takes its memoryless sde by default and climbs the reward as on a DDPM; the ODE,
    which has no log-prob, and a DDPM sampler are refused before anything is written."""
    args = ["--run", str(flow_moons), "--reward", "target_point", "--reward-arg", "point=[1,1]", "--quiet"]
    out = tmp_path / "ddpo"
    assert main(["finetune", "--out", str(out), *args, "--chains", "64", "--epochs", "8", "--eval-samples", "500"]) == 0
    config, metrics = (json.loads((out / name).read_text()) for name in ("config.json", "metrics.json"))
    assert (config["sampler"], config["eta"], metrics["memoryless"]) == ("sde", 1.0, True)
    assert metrics["reward_mean"] > metrics["reward_mean_pretrained"] + 0.5, metrics  # measured: -2.12 to -0.93
    assert 0 < metrics["kl_to_pretrained"] < 20
    capsys.readouterr()
    for name, flags, message in (
        ("euler", ["--sampler", "euler"], "--sampler euler is deterministic: --algo ddpo-is scores actions on a"),
        ("ddpm", ["--sampler", "ddpm"], "unknown sampler 'ddpm' for a flow run; choose one of euler, sde"),
    ):
        assert main(["finetune", "--out", str(tmp_path / name), *args, *flags]) == 2
        assert capsys.readouterr().err.strip().startswith(f"error: {message}")
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("algo", ["ddpo-sf", "flow-grpo", "rwr", "awm", "nft", "adjoint", "rtb", "draft", "iw-distill"])
def test_every_native_algorithm_runs_on_a_flow_run_unchanged(algo, flow_moons, tmp_path):
    """The other native algorithms take a flow run as they take a DDPM's: its sde by default, an exact path KL to
    the pretrained flow, rewards and losses finite, nothing to change on the user's side."""
    out = tmp_path / algo
    args = ["finetune", "--run", str(flow_moons), "--out", str(out), "--algo", algo, "--reward", "target_point"]
    args += ["--reward-arg", "point=[1,1]", "--chains", "32", "--epochs", "2", "--no-final-eval", "--quiet"]
    small = {"iw-distill": ["--pool-size", "64", "--distill-steps", "5", "--minibatch-size", "32"]}
    assert main([*args, *small.get(algo, [])]) == 0
    config = json.loads((out / "config.json").read_text())
    history = CheckpointManager(out).load_latest()["train_state"]["history"]
    assert (config["sampler"], config["eta"], len(history)) == ("sde", 1.0, 2)
    for epoch in history:
        assert math.isfinite(epoch["loss/policy"]) and math.isfinite(epoch["reward/mean"])
        assert 0 <= epoch["kl/to_pretrained"] < 50
    assert history[0]["kl/to_pretrained"] == pytest.approx(0.0, abs=1e-4)  # the first chains are the pretrained flow's


@pytest.mark.filterwarnings("ignore:.*symmetric and normalized.*", "ignore:.*infinity.*")
def test_the_env_and_stable_baselines3_take_a_flow_run(flow_moons, tmp_path):
    """The env runs a flow run's sde by default (its Euler ODE in noise mode) and passes the checkers in every
    action mode; SB3's diffusion policy scores its actions by the sde's reverse step, sb3-ppo trains on it, and
    an agent steers the ODE's x_T in noise mode."""
    from stable_baselines3.common.env_checker import check_env

    from rl_diffusion.algos.sb3 import make_ppo
    from rl_diffusion.env import ACTION_MODES, DenoisingEnv
    from tests.test_sb3 import make_setup

    for mode in ACTION_MODES:
        env = DenoisingEnv(run=flow_moons, reward_kwargs={"point": [1.0, 1.0]}, action_mode=mode)
        assert (env.chains.sampler, env.chains.eta) == (("euler", 0.0) if mode == "noise" else ("sde", 1.0))
        check_env(env)
    with pytest.raises(UserError, match="deterministic euler sampler"):
        DenoisingEnv(run=flow_moons, action_mode="noise", sampler="sde")

    run = make_setup(flow_moons, tmp_path / "ppo", sampler="sde", sampling_steps=5, eta=1.0, chains=8, epochs=1)
    policy, env = make_ppo(run).policy, make_ppo(run).env.env
    t = torch.tensor(env.timesteps).repeat_interleave(4)
    t_prev = torch.tensor(env.prev_timesteps).repeat_interleave(4)
    g = torch.Generator().manual_seed(0)
    x, actions = torch.randn(len(t), 2, generator=g), torch.randn(len(t), 2, generator=g)
    with torch.no_grad():
        expected = run.diffusion.reverse_step(run.policy(x, t), x, t, t_prev=t_prev, sampler="sde", x_prev=actions)
        _, log_prob, _ = policy.evaluate_actions({"x": x, "t": t[:, None]}, actions)
    assert isinstance(run.diffusion, FlowMatching) and torch.isfinite(expected.log_prob).all()
    torch.testing.assert_close(log_prob, expected.log_prob)

    out = tmp_path / "cli"
    args = ["finetune", "--run", str(flow_moons), "--out", str(out), "--algo", "sb3-ppo", "--reward", "target_point"]
    assert main([*args, "--reward-arg", "point=[1,1]", "--chains", "16", "--epochs", "2", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["sampler"] == "sde"
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["kl_to_pretrained"])

    noise = ["--algo", "sb3-ppo-mlp", "--action-mode", "noise"]
    config = config_for({"run": str(flow_moons), "algo": "sb3-ppo-mlp", "action_mode": "noise"})
    assert config.sampling == {"sampler": "euler", "sampling_steps": None, "eta": 0.0}  # DDIM on a DDPM run
    out = tmp_path / "noise"
    args = ["finetune", "--run", str(flow_moons), "--out", str(out), *noise, "--reward", "target_point", "--quiet"]
    assert main([*args, "--reward-arg", "point=[1,1]", "--chains", "8", "--sampling-steps", "5", "--epochs", "2"]) == 0
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["reward_mean"])
