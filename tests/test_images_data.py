"""Image data sets: digits, image folders, and MNIST / CIFAR-10 files in torchvision's layout."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pretrain.images import (
    IMAGE_DATASETS,
    load_cifar10,
    load_digits_images,
    load_image_dataset,
    load_image_folder,
    load_mnist,
)
from rl_diffusion.errors import UserError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def test_digits_shapes_range_and_labels() -> None:
    images, labels = load_digits_images()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    # sklearn's first image, a 0, has value 0 (-> -1) in its corner and 15 (-> 15/8 - 1) at (1, 3).
    assert images[0, 0, 0, 0] == -1.0 and images[0, 0, 1, 3] == pytest.approx(15 / 8 - 1)
    big, _ = load_digits_images(16)
    assert big.shape == (1797, 1, 16, 16) and big.min() >= -1.0 and big.max() <= 1.0
    # Bilinear weights are convex and sum to 1: the mean ink barely moves.
    assert big.mean() == pytest.approx(images.mean(), abs=0.02)


def _stripes(path: Path, width: int = 12, height: int = 4) -> None:
    """Red, green, blue vertical thirds."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    for k, color in enumerate((RED, GREEN, BLUE)):
        pixels[:, k * width // 3 : (k + 1) * width // 3] = color
    Image.fromarray(pixels).save(path)


def test_flat_folder_center_crops_and_scales(tmp_path: Path) -> None:
    _stripes(tmp_path / "a.png")
    Image.new("RGB", (8, 16), BLUE).save(tmp_path / "b.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    images, labels, class_names = load_image_folder(tmp_path, 4)
    assert images.shape == (2, 3, 4, 4) and images.dtype == np.float32
    assert labels.tolist() == [0, 0] and class_names == []
    # a.png is already 4 pixels high: the center 4 of its 12 columns are the green third.
    np.testing.assert_array_equal(images[0], np.broadcast_to(np.array([-1.0, 1.0, -1.0])[:, None, None], (3, 4, 4)))
    np.testing.assert_array_equal(images[1], np.broadcast_to(np.array([-1.0, -1.0, 1.0])[:, None, None], (3, 4, 4)))
    grey, _, _ = load_image_folder(tmp_path, 4, channels=1)
    assert grey.shape == (2, 1, 4, 4)
    # ITU-R 601 luma of pure blue: 29/255 of white (PIL's "L" conversion).
    assert grey[1].mean() == pytest.approx(29 / 127.5 - 1)


def test_class_folders_give_sorted_labels(tmp_path: Path) -> None:
    for name, _color in (("dog", BLUE), ("cat", RED)):
        (tmp_path / name).mkdir()
    Image.new("RGB", (6, 6), RED).save(tmp_path / "cat" / "x.png")
    Image.new("RGB", (6, 6), BLUE).save(tmp_path / "dog" / "y.jpg", quality=95)
    (tmp_path / "dog" / "more").mkdir()
    Image.new("RGB", (9, 6), BLUE).save(tmp_path / "dog" / "more" / "z.jpeg", quality=95)
    (tmp_path / "empty").mkdir()
    images, labels, class_names = load_image_folder(tmp_path, 4)
    assert class_names == ["cat", "dog"] and labels.tolist() == [0, 1, 1]
    np.testing.assert_allclose(images[1:, 2], 1.0, atol=0.02)  # JPEG is lossy
    assert load_image_dataset("image-folder", tmp_path, image_size=4)[2] == 2


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no PNG/JPG/JPEG images in"):
        load_image_folder(tmp_path, 4)
    with pytest.raises(UserError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", 4)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        load_image_folder(tmp_path, 4)
    (tmp_path / "broken.png").unlink()
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    (tmp_path / "cls").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cls" / "a.png")
    with pytest.raises(UserError, match="both directly inside it and in class folders"):
        load_image_folder(tmp_path, 4)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_plain_and_gzipped(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(5, 28, 28))
    _write_idx(raw / "train-images-idx3-ubyte", train)
    _write_idx(raw / "train-labels-idx1-ubyte", np.array([5, 0, 4, 1, 9]))
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", np.full((2, 28, 28), 255))
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([7, 2]))
    images, labels = load_mnist(tmp_path)
    assert images.shape == (5, 1, 28, 28) and images.dtype == np.float32
    np.testing.assert_allclose(images[:, 0], train / 127.5 - 1, atol=1e-6)
    assert labels.tolist() == [5, 0, 4, 1, 9] and labels.dtype == np.int64
    test_images, test_labels = load_mnist(tmp_path, "test")
    assert test_labels.tolist() == [7, 2] and bool((test_images == 1.0).all())
    resized, _, num_classes = load_image_dataset("mnist", tmp_path, image_size=32)
    assert resized.shape == (5, 1, 32, 32) and num_classes == 10


def test_mnist_missing_or_malformed_files(tmp_path: Path) -> None:
    expected = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    with pytest.raises(UserError, match=f"expected {expected} \\(or train-images-idx3-ubyte.gz\\)"):
        load_mnist(tmp_path)
    expected.parent.mkdir(parents=True)
    _write_idx(expected, np.zeros((2, 28, 28)))
    _write_idx(expected.parent / "train-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(UserError, match="2 images but 3 labels"):
        load_mnist(tmp_path)
    expected.write_bytes(b"\x00\x00\x08\x01" + bytes(8))
    with pytest.raises(UserError, match="not an IDX file .* 3 dimension"):
        load_mnist(tmp_path)
    with pytest.raises(UserError, match="unknown split 'val'"):
        load_mnist(tmp_path, "val")


def _write_cifar(folder: Path, name: str, data: np.ndarray, labels: list[int], protocol: int = 4) -> None:
    with open(folder / name, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels, b"filenames": []}, f, protocol=protocol)


def test_cifar10_batches_and_channel_order(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    red = np.zeros((1, 3072), dtype=np.uint8)
    red[0, :1024] = 255  # the first 1024 values of a row are the red plane
    for i in range(1, 6):
        _write_cifar(folder, f"data_batch_{i}", np.repeat(red, 2, axis=0), [i, i], protocol=4 + i % 2)
    _write_cifar(folder, "test_batch", np.zeros((3, 3072), dtype=np.uint8), [1, 2, 3])
    images, labels = load_cifar10(tmp_path)
    assert images.shape == (10, 3, 32, 32) and labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert bool((images[:, 0] == 1).all()) and bool((images[:, 1:] == -1).all())
    test_images, test_labels = load_cifar10(tmp_path, "test")
    assert test_images.shape == (3, 3, 32, 32) and test_labels.tolist() == [1, 2, 3]
    assert load_image_dataset("cifar10", tmp_path)[0].shape == (10, 3, 32, 32)


class _Exploit:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_cifar10_missing_files_and_code_in_pickles(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    with pytest.raises(UserError, match=f"missing: {folder / 'data_batch_1'}, .*data_batch_5"):
        load_cifar10(tmp_path)
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Exploit(), b"labels": []}, f)
    with pytest.raises(UserError, match=r"not a CIFAR-10 python batch \(refers to (posix|nt|os)\.system"):
        load_cifar10(tmp_path, "test")
    assert "pwned" not in capfd.readouterr().out


def test_dispatcher_errors_and_names() -> None:
    assert set(IMAGE_DATASETS) == {"digits", "image-folder", "mnist", "cifar10"}
    with pytest.raises(UserError, match="did you mean 'mnist'"):
        load_image_dataset("mnsit")
    with pytest.raises(UserError, match="'cifar10' is read from files: give the folder"):
        load_image_dataset("cifar10")
    with pytest.raises(UserError, match="image_size must be a positive integer"):
        load_image_dataset("digits", image_size=0)
    images, labels, num_classes = load_image_dataset("digits")
    assert images.shape == (1797, 1, 8, 8) and num_classes == 10
