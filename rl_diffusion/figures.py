"""Scatter figures of 2D point sets: PNG files, animated GIFs, RGB arrays for TensorBoard.

Figures are ``matplotlib.figure.Figure`` objects on an Agg canvas, never pyplot
ones: pyplot keeps every figure it opens until closed, which leaks memory in a
long training run; these are freed when the function returns. Points are numpy
arrays or tensors [N, 2]; non-finite points (a diverged sampler) are ignored
when choosing the axis limits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: training runs on servers without a display

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

Points = torch.Tensor | np.ndarray
Limits = tuple[float, float]

DATA_COLOR = "#c4c4c4"
SAMPLE_COLOR = "#1f4e9c"
PANEL_INCHES = 3.0
RENDER_DPI = 80  # arrays and GIF frames: 240 x 240 pixels a panel, quick to render
PNG_DPI = 120


def _as_numpy(points: Points) -> np.ndarray:
    """numpy or torch [N, 2] -> float64 numpy [N, 2]."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu()
    return np.asarray(points, dtype=np.float64)


def limits(*point_sets: Points, margin: float = 0.1) -> Limits:
    """(lo, hi) for both axes covering every finite coordinate of the sets, padded by margin * range.

    Pass the result as ``lim`` to keep several figures (or a GIF) on the same axes.
    """
    values = np.concatenate(
        [_as_numpy(points).ravel() for points in point_sets if np.ndim(points) == 2] or [np.zeros(0)]
    )
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (-1.0, 1.0)
    lo, hi = float(values.min()), float(values.max())
    pad = margin * (hi - lo) or 1.0
    return (lo - pad, hi + pad)


def _row(num_panels: int, title: str = "") -> tuple[Figure, list[Axes]]:
    """A figure with one row of square panels, on its own Agg canvas."""
    fig = Figure(figsize=(PANEL_INCHES * num_panels, PANEL_INCHES), dpi=RENDER_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, list(fig.subplots(1, num_panels, squeeze=False)[0])


def _draw(ax: Axes, points: Points, data: Points | None, lim: Limits, title: str) -> None:
    """Scatter points (dark) over data (light grey) with equal aspect and fixed limits."""
    if data is not None:
        data = _as_numpy(data)
        ax.scatter(data[:, 0], data[:, 1], s=4, c=DATA_COLOR, linewidths=0)
    points = _as_numpy(points)
    ax.scatter(points[:, 0], points[:, 1], s=3, c=SAMPLE_COLOR, alpha=0.6, linewidths=0)
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)


def _panel(ax: Axes, points: Points, data: Points | None, lim: Limits, title: str) -> None:
    """A scatter of 2D points over the data, or, for a batch of images [N, C, H, W], their grid."""
    if np.ndim(points) == 4:
        ax.imshow(image_grid(points))
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
    else:
        _draw(ax, points, data, lim, title)


def _rgb(fig: Figure) -> np.ndarray:
    """Render fig: uint8 [H, W, 3]."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _save(fig: Figure, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PNG_DPI)


class ScatterPanel:
    """One scatter panel over fixed data and limits, re-rendered for new samples: a picture every epoch.

    The axes, ticks and data are drawn once and their pixels kept; each call restores those pixels
    and draws only the samples and the title (matplotlib's blitting). A fresh figure costs about
    90 ms, almost all of it layout and tick text; a call here costs a few.
    """

    def __init__(self, data: Points | None, lim: Limits):
        self.fig, (self.ax,) = _row(1)
        # the title's space is laid out with a placeholder; samples and title are drawn per call
        _draw(self.ax, np.zeros((0, 2)), data, lim, "placeholder")
        self.samples = self.ax.collections[-1]
        for artist in (self.samples, self.ax.title):
            artist.set_animated(True)  # left out of the kept background
        self.fig.canvas.draw()
        self.fig.set_layout_engine("none")  # the layout is fixed now: drawing it again would move nothing
        self.background = self.fig.canvas.copy_from_bbox(self.fig.bbox)

    def __call__(self, samples: Points, title: str = "") -> np.ndarray:
        """uint8 [H, W, 3] of the samples over the data, for ``add_image(..., dataformats="HWC")``."""
        canvas = self.fig.canvas
        canvas.restore_region(self.background)
        self.samples.set_offsets(_as_numpy(samples))
        self.ax.title.set_text(title)
        self.ax.draw_artist(self.samples)
        self.ax.draw_artist(self.ax.title)
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def scatter_image(
    samples: Points, data: Points | None = None, title: str = "", lim: Limits | None = None
) -> np.ndarray:
    """One scatter panel as uint8 [H, W, 3], for ``add_image(..., dataformats="HWC")``.

    Data (if given) in light grey under the samples. Limits default to the data's
    (else the samples') range plus a margin, so samples far off the data are cut
    off rather than shrinking the data to a dot. For one picture per epoch over the
    same data, keep a `ScatterPanel` instead.
    """
    return ScatterPanel(data, lim or limits(samples if data is None else data))(samples, title)


def samples_picture(data: np.ndarray) -> Callable[[np.ndarray, str], np.ndarray]:
    """f(samples, title) -> uint8 [H, W, 3] for TensorBoard: a grid of up to 64 images, or a scatter over the data."""
    if data.ndim == 4:
        return lambda samples, title: image_grid(samples[:64])
    return ScatterPanel(data, limits(data))


def plot_samples_vs_data(samples: Points, data: Points, path: str | Path, title: str = "") -> None:
    """PNG with data (left) and samples (right) side by side, both with the data's limits."""
    lim = limits(data)
    fig, (left, right) = _row(2, title)
    _draw(left, data, None, lim, "data")
    _draw(right, samples, None, lim, "samples")
    _save(fig, path)


def plot_process(frames: Sequence[tuple[int, Points]], path: str | Path, title: str) -> None:
    """PNG with one row of panels, one per (t, points), titled "t = ...", shared limits.

    For the forward process q(x_t | x_0) and the reverse process; the limits cover
    every frame, so the noise at large t and the data at t = 0 are both in view.
    """
    lim = limits(*(points for _, points in frames))
    fig, axes = _row(len(frames), title)
    for ax, (t, points) in zip(axes, frames, strict=True):
        _panel(ax, points, None, lim, f"t = {t}")
    _save(fig, path)


def save_gif(
    frames: Sequence[tuple[str, Points]],
    path: str | Path,
    lim: Limits | None = None,
    fps: int = 10,
    max_frames: int = 100,
) -> None:
    """Animated GIF (looping forever) of one scatter panel per (label, points), at most `max_frames` of them:
    beyond that, evenly spaced ones with the first and the last (a frame takes about 0.1 s to draw, and a run
    of 3,400 epochs has as many).

    Limits are fixed for the whole animation: ``lim``, or the range of every frame.
    Pillow merges consecutive identical frames into one longer frame.
    """
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    if len(frames) > max_frames:
        frames = [frames[i] for i in np.linspace(0, len(frames) - 1, max_frames).round().astype(int)]
    lim = lim or limits(*(points for _, points in frames))
    fig, (ax,) = _row(1)
    images = []
    for label, points in frames:
        # One figure redrawn per frame: building a figure costs more than drawing it.
        ax.clear()
        _panel(ax, points, None, lim, label)
        images.append(Image.fromarray(_rgb(fig)))
        # The limits are fixed, so the first frame's layout fits every frame; laying
        # out again would take most of the rendering time.
        fig.set_layout_engine("none")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def plot_finetune_summary(
    before: Points,
    after: Points,
    data: Points,
    epochs: Sequence[int],
    mean_rewards: Sequence[float],
    path: str | Path,
    title: str = "",
) -> None:
    """Samples before and after fine-tuning over the data, and the mean reward per epoch."""
    fig, (ax_before, ax_after, ax_curve) = _row(3, title)
    lim = limits(data, before, after)
    _panel(ax_before, before, data, lim, "before (epoch 1)")
    _panel(ax_after, after, data, lim, "after")
    ax_curve.plot(list(epochs), list(mean_rewards), color=SAMPLE_COLOR)
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("mean reward")
    ax_curve.grid(alpha=0.3)
    _save(fig, path)


def plot_grid(
    rows: Sequence[tuple[str, Sequence[tuple[str, Points]], Points]], path: str | Path, title: str = ""
) -> int:
    """A grid of panels: one row per (row label, [(column label, points), ...], the row's data); returns the cell count.

    Each row is drawn over its own data with the data's limits (samples far off are cut off,
    not squeezing the data to a dot). Rows may have different lengths (a run that stopped early).
    """
    num_cols = max(len(cells) for _, cells, _ in rows)
    fig = Figure(figsize=(2.2 * num_cols, 2.2 * len(rows)), dpi=RENDER_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, fontsize=10)
    axes = fig.subplots(len(rows), num_cols, squeeze=False)
    cells = 0
    for r, (row_label, row, data) in enumerate(rows):
        lim = limits(data)
        for c in range(num_cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.set_axis_off()
                continue
            col_label, points = row[c]
            _panel(ax, points, data, lim, col_label)
            cells += 1
        axes[r][0].set_ylabel(row_label, fontsize=9)
    _save(fig, path)
    return cells


def plot_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    log_y: bool = False,
) -> None:
    """One line per label: {label: (xs, ys)}."""
    fig, (ax,) = _row(1, title)
    fig.set_size_inches(5, 3.5)
    for label, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def image_grid(images: Points, columns: int = 8, pad: int = 1) -> np.ndarray:
    """A batch of images [N, C, H, W] in [-1, 1] tiled into one uint8 picture [rows*H, columns*W, 3]."""
    x = _as_numpy(images)
    x = np.clip((x + 1) * 127.5, 0, 255).astype(np.uint8)
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    n, _, h, w = x.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = x[
            i
        ].transpose(1, 2, 0)
    return grid


def save_image_grid(images: Points, path: str | Path, columns: int = 8, scale: int = 4) -> None:
    """PNG of image_grid(images), each pixel enlarged `scale` times (small images stay visible)."""
    grid = image_grid(images, columns)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def plot_frontier(summary: dict, path: str | Path) -> None:
    """`rl-diffusion frontier`'s figure (rl_diffusion/frontier.py): mean reward against path KL (nats per
    chain), each run's epochs as a line ending in its final evaluation, labelled with beta; the mixed
    curve dashed, each point labelled with lambda."""
    fig, (ax,) = _row(1, "reward against KL to the pretrained model")
    fig.set_size_inches(5, 3.5)
    for beta, run in summary["runs"].items():
        # the epochs' batches, then the end point: the evaluation of the final network
        kl = [*run["curve"]["kl_to_pretrained"], run["kl_to_pretrained"]]
        reward = [*run["curve"]["reward_mean"], run["reward_mean"]]
        (line,) = ax.plot(kl, reward, marker="o", markersize=2, alpha=0.6, label=f"beta={beta}")
        ax.plot(kl[-1], reward[-1], marker="o", markersize=6, color=line.get_color())
        ax.annotate(f"beta={beta}", (kl[-1], reward[-1]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if summary["mix"] is not None:
        points = summary["mix"]["points"]
        ax.plot(
            [p["kl_to_pretrained"] for p in points],
            [p["reward_mean"] for p in points],
            "k--",
            marker="s",
            markersize=3,
            label=f"mix of beta={summary['mix']['kl_coef']} with pretrained",
        )
        for p in points:
            ax.annotate(
                f"{p['mix']:g}",
                (p["kl_to_pretrained"], p["reward_mean"]),
                textcoords="offset points",
                xytext=(-10, -9),
                fontsize=6,
            )
    ax.set_xlabel("path KL to pretrained (nats per chain)")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
