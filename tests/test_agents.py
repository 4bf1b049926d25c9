"""Standard agents on the env: stable-baselines3's SAC with its default MultiInputPolicy steers the frozen
pretrained model."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from stable_baselines3 import SAC
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rewards import build_reward
from rl_diffusion.agent_sampling import load_agent, sample_agent
from rl_diffusion.algos.sb3 import DenoisingVecEnvAdapter
from rl_diffusion.checkpoint import CheckpointManager, load_run, read_run_config
from rl_diffusion.cli import main
from rl_diffusion.env import DenoisingVectorEnv

REWARD = dict(reward="target_point", reward_kwargs={"point": [1.5, 1.5]})  # in the gap between the two moons


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def mean_reward_of_fresh_samples(run, action_mode: str, act) -> float:
    """Mean reward of 1,000 new chains (seed 123) driven by act(observation) -> actions."""
    vec = DenoisingVectorEnv(
        run,
        **REWARD,
        sampling_steps=5,
        sampler="ddim" if action_mode == "residual" else None,
        num_envs=1000,
        action_mode=action_mode,
    )
    obs, _ = vec.reset(seed=123)
    while True:
        obs, rewards, terminated, _, _ = vec.step(act(obs))
        if terminated.all():
            return float(rewards.mean())


@pytest.mark.parametrize(
    "action_mode, timesteps, lr, gain",
    [
        # measured (seeds 0 and 1): -1.92 -> -1.20 and -0.93 in 6 s
        ("residual", 2000, 3e-3, 0.4),
        # measured (seeds 0 and 1): -2.04 -> -0.34 and -0.43 in 3.5 s
        ("noise", 1000, 1e-3, 1.0),
    ],
)
def test_sac_with_the_default_policy_raises_the_pretrained_models_reward(
    pretrained_moons, action_mode, timesteps, lr, gain
):
    env = DenoisingVectorEnv(
        pretrained_moons,
        **REWARD,
        sampling_steps=5,
        sampler="ddim" if action_mode == "residual" else None,
        num_envs=16,
        action_mode=action_mode,
    )
    model = SAC("MultiInputPolicy", DenoisingVecEnvAdapter(env), learning_rate=lr, gradient_steps=4, seed=0)
    model.learn(timesteps)
    # the pretrained sampler: zero residuals, or the x_T it offers
    before = mean_reward_of_fresh_samples(
        pretrained_moons, action_mode, lambda obs: np.zeros_like(obs["x"]) if action_mode == "residual" else obs["x"]
    )
    after = mean_reward_of_fresh_samples(
        pretrained_moons, action_mode, lambda obs: model.predict(obs, deterministic=True)[0]
    )
    assert after > before + gain


def finetune_agent(pretrained, out, *flags) -> int:
    return main(
        [
            "finetune",
            "--run",
            str(pretrained),
            "--out",
            str(out),
            "--reward",
            "target_point",
            "--reward-arg",
            "point=[1.5,1.5]",
            "--sampler",
            "ddim",
            "--sampling-steps",
            "5",
            "--chains",
            "8",
            "--quiet",
            *flags,
        ]
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--algo", "sb3-sac", "--action-mode", "sample"], "unknown --action-mode 'sample' for --algo sb3-sac"),
        (["--algo", "sb3-td3", "--action-mode", "noise", "--kl-coef", "0.1"], "residual has and noise does not"),
        (["--algo", "ddpo-is", "--action-mode", "noise"], "--action-mode applies to sb3-sac"),
        (["--algo", "sb3-a2c", "--timestep-fraction", "0.5"], "does not support --timestep-fraction"),
        (["--algo", "sb3-ppo", "--null-label"], "does not support --null-label"),
    ],
)
def test_bad_agent_combinations_end_in_one_error_line(pretrained_moons, tmp_path, capsys, flags, message):
    assert finetune_agent(pretrained_moons, tmp_path / "run", *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()


def agent_weights(run, checkpoint: int = -1) -> dict[str, torch.Tensor]:
    """The agent's policy weights in a run's checkpoint (default: the newest)."""
    state = torch.load(CheckpointManager(run).paths()[checkpoint], weights_only=False)["train_state"]
    return load_agent(read_run_config(run)["algo"], state["agent"], None, torch.device("cpu")).policy.state_dict()


@pytest.mark.parametrize("algo, mode", [("sb3-sac", "residual"), ("sb3-ppo-mlp", "noise")])
def test_an_agent_run_logs_checkpoints_resumes_and_samples_with_the_agent(
    pretrained_moons, tmp_path, monkeypatch, capsys, algo, mode
):
    flags = [
        "--algo",
        algo,
        "--action-mode",
        mode,
        "--epochs",
        "4",
        "--checkpoint-every",
        "3",
        "--lr",
        "3e-3",
        "--seed",
        "1",
    ]
    assert finetune_agent(pretrained_moons, tmp_path / "straight", *flags) == 0
    # the run's evaluation is of the agent's sampler (5,000 samples, seed 0), not of the pretrained one
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    x0, _, kl = sample_agent(tmp_path / "straight", 5000, 0, torch.device("cpu"))
    reward = build_reward("target_point", {"point": [1.5, 1.5]})
    assert metrics["reward_mean"] == pytest.approx(reward(x0).mean().item(), rel=1e-5)
    assert metrics["kl_to_pretrained"] == (None if mode == "noise" else pytest.approx(kl.mean().item(), rel=1e-5))
    monkeypatch.setattr(
        "rl_diffusion.algos.sb3.finish_run", lambda run: run.writer.close() or {}
    )  # the runs below need no evaluation

    calls = []
    step_tensor = DenoisingVectorEnv.step_tensor

    def interrupt_in_epoch_3(self, action):
        calls.append(1)
        if len(calls) == (13 if mode == "residual" else 3):  # inside the third episode
            os.kill(os.getpid(), signal.SIGINT)
        return step_tensor(self, action)

    monkeypatch.setattr(DenoisingVectorEnv, "step_tensor", interrupt_in_epoch_3)
    assert finetune_agent(pretrained_moons, tmp_path / "stopped", *flags) == 2
    assert "after epoch 2; checkpoint saved" in capsys.readouterr().err
    monkeypatch.setattr(DenoisingVectorEnv, "step_tensor", step_tensor)
    assert main(["finetune", "--resume", str(tmp_path / "stopped"), "--quiet"]) == 0

    straight, resumed = agent_weights(tmp_path / "straight"), agent_weights(tmp_path / "stopped")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    earlier = agent_weights(tmp_path / "straight", checkpoint=0)
    assert not all(torch.equal(straight[k], earlier[k]) for k in straight)  # the agent did train between checkpoints
    events = EventAccumulator(str(tmp_path / "straight"))
    events.Reload()
    assert {"reward/mean", "kl/to_pretrained", "env/clipped_fraction"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("reward/mean")) == 4

    capsys.readouterr()
    out = tmp_path / "samples.npy"
    assert main(["sample", "--run", str(tmp_path / "straight"), "--num-samples", "50", "--out", str(out)]) == 0
    samples = torch.from_numpy(np.load(out))
    x0, _, _ = sample_agent(tmp_path / "straight", 50, 0, torch.device("cpu"))
    torch.testing.assert_close(samples, x0)  # the agent's sampler, not the pretrained one
    pretrained = load_run(pretrained_moons)
    before = pretrained.diffusion.sample(
        pretrained.model,
        (50, 2),
        sampler="ddim",
        sampling_steps=5,
        eta=0.0 if mode == "noise" else 1.0,
        generator=torch.Generator().manual_seed(0),
    ).xs[-1]
    assert not torch.equal(x0, before)
