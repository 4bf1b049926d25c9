"""Offline image data sets, read with numpy and PIL only (no torchvision, no downloads).

Every loader returns float32 images [N, C, S, S] scaled to [-1, 1] (the DDPM's data range)
and int64 labels [N]. MNIST and CIFAR-10 are read from the files torchvision's downloaders
leave on disk, so a copy fetched elsewhere works here unchanged.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from rl_diffusion.errors import UserError, nearest

IMAGE_DATASETS: dict[str, str] = {
    "digits": "scikit-learn's 1,797 handwritten digits, 8x8 grey (resized bilinearly for other sizes), 10 classes; "
    "built in",
    "image-folder": "your PNG/JPEG files under root, flat (unlabelled) or root/<class>/<image> (labels by sorted "
    "folder name); shorter side resized, center-cropped to image_size (default 32), RGB",
    "mnist": "MNIST training set, 60,000 28x28 grey digits, 10 classes; IDX files under root/MNIST/raw/ "
    "(torchvision's layout, .gz or not)",
    "cifar10": "CIFAR-10 training set, 50,000 32x32 RGB images, 10 classes; python pickles under "
    "root/cifar-10-batches-py/",
}
"""Name -> one-line description (for ``rl-diffusion datasets``)."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

_MNIST_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _to_unit_range(pixels: np.ndarray, max_value: float) -> np.ndarray:
    """Pixel values in [0, max_value] -> float32 in [-1, 1]."""
    return pixels.astype(np.float32) * np.float32(2.0 / max_value) - np.float32(1.0)


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """Bilinear resize of float images [N, C, H, W] to [N, C, S, S] with PIL, per channel.

    PIL's bilinear filter widens its support when shrinking (it antialiases), like
    ``F.interpolate(..., antialias=True)``. The weights are convex, so [-1, 1] stays [-1, 1]
    up to rounding, which the final clip removes.
    """
    if images.shape[-2:] == (image_size, image_size):
        return images
    n, ch = images.shape[:2]
    out = np.empty((n, ch, image_size, image_size), dtype=np.float32)
    for i in range(n):  # PIL resizes one 2-D float ("F" mode) image at a time
        for j in range(ch):
            plane = Image.fromarray(np.ascontiguousarray(images[i, j], dtype=np.float32))
            out[i, j] = np.asarray(plane.resize((image_size, image_size), Image.Resampling.BILINEAR))
    return np.clip(out, -1.0, 1.0)


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise UserError(f"image_size must be a positive integer, got {image_size!r}")


def _check_split(split: str, splits: dict) -> None:
    if split not in splits:
        raise UserError(f"unknown split '{split}'; choose one of {', '.join(splits)}")


def load_digits_images(image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: float32 images [1797, 1, S, S] in [-1, 1] and int64 labels 0..9.

    The originals are 8x8 with integer values 0..16 (ink = 16); other sizes are bilinear
    resizes of them, so a 16x16 digit is a blurred 8x8 one, not a sharper drawing.
    """
    from sklearn.datasets import load_digits

    _check_size(image_size)
    digits = load_digits()
    images = _to_unit_range(digits.images.reshape(-1, 1, 8, 8), 16.0)
    return resize_images(images, image_size), digits.target.astype(np.int64)


def _read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One file -> uint8 [S, S, channels]: shorter side resized to S, then the center S x S crop."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            w, h = img.size
            scale = image_size / min(w, h)
            # max() guards against rounding the shorter side below S for extreme aspect ratios.
            new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
            pixels = np.asarray(img.crop((left, top, left + image_size, top + image_size)))
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return pixels.reshape(image_size, image_size, channels)


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(root: str | Path, image_size: int, channels: int = 3) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """PNG/JPEG files under ``root`` -> (images [N, channels, S, S] in [-1, 1], labels [N], class names).

    Two layouts:
      - flat: ``root/<image>``; every label is 0 and the class-name list is empty (unconditional).
      - classes: ``root/<class>/<image>`` (images may sit deeper inside a class folder); labels
        index the class folders in sorted name order, which is the returned list.
    Mixing the two (images both in root and in subfolders) is an error, since it is unclear
    which label the loose images should get. Every file is converted to grey (channels=1) or
    RGB (channels=3), its shorter side resized to S (bicubic), then center-cropped to S x S.
    All images are held in memory: N * channels * S * S float32 values.
    """
    root = Path(root)
    _check_size(image_size)
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist or is not a folder")
    loose = _image_files(root, recursive=False)
    class_files = {d.name: _image_files(d, recursive=True) for d in sorted(root.iterdir()) if d.is_dir()}
    class_files = {name: files for name, files in class_files.items() if files}
    if loose and class_files:
        raise UserError(
            f"{root} has images both directly inside it and in class folders "
            f"({', '.join(class_files)}); put every image in a class folder, or none"
        )
    if not loose and not class_files:
        raise UserError(
            f"no {'/'.join(e[1:].upper() for e in IMAGE_EXTENSIONS)} images in {root} "
            f"(looked for root/<image> and root/<class>/<image>)"
        )
    class_names = list(class_files)
    files = loose or [f for name in class_names for f in class_files[name]]
    labels = (
        np.zeros(len(files), dtype=np.int64)
        if loose
        else np.concatenate([np.full(len(class_files[name]), k, dtype=np.int64) for k, name in enumerate(class_names)])
    )
    pixels = np.stack([_read_image(f, image_size, channels) for f in files])
    return _to_unit_range(pixels.transpose(0, 3, 1, 2), 255.0), labels, class_names


def _read_idx(stream: BinaryIO, path: Path, expected_dims: int) -> np.ndarray:
    """An IDX array of unsigned bytes: magic 0x00 0x00 0x08 <ndim>, ndim big-endian uint32 sizes, data."""
    header = stream.read(4)
    if len(header) < 4 or header[:3] != b"\x00\x00\x08" or header[3] != expected_dims:
        raise UserError(
            f"{path} is not an IDX file of unsigned bytes with {expected_dims} dimension(s) "
            f"(magic number {header.hex() or 'missing'}); re-download it"
        )
    sizes = stream.read(4 * expected_dims)
    if len(sizes) < 4 * expected_dims:
        raise UserError(f"{path} ends inside its IDX header; re-download it")
    dims = tuple(int(d) for d in np.frombuffer(sizes, dtype=">u4"))
    data = np.frombuffer(stream.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise UserError(
            f"{path} is truncated: its header promises {dims} = {int(np.prod(dims))} values, "
            f"it holds {data.size}; re-download it"
        )
    return data.reshape(dims)


def _open_idx(raw: Path, name: str, expected_dims: int) -> np.ndarray:
    """Read raw/name, or raw/name.gz when only the compressed file is there."""
    plain, packed = raw / name, raw / f"{name}.gz"
    if plain.is_file():
        with open(plain, "rb") as f:
            return _read_idx(f, plain, expected_dims)
    if packed.is_file():
        with gzip.open(packed, "rb") as f:
            return _read_idx(f, packed, expected_dims)
    raise UserError(
        f"MNIST file missing: expected {plain} (or {packed.name}); point root at the folder "
        f"that holds MNIST/raw/, as torchvision.datasets.MNIST(root, download=True) creates it"
    )


def load_mnist(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from IDX files in torchvision's layout: images [N, 1, 28, 28] in [-1, 1], labels [N].

    Reads ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (or their ``.gz``);
    split "train" has N = 60,000 and "test" N = 10,000 in the official files.
    """
    _check_split(split, _MNIST_PREFIX)
    raw = Path(root) / "MNIST" / "raw"
    prefix = _MNIST_PREFIX[split]
    images = _open_idx(raw, f"{prefix}-images-idx3-ubyte", 3)
    labels = _open_idx(raw, f"{prefix}-labels-idx1-ubyte", 1)
    if len(images) != len(labels):
        raise UserError(f"MNIST {split} files in {raw} disagree: {len(images)} images but {len(labels)} labels")
    return _to_unit_range(images[:, None], 255.0), labels.astype(np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle can otherwise run any code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR-10 batch never does")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # The official files are Python 2 pickles: their str keys arrive as bytes.
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a CIFAR-10 python batch ({e}); re-download it") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UserError(
            f"{path}: expected data [N, 3072] and N labels, got data {list(data.shape)} and {len(labels)} labels"
        )
    return data, labels


def load_cifar10(root: str | Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from its python pickles: images [N, 3, 32, 32] in [-1, 1], labels [N] in 0..9.

    Reads ``root/cifar-10-batches-py/data_batch_1..5`` (split "train", N = 50,000) or
    ``test_batch`` ("test", N = 10,000). Each row of a batch's b"data" holds the 1024 red,
    then green, then blue values of a 32x32 image in row-major order. Only numpy arrays and
    plain containers are unpickled, so a tampered file cannot run code.
    """
    _check_split(split, _CIFAR_BATCHES)
    folder = Path(root) / "cifar-10-batches-py"
    paths = [folder / name for name in _CIFAR_BATCHES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"CIFAR-10 file(s) missing: {', '.join(map(str, missing))}; point root at the folder "
            f"that holds cifar-10-batches-py/ (the extracted cifar-10-python.tar.gz)"
        )
    data, labels = zip(*(_read_cifar_batch(p) for p in paths), strict=True)
    images = np.concatenate(data).reshape(-1, 3, 32, 32)
    return _to_unit_range(images, 255.0), np.concatenate(labels)


def load_image_dataset(
    name: str, root: str | Path | None = None, image_size: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """(images float32 [N, C, S, S] in [-1, 1], labels int64 [N], num_classes) of data set ``name``.

    ``image_size`` None keeps the native size (digits 8, mnist 28, cifar10 32; image-folder 32);
    another size resizes bilinearly. ``root`` is required by image-folder, mnist and cifar10 and
    ignored by digits. num_classes is 0 for an unlabelled (flat) image folder.
    """
    if name not in IMAGE_DATASETS:
        raise UserError(
            f"unknown image data set '{name}'{nearest(name, IMAGE_DATASETS)}; available: {', '.join(IMAGE_DATASETS)}"
        )
    if image_size is not None:
        _check_size(image_size)
    if name == "digits":
        images, labels = load_digits_images(image_size or 8)
        return images, labels, 10
    if root is None:
        raise UserError(f"data set '{name}' is read from files: give the folder that holds them as root")
    if name == "image-folder":
        images, labels, class_names = load_image_folder(root, image_size or 32)
        return images, labels, len(class_names)
    images, labels = load_mnist(root) if name == "mnist" else load_cifar10(root)
    return (images if image_size is None else resize_images(images, image_size)), labels, 10
