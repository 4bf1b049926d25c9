"""--device on machines without the GPU asked for, and runs resumed on another kind of device (all on CPU)."""

import pytest
import torch

from rl_diffusion.checkpoint import CheckpointManager, atomic_save, generator_state, set_generator_state
from rl_diffusion.cli import main
from rl_diffusion.distributed import resolve_device
from tests.test_resume import TINY  # a tiny moons pretraining

CUDA_STATE = torch.arange(16, dtype=torch.uint8)  # what a CUDA generator's get_state holds: Philox seed and offset


@pytest.fixture
def one_gpu(monkeypatch):
    """torch believes it has one CUDA GPU (nothing may touch it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_gpu_index_beyond_the_machines_gpus_is_a_user_error(one_gpu, tmp_path, capsys):
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cuda") == torch.device("cuda")
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--device", "cuda:7", *TINY]) == 2
    assert "--device cuda:7: this machine has 1 GPU(s), numbered 0 to 0" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_a_user_error(monkeypatch, tmp_path, capsys, device):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--device", device, *TINY]) == 2
    assert "no CUDA GPU is available here; use --device cpu" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_generator_state_restores_exactly_on_the_same_device_and_reseeds_deterministically_on_another(capsys):
    generator = torch.Generator().manual_seed(3)
    saved = generator_state(generator)
    assert saved["device"] == "cpu"
    expected = torch.rand(5, generator=generator)
    for state in (saved, saved["state"]):  # the tagged state and a bare one, as written before the tag
        restored = torch.Generator()
        set_generator_state(restored, state)
        assert torch.equal(torch.rand(5, generator=restored), expected)
    assert capsys.readouterr().err == ""
    draws = []
    for state in ({"device": "cuda", "state": CUDA_STATE}, CUDA_STATE):  # a bare 16-byte state is a CUDA one
        restored = torch.Generator()
        set_generator_state(restored, state)
        draws.append(torch.rand(5, generator=restored))
        assert "saved on cuda and continue on cpu" in capsys.readouterr().err
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], expected)


def test_a_pretrain_run_saved_on_a_gpu_resumes_on_cpu(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--steps", "40", *TINY]) == 0
    checkpoints = CheckpointManager(run)
    checkpoints.paths()[-1].unlink()  # the run "died" after step 20, on a GPU:
    ckpt = checkpoints.load_latest()
    ckpt["train_state"]["rng"]["generator"] = {"device": "cuda", "state": CUDA_STATE}
    atomic_save(ckpt, checkpoints.paths()[-1])
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run)]) == 0
    assert capsys.readouterr().err.count("saved on cuda and continue on cpu") == 1
    final = CheckpointManager(run).load_latest()["train_state"]
    assert final["step"] == 40 and final["rng"]["generator"]["device"] == "cpu"
