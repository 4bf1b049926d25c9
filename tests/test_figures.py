from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rl_diffusion import figures
from rl_diffusion.figures import ScatterPanel, limits, plot_process, plot_samples_vs_data, save_gif, scatter_image


def _points(seed: int, n: int = 200) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32)


def test_scatter_image_is_uint8_rgb() -> None:
    image = scatter_image(torch.from_numpy(_points(0)), data=_points(1), title="x", lim=(-3.0, 3.0))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == (240, 240)
    # Something dark (the samples) is drawn on the white background.
    assert image.min() < 100 and image.max() == 255
    # Diverged samples do not break the default limits.
    assert scatter_image(np.array([[0.0, 0.0], [np.nan, np.inf]])).shape == image.shape


def test_scatter_panel_redraw_leaves_nothing_of_the_previous_samples() -> None:
    # Each call restores the kept background: samples and title of an earlier call must be gone,
    # pixel for pixel the picture a fresh panel draws.
    data, lim = _points(1), (-3.0, 3.0)
    panel = ScatterPanel(data, lim)
    first = panel(_points(2) * 0.3, "epoch 1")
    second = panel(_points(3), "epoch 2")
    assert (first != second).any()
    np.testing.assert_array_equal(second, ScatterPanel(data, lim)(_points(3), "epoch 2"))
    np.testing.assert_array_equal(second, scatter_image(_points(3), data, "epoch 2", lim))


def test_limits_cover_finite_points_with_margin() -> None:
    # Range [-1, 3] over both sets and axes, padded by 10% of 4; the NaN is ignored.
    assert limits(np.array([[-1.0, 0.0], [np.nan, 2.0]]), torch.tensor([[3.0, 1.0]])) == pytest.approx((-1.4, 3.4))
    assert limits(np.zeros((3, 2))) == (-1.0, 1.0)


def test_plots_write_png_files(tmp_path: Path) -> None:
    pair = tmp_path / "a" / "samples.png"
    plot_samples_vs_data(_points(0), _points(1), pair, title="pair")
    process = tmp_path / "b" / "forward.png"
    plot_process([(t, _points(t) * (1 + t / 10)) for t in (0, 10, 100)], process, title="q(x_t | x_0)")
    for path, width_panels in ((pair, 2), (process, 3)):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size[0] == 360 * width_panels and image.size[1] == 360


def test_save_gif_has_one_frame_per_entry(tmp_path: Path) -> None:
    path = tmp_path / "c" / "reverse.gif"
    save_gif([(f"step {k}", _points(k, n=50)) for k in range(4)], path, fps=5)
    with Image.open(path) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 4
        assert gif.info["duration"] == 200 and gif.info["loop"] == 0


def test_save_gif_draws_at_most_max_frames_evenly(tmp_path: Path, monkeypatch) -> None:
    drawn = []
    panel = figures._panel
    monkeypatch.setattr(
        figures,
        "_panel",
        lambda ax, points, data, lim, label: drawn.append(label) or panel(ax, points, data, lim, label),
    )
    path = tmp_path / "long.gif"
    save_gif([(f"epoch {k}", _points(k, n=20)) for k in range(25)], path, max_frames=7)
    assert drawn == [f"epoch {k}" for k in (0, 4, 8, 12, 16, 20, 24)]  # evenly spaced, the first and the last kept
    with Image.open(path) as gif:
        assert gif.n_frames == 7
