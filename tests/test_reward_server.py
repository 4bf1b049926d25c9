"""Rewards served from another process (rewards/remote.py): same scores as in-process, bounded retries and
timeouts, failures that are never scored 0, and a reward fingerprint that guards --resume.

Every server listens on 127.0.0.1 port 0, runs in a thread (or one subprocess) and is stopped by the test;
every wait is bounded.
"""

import json
import os
import select
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch

import rewards
from rewards import ServedRewardError, build_reward
from rewards.remote import RewardServer, _Handler, decode_batch, encode_batch, reward_info
from rl_diffusion.checkpoint import CheckpointManager
from rl_diffusion.cli import main
from rl_diffusion.config import saved_config
from rl_diffusion.finetune import FinetuneConfig
from rl_diffusion.run import check_reward_unchanged

HANG_SECONDS = 10.0  # a hanging handler gives up after this, so no thread outlives the test by much
FAST_CLIENT = ["--reward-arg", "timeout=0.3", "--reward-arg", "retries=1", "--reward-arg", "backoff=0.05"]
TINY_RUN = [
    "--chains",
    "16",
    "--epochs",
    "2",
    "--quiet",
    "--checkpoint-every",
    "1",
    "--no-final-eval",
    "--reward-arg",
    "batch=8",
]


@contextmanager
def serving(reward=None, handler=None, score=None, **kwargs):
    """A RewardServer in a thread for the with-block (in_region by default, scored by `score` if given: an
    unchecked function); shut down and closed after."""
    reward = reward or build_reward("in_region", skip_nonfinite=True)
    cls = RewardServer if handler is None else type("TestServer", (RewardServer,), {"handler": handler})
    server = cls(score or reward, reward_info(reward), "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release = True
        server.shutdown()
        server.server_close()
        thread.join(5)


def failing(requests) -> type:
    """A handler that answers POST /score number n (1-based) with HTTP 503 when n is in `requests`."""

    class Failing(_Handler):
        def do_POST(self):
            self.server.posts = getattr(self.server, "posts", 0) + 1
            if self.server.posts in requests:
                self.rfile.read(int(self.headers["Content-Length"]))
                self._error(503, "busy")
                return
            super().do_POST()

    return Failing


def hanging(requests) -> type:
    """A handler that never answers POST /score number n when n is in `requests` (until the test ends)."""

    class Hanging(_Handler):
        def do_POST(self):
            self.server.posts = getattr(self.server, "posts", 0) + 1
            if self.server.posts in requests:
                deadline = time.monotonic() + HANG_SECONDS
                while not getattr(self.server, "release", False) and time.monotonic() < deadline:
                    time.sleep(0.02)
                self.close_connection = True
                return
            super().do_POST()

    return Hanging


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_the_wire_format_round_trips_batches_with_and_without_labels():
    x, c = torch.randn(5, 1, 3, 3), torch.tensor([0, 9, 2, 3, 4])
    y, d = decode_batch(encode_batch(x, c))
    assert torch.equal(x, y) and torch.equal(c, d)
    y, d = decode_batch(encode_batch(x[:, 0, 0], None))
    assert torch.equal(x[:, 0, 0], y) and d is None
    with pytest.raises(ValueError, match="takes"):
        decode_batch(encode_batch(x, c)[:-1])


def test_a_served_reward_scores_exactly_like_the_in_process_one():
    local = build_reward("in_region", {"shape": "disc", "center": [0.5, 0.0], "radius": 0.7})
    x = torch.randn(300, 2)
    with serving(local) as server:
        served = build_reward(server.url, {"batch": 64})  # 5 chunks
        assert torch.equal(served(x), local(x))
        assert served(x[:1]).shape == (1,)
        assert served.fingerprint == local.fingerprint == json.loads(json.dumps(local.fingerprint))
        assert local.fingerprint["name"] == "in_region" and len(local.fingerprint["source_sha256"]) == 64
        assert served.max_value == local.max_value == 1.0
        assert not served.differentiable and served.missing == 0
        assert server.batches == 6


def test_a_served_reward_can_be_a_term_of_a_weighted_sum():
    local = build_reward("in_region", {"radius": 0.5})
    x = torch.randn(50, 2)
    with serving(local) as server:
        total = build_reward(f"0.5*far={server.url}+0.5*target_point", {"far:batch": 16})
        torch.testing.assert_close(total(x), 0.5 * local(x) + 0.5 * build_reward("target_point")(x))
        assert total.fingerprint["components"]["far"]["arguments"] == {"radius": 0.5}


def test_labels_travel_with_the_batch():
    seen = []

    def score(x0, c):
        seen.append(c.clone())
        return x0.sum(1) + c

    with serving(rewards.Reward("sum", score)) as server:
        c = torch.arange(10)
        x = torch.randn(10, 2)
        assert torch.allclose(build_reward(server.url, {"batch": 4})(x, c), x.sum(1) + c)
        assert torch.equal(torch.cat(seen), c)


def test_a_server_that_fails_every_other_batch_still_gives_every_score():
    local = build_reward("target_point", {"point": [1.0, -1.0]})
    x = torch.randn(40, 2)
    with serving(local, failing(range(1, 100, 2))) as server:
        served = build_reward(server.url, {"batch": 10, "retries": 1, "backoff": 0.01})
        assert torch.equal(served(x), local(x))
        assert server.posts == 8 and server.batches == 4  # each chunk failed once, then scored


def test_a_connection_the_server_closed_while_idle_is_reopened_without_using_a_try():
    class Impatient(_Handler):
        timeout = 0.1  # closes a keep-alive connection idle this long

    local = build_reward("in_region")
    x = torch.randn(8, 2)
    with serving(local, Impatient) as server:
        served = build_reward(server.url, {"retries": 0})
        for _ in range(3):
            assert torch.equal(served(x), local(x))
            time.sleep(0.3)


def test_a_hanging_server_is_given_up_on_in_bounded_time():
    x = torch.randn(16, 2)
    with serving(handler=hanging(range(1, 100))) as server:
        stop = build_reward(server.url, {"timeout": 0.3, "retries": 1, "backoff": 0.05})
        started = time.monotonic()
        with pytest.raises(ServedRewardError, match=f"{server.url}.*no answer within.*timeout=0.3 s \\(2 tries\\)"):
            stop(x)
        assert time.monotonic() - started < 3
        skip = build_reward(server.url, {"timeout": 0.3, "retries": 0, "batch": 8}, on_failure="skip")
        r = skip(x)
        assert torch.isnan(r).all() and skip.missing == 16  # missing, never 0


def test_a_server_returning_the_wrong_shape_is_a_reward_error_naming_it():
    with serving(score=lambda x0, c: x0[:-1, 0]) as server:
        for on_failure in ("stop", "skip"):  # a wrong answer is not a missing one
            served = build_reward(server.url, on_failure=on_failure)
            with pytest.raises(ServedRewardError, match=f"reward server {server.url} returned 12 bytes.*wrong shape"):
                served(torch.randn(4, 2))


def test_a_reward_that_raises_on_the_server_is_a_reward_error_at_once(capsys):
    with serving() as server:  # in_region is a 2D reward: images are refused
        served = build_reward(server.url, {"retries": 3, "backoff": 5.0}, on_failure="skip")
        with pytest.raises(ServedRewardError, match="HTTP 422.*2D points"):
            served(torch.zeros(2, 1, 8, 8))
        assert server.batches == 1  # not retried
    assert main(["finetune", "--run", "x", "--out", "y", "--reward", "in_region", "--on-reward-failure", "skip"]) == 2
    assert "applies to a served reward" in one_error_line(capsys.readouterr().err)


def test_no_server_and_bad_client_arguments_are_one_line_errors(capsys, tmp_path, pretrained_moons):
    with serving() as server:
        url = server.url
        for arg, message in (("timeout=0", "timeout=0 is out of range"), ("colour=1", "unknown argument")):
            args = ["finetune", "--run", str(pretrained_moons), "--out", str(tmp_path / "a"), "--reward", url]
            assert main([*args, "--reward-arg", arg]) == 2
            assert message in one_error_line(capsys.readouterr().err)
    args = ["finetune", "--run", str(pretrained_moons), "--out", str(tmp_path / "b"), "--reward", url, *FAST_CLIENT]
    assert main(args) == 2
    assert f"no reward server answered at {url}" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "b").exists()  # refused before anything is written


def test_serve_reward_command_serves_and_stops_by_itself_after_max_batches():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rl_diffusion.cli", "serve-reward", "gaussian_bump", "--reward-arg", "width=0.3"]
    proc = subprocess.Popen(
        [*cmd, "--port", "0", "--max-batches", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "serve-reward printed nothing within 60 s"
        line = proc.stdout.readline()
        url = line.split(" on ")[1].split()[0]
        local = build_reward("gaussian_bump", {"width": 0.3})
        served = build_reward(url)
        x = torch.randn(100, 2)
        assert torch.equal(served(x), local(x)) and torch.equal(served(x[:3]), local(x[:3]))
        assert served.fingerprint == local.fingerprint
        assert proc.wait(timeout=30) == 0
        assert "stopped after 2 batch(es)" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def run_args(pretrained, out, url, *extra):
    return ["finetune", "--run", str(pretrained), "--out", str(out), "--reward", url, *FAST_CLIENT, *TINY_RUN, *extra]


def test_a_hanging_server_stops_the_run_with_one_error_and_keeps_its_checkpoints(capsys, tmp_path, pretrained_moons):
    out = tmp_path / "run"
    # POSTs: 1 = setup's probe, 2-3 = epoch 1 (two chunks of 8), 4-5 = epoch 2, 6-7 = epoch 3: hangs
    with serving(handler=hanging(range(6, 100))) as server:
        assert main(run_args(pretrained_moons, out, server.url, "--epochs", "3")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"reward server {server.url} failed to score 8 sample(s)" in line
    assert "stopped at epoch 3" in line and str(out) in line
    state = CheckpointManager(out).load_latest()["train_state"]
    assert state["epoch"] == 2 and [h["reward/missing"] for h in state["history"]] == [0.0, 0.0]


def test_a_hanging_server_with_skip_drops_those_chains_and_logs_them(tmp_path, pretrained_moons):
    out = tmp_path / "run"
    local = build_reward("in_region")
    # POST 4 (epoch 2's first chunk) and its one retry hang; everything after answers, evaluation included
    with serving(local, hanging({4, 5})) as server:
        assert main(run_args(pretrained_moons, out, server.url, "--on-reward-failure", "skip")) == 0
    history = CheckpointManager(out).load_latest()["train_state"]["history"]
    assert [h["reward/missing"] for h in history] == [0.0, 8.0]
    assert [h["reward/nonfinite"] for h in history] == [0.0, 8.0]
    assert (out / "metrics.json").exists()
    assert json.loads((out / "config.json").read_text())["reward_fingerprint"] == local.fingerprint


def test_resume_with_a_changed_served_reward_is_refused(capsys, tmp_path, pretrained_moons):
    out = tmp_path / "run"
    with serving(build_reward("in_region", {"radius": 0.5})) as server:
        assert main(run_args(pretrained_moons, out, server.url)) == 0
        url, port = server.url, server.server_address[1]
    CheckpointManager(out).paths()[-1].unlink()  # the run "died" after epoch 1
    changed = build_reward("in_region", {"radius": 0.8})
    server = RewardServer(changed, reward_info(changed), "127.0.0.1", port)  # the same address, another reward
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        capsys.readouterr()
        assert main(["finetune", "--resume", str(out)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"reward '{url}' changed since the run started" in line
        assert 'arguments: {"radius": 0.5} -> {"radius": 0.8}' in line
        assert CheckpointManager(out).load_latest()["train_state"]["epoch"] == 1  # nothing lost
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_resume_with_a_changed_local_reward_is_refused_and_runs_without_a_fingerprint_are_not(
    capsys, tmp_path, pretrained_moons, monkeypatch
):
    module = tmp_path / "plugin" / "fp_reward.py"
    module.parent.mkdir()
    module.write_text("def bump(width=1.0):\n    return lambda x0, c=None: -(x0**2).sum(1) / width\n")
    monkeypatch.syspath_prepend(str(module.parent))
    out = tmp_path / "run"
    args = ["finetune", "--run", str(pretrained_moons), "--out", str(out), "--reward", "fp_reward:bump"]
    assert main([*args, *TINY_RUN[:-2]]) == 0
    CheckpointManager(out).paths()[-1].unlink()
    module.write_text("def bump(width=1.0):\n    return lambda x0, c=None: -(x0**2).sum(1) / width**2\n")
    monkeypatch.delitem(sys.modules, "fp_reward")
    capsys.readouterr()
    assert main(["finetune", "--resume", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "reward 'fp_reward:bump' changed since the run started (source_sha256: " in line
    config = json.loads((out / "config.json").read_text())
    del config["reward_fingerprint"]  # a run started before fingerprints were recorded resumes as before
    (out / "config.json").write_text(json.dumps(config))
    check_reward_unchanged(out, build_reward("fp_reward:bump"))
    assert saved_config(FinetuneConfig, out).reward == "fp_reward:bump"


def test_the_env_scores_through_a_served_reward(pretrained_moons):
    from rl_diffusion.env import DenoisingVectorEnv

    local = build_reward("target_point", {"point": [0.5, 0.5]})
    with serving(local) as server:
        env = DenoisingVectorEnv(
            pretrained_moons, server.url, num_envs=4, action_mode="sample", sampler="ddim", sampling_steps=2
        )
        env.reset(seed=0)
        env.step_tensor(torch.zeros(4, 2))
        rewards, done = env.step_tensor(torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [2.0, -1.0]]))
        assert done and torch.equal(rewards, local(env.x))
