"""diffusers pipelines in and out: the imported run is the pipeline's network and schedule, step for step."""

import sys

import numpy as np
import pytest
import torch

from rl_diffusion.checkpoint import CheckpointManager, load_run, prepare_run_dir
from rl_diffusion.cli import main
from rl_diffusion.diffusers_io import export_diffusers, import_diffusers
from rl_diffusion.errors import UserError
from rl_diffusion.models import build_model

diffusers = pytest.importorskip("diffusers")

T = 20
SHAPE = (4, 1, 8, 8)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A randomly initialised DDPM pipeline (eps predictions far from data, so x_0 is often clipped), on disk."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2)
    path = tmp_path_factory.mktemp("pipelines") / "ddpm"
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def imported(pipeline, tmp_path_factory):
    return import_diffusers(pipeline, tmp_path_factory.mktemp("runs") / "imported")


def load(pipeline, cls, subfolder):
    return cls.from_pretrained(pipeline, subfolder=subfolder, local_files_only=True, low_cpu_mem_usage=False)


def test_import_takes_over_the_network_and_the_schedule(pipeline, imported):
    run = load_run(imported)
    unet, scheduler = (
        load(pipeline, diffusers.UNet2DModel, "unet"),
        load(pipeline, diffusers.DDPMScheduler, "scheduler"),
    )
    x, t = torch.randn(SHAPE), torch.tensor([1, 7, 13, 20])
    with torch.no_grad():
        assert torch.equal(run.model(x, t), unet(x, t - 1).sample)  # diffusers' timestep k is our t = k + 1
    assert np.array_equal(run.diffusion.np["betas"][1:], scheduler.betas.double().numpy())
    # the same betas; diffusers multiplies them out in float32, this project in float64
    np.testing.assert_allclose(run.diffusion.np["abar"][1:], scheduler.alphas_cumprod.double().numpy(), rtol=1e-6)
    assert run.diffusion.x0_range == (-1.0, 1.0)  # clip_sample, clip_sample_range 1
    assert run.checkpoint["data"] == {"dataset": "diffusers", "shape": [1, 8, 8]}


def test_ddim_at_eta_0_gives_the_pipelines_samples(pipeline, imported):
    """Same seed, same x_T; at K = T both DDIMs visit every t (their spacings differ for K < T)."""
    run = load_run(imported)
    scheduler = diffusers.DDIMScheduler.from_config(load(pipeline, diffusers.DDPMScheduler, "scheduler").config)
    ddim = diffusers.DDIMPipeline(unet=load(pipeline, diffusers.UNet2DModel, "unet"), scheduler=scheduler)
    theirs = ddim(
        batch_size=SHAPE[0],
        generator=torch.Generator().manual_seed(0),
        eta=0.0,
        num_inference_steps=T,
        use_clipped_model_output=True,  # eps re-derived from the clipped x_0, as here
        output_type="np",
    ).images
    with torch.no_grad():
        ours = run.diffusion.sample(
            run.model, SHAPE, sampler="ddim", sampling_steps=T, eta=0.0, generator=torch.Generator().manual_seed(0)
        ).xs[-1]
    np.testing.assert_allclose((ours / 2 + 0.5).permute(0, 2, 3, 1).numpy(), theirs, atol=1e-5)


@pytest.mark.parametrize("sampling_steps", [None, 5], ids=["ddpm", "ddim-eta1-K5"])
def test_each_step_is_the_ddpm_schedulers_step(pipeline, imported, sampling_steps):
    """DDPM, and DDIM with eta = 1 on our K spaced timesteps (the DDPM posterior across each gap), against
    DDPMScheduler.step at the same timesteps with the same noise: same mean and sigma ("fixed_small"),
    clipped x_0 included; on the last step diffusers adds no noise, this project its sigma floor."""
    run = load_run(imported)
    diffusion = run.diffusion
    sampler = "ddpm" if sampling_steps is None else "ddim"
    steps = diffusion.timesteps(sampler, sampling_steps)
    scheduler = load(pipeline, diffusers.DDPMScheduler, "scheduler")
    scheduler.set_timesteps(timesteps=[t - 1 for t in steps])
    x = 2 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t, t_prev in zip(steps, [*steps[1:], 0], strict=True):
            eps = run.model(x, torch.full((SHAPE[0],), t))
            noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
            ours = diffusion.reverse_step(eps, x, t, t_prev=t_prev, sampler=sampler, noise=noise)
            theirs = scheduler.step(eps, t - 1, x, generator=torch.Generator().manual_seed(t)).prev_sample
            if t_prev > 0:
                sigma = scheduler._get_variance(t - 1).sqrt().item()
                torch.testing.assert_close(ours.sigma, torch.full((SHAPE[0],), sigma), rtol=1e-5, atol=0)
                torch.testing.assert_close(ours.x_prev, theirs, rtol=1e-5, atol=1e-5)
            else:
                torch.testing.assert_close(ours.mean, theirs, rtol=1e-5, atol=1e-5)
                floor = np.sqrt(diffusion.np["posterior_variance"][2])
                torch.testing.assert_close(ours.sigma, torch.full((SHAPE[0],), floor, dtype=torch.float32))
            x = ours.x_prev


def test_a_finetuned_import_exports_and_diffusers_samples_it(imported, tmp_path, capsys):
    tuned, out = tmp_path / "tuned", tmp_path / "exported"
    finetune = ["--reward", "brightness", "--algo", "ddpo-sf", "--epochs", "1", "--chains", "8", "--quiet"]
    finetune += ["--sampler", "ddim", "--sampling-steps", "4", "--eta", "1"]  # its final evaluation: 500 chains
    assert main(["finetune", "--run", str(imported), "--out", str(tuned), *finetune]) == 0
    assert main(["export-diffusers", "--run", str(tuned), "--out", str(out)]) == 0
    pipe = diffusers.DDPMPipeline.from_pretrained(out, local_files_only=True)
    ours, pretrained = load_run(tuned), load_run(imported)
    weights = pipe.unet.state_dict()
    assert weights.keys() == ours.model.unet.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in ours.model.unet.state_dict().items())
    assert not all(torch.equal(weights[k], v) for k, v in pretrained.model.unet.state_dict().items())
    assert np.array_equal(pipe.scheduler.betas.double().numpy(), ours.diffusion.np["betas"][1:])
    assert pipe.scheduler.config.clip_sample and pipe.scheduler.config.clip_sample_range == 1.0
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 8, 8, 1) and np.isfinite(images.images).all()


def test_sample_and_evaluate_an_imported_run(imported, tmp_path, capsys):
    out = tmp_path / "samples.npy"
    assert main(["sample", "--run", str(imported), "--num-samples", "6", "--out", str(out)]) == 0
    samples = np.load(out)
    assert samples.shape == (6, 1, 8, 8) and np.abs(samples).max() < 1.5  # clipped x_0 plus the floor's noise
    assert out.with_suffix(".png").exists()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(imported)]) == 0
    assert "without its data set" in capsys.readouterr().out


def assert_one_line_error(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_what_is_not_a_pipeline_is_refused_in_one_line(pipeline, tmp_path, capsys):
    (tmp_path / "not_a_pipeline").mkdir()
    (tmp_path / "not_a_pipeline" / "notes.txt").write_text("hello")
    out = str(tmp_path / "run")
    assert_one_line_error(capsys, ["import-diffusers", str(tmp_path / "nowhere"), "--out", out], "no directory")
    assert_one_line_error(
        capsys, ["import-diffusers", str(tmp_path / "not_a_pipeline"), "--out", out], "no model_index.json"
    )
    config = (pipeline / "scheduler" / "scheduler_config.json").read_text()
    broken = tmp_path / "euler"
    (broken / "scheduler").mkdir(parents=True)
    for name in ("model_index.json", "unet/config.json"):
        (broken / name).parent.mkdir(exist_ok=True)
        (broken / name).write_text((pipeline / name).read_text())
    (broken / "scheduler" / "scheduler_config.json").write_text(
        config.replace("DDPMScheduler", "EulerDiscreteScheduler")
    )
    assert_one_line_error(capsys, ["import-diffusers", str(broken), "--out", out], "EulerDiscreteScheduler")
    assert not (tmp_path / "run").exists()


def test_a_native_network_is_refused_by_export(tmp_path, capsys):
    model_config = {"kind": "mlp", "data_dim": 2}
    run = prepare_run_dir(tmp_path / "native", '{"kind": "pretrain"}', overwrite=False)
    checkpoint = {
        "kind": "pretrain",
        "model_config": model_config,
        "diffusion_config": {"beta_schedule": "linear", "num_timesteps": 10},
        "data": {"dataset": "moons", "shape": [2]},
        "model": build_model(model_config).state_dict(),
        "train_state": {"step": 0},
    }
    CheckpointManager(run).save(checkpoint, step=0)
    out = tmp_path / "exported"
    assert_one_line_error(
        capsys, ["export-diffusers", "--run", str(run), "--out", str(out)], "only diffusers-based runs export"
    )
    with pytest.raises(UserError, match="only diffusers-based runs export"):
        export_diffusers(run, out)
    assert not out.exists()


def test_without_the_extra_the_error_says_how_to_install_it(pipeline, imported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails
    with pytest.raises(UserError, match=r"pip install -e \.\[diffusers\]"):
        import_diffusers(pipeline, tmp_path / "run")
    with pytest.raises(UserError, match=r"pip install -e \.\[diffusers\]"):
        load_run(imported)
