"""Tests of diffattr.data on small fakes written in the real on-disk formats."""

from __future__ import annotations

import gzip
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_cifar_batch
from PIL import Image
from sklearn.datasets import load_digits

from diffattr.data import datasets as data
from diffattr.data.datasets import (
    DATASET_NAMES,
    DatasetNotFoundError,
    ImageDataset,
    load_dataset,
    read_idx,
)

N_PER_BATCH = 200  # rows per fake CIFAR batch (real: 10000)
N_MNIST = 60  # fake MNIST training images (real: 60000)
N_MNIST_ZEROS = 12


# ---------------------------------------------------------------------------------------------
# Writers of the real formats
# ---------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(root: Path, images: np.ndarray, labels: np.ndarray, suffix: str) -> None:
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", labels)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Fake CIFAR-10 (5 x 200 train rows, 200 test rows, balanced labels) plus MNIST (raw)."""
    root = tmp_path_factory.mktemp("raw")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(123)
    train = rng.integers(0, 256, (5 * N_PER_BATCH, 3, 32, 32), dtype=np.uint8)
    train_labels = rng.permutation(np.arange(5 * N_PER_BATCH) % 10)
    for b in range(5):
        rows = slice(b * N_PER_BATCH, (b + 1) * N_PER_BATCH)
        write_cifar_batch(folder / f"data_batch_{b + 1}", train[rows], train_labels[rows])
    test = rng.integers(0, 256, (N_PER_BATCH, 3, 32, 32), dtype=np.uint8)
    test_labels = rng.permutation(np.arange(N_PER_BATCH) % 10)
    write_cifar_batch(folder / "test_batch", test, test_labels)
    mnist, mnist_labels = fake_mnist(rng)
    write_mnist(root, mnist, mnist_labels, suffix="")
    return {
        "root": root,
        "train": train,
        "train_labels": train_labels,
        "test": test,
        "test_labels": test_labels,
        "mnist": mnist,
        "mnist_labels": mnist_labels,
    }


def fake_mnist(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [60, 28, 28] images (blurry blobs) and labels with exactly 12 zeros."""
    yy, xx = np.mgrid[0:28, 0:28]
    centres = rng.uniform(8, 20, (N_MNIST, 2))
    blobs = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 30)
    images = (255 * blobs).astype(np.uint8)
    labels = np.concatenate([np.zeros(N_MNIST_ZEROS), rng.integers(1, 10, N_MNIST - 12)])
    return images, rng.permutation(labels).astype(np.uint8)


CELEBA_PARTITION = {1: 0, 2: 0, 3: 0, 4: 1, 5: 2, 6: 2}


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fake CelebA: six 178x218 jpgs and a partition file (3 train, 1 valid, 2 test)."""
    root = tmp_path_factory.mktemp("raw")
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:218, 0:178]
    lines = []
    for number, part in CELEBA_PARTITION.items():
        base = np.stack([(yy + number * xx) % 256, (3 * xx) % 256, (2 * yy) % 256], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{number:06d}.jpg")
        lines.append(f"{number:06d}.jpg {part}")
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6) -> None:
    """Same shape and max |actual - expected| <= atol (cheaper than torch.testing's first call)."""
    assert actual.shape == expected.shape
    worst = (actual.double() - expected.double()).abs().max().item()
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol:.3g}"


def assert_well_formed(ds: ImageDataset, shape: tuple[int, int, int]) -> None:
    """Shapes, dtypes, value range and unique ids of a loaded dataset."""
    assert ds.image_shape == shape
    assert ds.images.dtype == torch.float32 and ds.images.shape == (len(ds), *shape)
    assert torch.isfinite(ds.images).all()
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    for arr, dtype in ((ds.ids, np.int64), (ds.labels, np.int64), (ds.is_outlier, np.bool_)):
        assert arr.dtype == dtype and arr.shape == (len(ds),)
    assert np.unique(ds.ids).size == len(ds)


# ---------------------------------------------------------------------------------------------
# digits and digits_outliers
# ---------------------------------------------------------------------------------------------


def test_digits_splits_have_documented_sizes_and_are_disjoint() -> None:
    train, heldout = load_dataset("digits"), load_dataset("digits", "heldout")
    assert (len(train), len(heldout)) == (1600, 197)
    assert_well_formed(train, (1, 8, 8))
    assert_well_formed(heldout, (1, 8, 8))
    assert set(train.ids).isdisjoint(heldout.ids)
    assert set(train.ids) | set(heldout.ids) == set(range(1797))
    assert not train.is_outlier.any()


def test_digits_values_labels_and_ids_match_sklearn() -> None:
    train = load_dataset("digits")
    bunch = load_digits()
    expected = torch.from_numpy(bunch.images[train.ids] / 8.0 - 1.0).float()[:, None]
    assert_close(train.images, expected)
    np.testing.assert_array_equal(train.labels, bunch.target[train.ids])
    assert train.images.min() == -1 and train.images.max() == 1


def test_digits_split_depends_only_on_seed() -> None:
    first, again = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    other = load_dataset("digits", seed=4)
    np.testing.assert_array_equal(first.ids, again.ids)
    assert torch.equal(first.images, again.images)
    assert not np.array_equal(first.ids, other.ids)


def test_image_size_resizes_to_requested_square() -> None:
    big = load_dataset("digits", image_size=16)
    small = load_dataset("digits", image_size=4)
    assert_well_formed(big, (1, 16, 16))
    assert_well_formed(small, (1, 4, 4))
    np.testing.assert_array_equal(big.ids, load_dataset("digits").ids)


def test_digits_outliers_appends_64_flagged_photo_patches() -> None:
    loads, seconds = [], []
    for _ in range(2):  # the first call also imports; the second is the steady cost
        start = time.perf_counter()
        loads.append(load_dataset("digits_outliers"))
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 1.0
    train = loads[0]
    assert torch.equal(loads[1].images, train.images)
    assert_well_formed(train, (1, 8, 8))
    assert len(train) == 1600 + 64 and train.is_outlier.sum() == 64
    outliers = train.subset(100_000 + np.arange(64))
    assert outliers.is_outlier.all() and (outliers.labels == -1).all()
    # each patch is scaled by its own min/max
    assert torch.allclose(outliers.images.amin(dim=(1, 2, 3)), torch.tensor(-1.0))
    assert torch.allclose(outliers.images.amax(dim=(1, 2, 3)), torch.tensor(1.0))
    np.testing.assert_array_equal(train.ids[:1600], load_dataset("digits").ids)
    assert not torch.equal(load_dataset("digits_outliers", seed=1).images[-64:], outliers.images)


def test_digits_outliers_heldout_is_digits_heldout() -> None:
    heldout = load_dataset("digits_outliers", "heldout")
    np.testing.assert_array_equal(heldout.ids, load_dataset("digits", "heldout").ids)
    assert not heldout.is_outlier.any()


# ---------------------------------------------------------------------------------------------
# ImageDataset
# ---------------------------------------------------------------------------------------------


def test_subset_keeps_ids_and_order() -> None:
    full = load_dataset("digits")
    ids = [full.ids[10], full.ids[3], full.ids[1000]]
    sub = full.subset(ids)
    np.testing.assert_array_equal(sub.ids, ids)
    assert torch.equal(sub.images, full.images[[10, 3, 1000]])
    np.testing.assert_array_equal(sub.labels, full.labels[[10, 3, 1000]])
    np.testing.assert_array_equal(full.positions(np.array(ids)), [10, 3, 1000])
    np.testing.assert_array_equal(sub.subset([ids[2]]).ids, [ids[2]])
    assert len(full.subset([])) == 0


def test_unknown_ids_raise_key_error_naming_them() -> None:
    full = load_dataset("digits")
    unknown = [full.ids[0], 99_999, -5]
    for call in (full.subset, full.positions):
        with pytest.raises(KeyError, match="99999") as info:
            call(unknown)
        assert "-5" in str(info.value)
    with pytest.raises(KeyError, match="and 5 more"):
        full.subset(np.arange(10_000, 10_015))


def test_positions_reject_non_integer_ids() -> None:
    full = load_dataset("digits")
    for bad in ([1.0, 2.0], [True], np.array(["3"])):
        with pytest.raises(TypeError, match="integers"):
            full.positions(bad)


def test_subset_rejects_repeated_ids() -> None:
    full = load_dataset("digits")
    with pytest.raises(ValueError, match="repeat"):
        full.subset([full.ids[0], full.ids[0]])


def test_dataset_arrays_are_read_only() -> None:
    full = load_dataset("digits")
    with pytest.raises(ValueError):
        full.ids[0] = 5


@pytest.mark.parametrize("bad", [float("nan"), 1.5, float("-inf")])
def test_image_dataset_rejects_non_finite_or_out_of_range(bad: float) -> None:
    images = torch.zeros(3, 1, 4, 4)
    images[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match="NaN|\\[-1, 1\\]"):
        ImageDataset("x", images, np.arange(3), np.zeros(3, int), np.zeros(3, bool))


def test_image_dataset_rejects_inconsistent_shapes_and_duplicate_ids() -> None:
    images = torch.zeros(3, 1, 4, 4)
    with pytest.raises(ValueError, match="ids must have shape"):
        ImageDataset("x", images, np.arange(2), np.zeros(3, int), np.zeros(3, bool))
    with pytest.raises(ValueError, match="not unique"):
        ImageDataset("x", images, np.array([1, 1, 2]), np.zeros(3, int), np.zeros(3, bool))
    with pytest.raises(ValueError, match="float32"):
        ImageDataset("x", images[:, 0], np.arange(3), np.zeros(3, int), np.zeros(3, bool))


# ---------------------------------------------------------------------------------------------
# Errors of load_dataset
# ---------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names_and_suggests() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("cifar100")
    message = str(info.value)
    assert all(name in message for name in DATASET_NAMES)
    assert "did you mean 'cifar10'" in message


@pytest.mark.parametrize("split", ["test", "valid", ""])
def test_bad_split_is_rejected(split: str) -> None:
    with pytest.raises(ValueError, match="heldout"):
        load_dataset("digits", split)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_bad_image_size_is_rejected(size: object) -> None:
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("digits", image_size=size)


@pytest.mark.parametrize(
    ("name", "expected", "source"),
    [
        ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("cifar2", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("cifar_mnist", "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        ("celeba", "celeba", "CelebA.html"),
    ],
)
def test_missing_root_names_expected_path_and_source(
    tmp_path: Path, name: str, expected: str, source: str
) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere" / expected) in str(info.value)
    assert source in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_missing_cifar_batch_is_named(tmp_path: Path, cifar: dict) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes((cifar["root"] / folder.name / "test_batch").read_bytes())
    assert len(load_dataset("cifar10", "heldout", tmp_path)) == N_PER_BATCH
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", "train", tmp_path)


def test_missing_mnist_names_files_and_mirror(tmp_path: Path, cifar: dict) -> None:
    (tmp_path / "cifar-10-batches-py").symlink_to(cifar["root"] / "cifar-10-batches-py")
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar_mnist", root=tmp_path)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte") in str(info.value)
    assert data.MNIST_URL in str(info.value)
    # heldout needs no MNIST
    assert len(load_dataset("cifar_mnist", "heldout", tmp_path)) == N_PER_BATCH // 10


# ---------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_returns_the_written_array(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 7, dtype=np.uint8)
    write_idx(tmp_path / f"img{suffix}", images)
    write_idx(tmp_path / f"lab{suffix}", labels)
    np.testing.assert_array_equal(read_idx(tmp_path / f"img{suffix}", expected_magic=2051), images)
    np.testing.assert_array_equal(read_idx(tmp_path / f"lab{suffix}", expected_magic=2049), labels)


def test_read_idx_rejects_wrong_magic_and_truncation(tmp_path: Path) -> None:
    write_idx(tmp_path / "lab", np.arange(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="2051"):
        read_idx(tmp_path / "lab", expected_magic=2051)
    (tmp_path / "cut").write_bytes((tmp_path / "lab").read_bytes()[:-1])
    with pytest.raises(ValueError, match="do not match"):
        read_idx(tmp_path / "cut")
    (tmp_path / "junk").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "junk")


# ---------------------------------------------------------------------------------------------
# CIFAR-10, CIFAR-2, CIFAR-MNIST
# ---------------------------------------------------------------------------------------------


def test_cifar10_decodes_row_major_planes_with_stable_ids(cifar: dict) -> None:
    train = load_dataset("cifar10", root=cifar["root"])
    heldout = load_dataset("cifar10", "heldout", root=cifar["root"])
    assert_well_formed(train, (3, 32, 32))
    np.testing.assert_array_equal(train.ids, np.arange(5 * N_PER_BATCH))
    np.testing.assert_array_equal(heldout.ids, 50_000 + np.arange(N_PER_BATCH))
    np.testing.assert_array_equal(train.labels, cifar["train_labels"])
    row = 345  # in data_batch_2: data[i, c*1024 + y*32 + x] is channel c at (y, x)
    flat = cifar["train"].reshape(len(cifar["train"]), -1)[row]
    assert train.images[row, 2, 5, 7] == pytest.approx(flat[2 * 1024 + 5 * 32 + 7] / 127.5 - 1)
    expected = torch.from_numpy(cifar["test"]).float() / 127.5 - 1
    assert_close(heldout.images, expected)
    assert_well_formed(load_dataset("cifar10", root=cifar["root"], image_size=16), (3, 16, 16))


def test_cifar2_is_balanced_and_keeps_cifar10_ids(cifar: dict) -> None:
    full = load_dataset("cifar10", root=cifar["root"])
    train = load_dataset("cifar2", root=cifar["root"])  # min(2500, 100) per class = all
    assert_well_formed(train, (3, 32, 32))
    assert set(train.labels) == {1, 7}
    assert (train.labels == 1).sum() == (train.labels == 7).sum() == N_PER_BATCH // 2
    assert torch.equal(train.images, full.subset(train.ids).images)
    np.testing.assert_array_equal(train.labels, full.subset(train.ids).labels)
    heldout = load_dataset("cifar2", "heldout", root=cifar["root"])
    assert set(heldout.labels) == {1, 7} and len(heldout) == 2 * N_PER_BATCH // 10
    assert (heldout.ids >= 50_000).all()


def test_cifar2_draw_depends_only_on_seed(cifar: dict) -> None:
    def draw(seed: int) -> ImageDataset:
        return data._load_cifar2("train", cifar["root"], seed, 32, n_per_class=30)

    first, again, other = draw(0), draw(0), draw(1)
    assert (first.labels == 1).sum() == (first.labels == 7).sum() == 30
    np.testing.assert_array_equal(first.ids, again.ids)
    assert not np.array_equal(first.ids, other.ids)
    assert np.all(np.diff(first.ids) > 0)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] upsampling by bilinear interpolation with half-pixel centres."""
    matrix = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, n_in - 1)
        matrix[i, lo] += 1 - (src - lo)
        matrix[i, hi] += src - lo
    return matrix


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_cifar_mnist_outliers_are_resized_source_zeros(
    tmp_path: Path, cifar: dict, suffix: str
) -> None:
    root = cifar["root"]
    if suffix:  # same MNIST, gzipped, next to the same CIFAR batches
        root = tmp_path
        (root / "cifar-10-batches-py").symlink_to(cifar["root"] / "cifar-10-batches-py")
        write_mnist(root, cifar["mnist"], cifar["mnist_labels"], suffix)
    train = load_dataset("cifar_mnist", root=root)
    assert_well_formed(train, (3, 32, 32))
    n_planes = N_PER_BATCH // 2
    assert train.is_outlier.sum() == N_MNIST_ZEROS and len(train) == n_planes + N_MNIST_ZEROS
    assert (train.labels == 0).all()
    outliers = train.subset(train.ids[train.is_outlier])
    index = outliers.ids - 200_000
    assert (cifar["mnist_labels"][index] == 0).all()
    resize = bilinear_matrix(28, 32)
    for image, i in zip(outliers.images, index, strict=True):
        source = cifar["mnist"][i].astype(np.float64) / 127.5 - 1
        expected = torch.from_numpy(resize @ source @ resize.T).float()
        for channel in image:
            assert_close(channel, expected, atol=1e-5)
    np.testing.assert_array_equal(
        train.ids[~train.is_outlier], np.flatnonzero(cifar["train_labels"] == 0)
    )


def test_cifar_mnist_zero_draw_depends_on_seed(cifar: dict) -> None:
    def zeros(seed: int) -> np.ndarray:
        ds = data._load_cifar_mnist("train", cifar["root"], seed, 32, n_mnist=5)
        return ds.ids[ds.is_outlier]

    assert zeros(0).size == 5
    np.testing.assert_array_equal(zeros(0), zeros(0))
    assert not np.array_equal(zeros(0), zeros(2))


def test_cifar_mnist_heldout_is_test_airplanes_without_outliers(cifar: dict) -> None:
    heldout = load_dataset("cifar_mnist", "heldout", root=cifar["root"])
    np.testing.assert_array_equal(heldout.ids, 50_000 + np.flatnonzero(cifar["test_labels"] == 0))
    assert not heldout.is_outlier.any()


# ---------------------------------------------------------------------------------------------
# CelebA
# ---------------------------------------------------------------------------------------------


def pil_reference(path: Path, size: int) -> torch.Tensor:
    """Centre 140x140 crop and PIL bilinear resize, float [3, size, size] in [-1, 1]."""
    with Image.open(path) as img:
        crop = img.convert("RGB").crop((19, 39, 159, 179))
        pixels = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)


@pytest.mark.parametrize(("image_size", "expected"), [(None, 64), (32, 32)])
def test_celeba_crop_and_resize_match_pil(
    celeba_root: Path, image_size: int | None, expected: int
) -> None:
    train = load_dataset("celeba", root=celeba_root, image_size=image_size)
    assert_well_formed(train, (3, expected, expected))
    np.testing.assert_array_equal(train.ids, [1, 2, 3])
    assert (train.labels == -1).all() and not train.is_outlier.any()
    folder = celeba_root / "celeba" / "img_align_celeba"
    for image, number in zip(train.images, train.ids, strict=True):
        reference = pil_reference(folder / f"{number:06d}.jpg", expected)
        # PIL rounds to uint8: allow a little over one grey level
        assert_close(image, reference, atol=1.5 / 127.5)


def test_celeba_heldout_is_partition_2(celeba_root: Path) -> None:
    heldout = load_dataset("celeba", "heldout", root=celeba_root)
    np.testing.assert_array_equal(heldout.ids, [5, 6])


def test_celeba_missing_listed_image_is_named(tmp_path: Path, celeba_root: Path) -> None:
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    source = celeba_root / "celeba"
    (tmp_path / "celeba" / "list_eval_partition.txt").write_bytes(
        (source / "list_eval_partition.txt").read_bytes()
    )
    for name in ("000001.jpg", "000003.jpg"):
        (folder / name).write_bytes((source / "img_align_celeba" / name).read_bytes())
    with pytest.raises(DatasetNotFoundError, match="000002.jpg") as info:
        load_dataset("celeba", root=tmp_path)
    assert "000001.jpg" not in str(info.value).split("\n")[0]
    with pytest.raises(DatasetNotFoundError, match="000005.jpg"):
        load_dataset("celeba", "heldout", root=tmp_path)


def test_celeba_missing_partition_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("celeba", root=tmp_path)
    assert str(tmp_path / "celeba" / "list_eval_partition.txt") in str(info.value)
    assert "list_eval_partition.txt" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Corrupt or truncated files: the error names the file and says where to re-download it
# ---------------------------------------------------------------------------------------------


def _copy_cifar(cifar: dict, tmp_path: Path) -> Path:
    """A writable copy of the fake CIFAR-10 folder; returns the new root."""
    source = cifar["root"] / "cifar-10-batches-py"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return tmp_path


def test_truncated_cifar_batch_names_the_file_and_the_download(cifar: dict, tmp_path: Path):
    root = _copy_cifar(cifar, tmp_path)
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:5000])
    with pytest.raises(data.DatasetCorruptError) as info:
        load_dataset("cifar10", root=root)
    message = str(info.value)
    assert str(batch) in message and data.CIFAR_URL in message and "download it again" in message


def test_cifar_batch_of_other_content_names_the_file(cifar: dict, tmp_path: Path):
    root = _copy_cifar(cifar, tmp_path)
    batch = root / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({b"something": 1}))
    with pytest.raises(data.DatasetCorruptError, match="not a CIFAR-10 batch") as info:
        load_dataset("cifar10", "heldout", root=root)
    assert str(batch) in str(info.value) and data.CIFAR_URL in str(info.value)


def test_gz_that_is_not_gzip_names_the_file_and_the_download(tmp_path: Path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(data.DatasetCorruptError) as info:
        read_idx(path)
    assert str(path) in str(info.value) and data.MNIST_URL in str(info.value)


def test_truncated_gz_names_the_file(tmp_path: Path):
    write_idx(tmp_path / "full.gz", np.arange(500, dtype=np.uint8))
    cut = tmp_path / "cut.gz"
    cut.write_bytes((tmp_path / "full.gz").read_bytes()[:-12])
    with pytest.raises(data.DatasetCorruptError, match="gzip") as info:
        read_idx(cut)
    assert str(cut) in str(info.value)


def test_bad_idx_in_mnist_folder_fails_at_load_naming_the_file(cifar: dict, tmp_path: Path):
    root = _copy_cifar(cifar, tmp_path)
    write_mnist(root, cifar["mnist"], cifar["mnist_labels"], suffix="")
    labels = root / "mnist" / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])
    with pytest.raises(data.DatasetCorruptError, match="do not match") as info:
        load_dataset("cifar_mnist", root=root)
    assert str(labels) in str(info.value) and data.MNIST_URL in str(info.value)


def test_celeba_partition_without_training_rows_names_the_file(tmp_path: Path, celeba_root):
    (tmp_path / "celeba").mkdir()
    (tmp_path / "celeba" / "img_align_celeba").symlink_to(
        celeba_root / "celeba" / "img_align_celeba"
    )
    part = tmp_path / "celeba" / "list_eval_partition.txt"
    part.write_text("000004.jpg 1\n000005.jpg 2\n")
    with pytest.raises(data.DatasetCorruptError, match="no images of partition 0") as info:
        load_dataset("celeba", root=tmp_path)
    assert str(part) in str(info.value) and data.CELEBA_URL in str(info.value)


def test_unreadable_celeba_image_names_the_file(tmp_path: Path):
    path = tmp_path / "000001.jpg"
    path.write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(data.DatasetCorruptError) as info:
        data.celeba_image(path, 64)
    assert str(path) in str(info.value) and data.CELEBA_URL in str(info.value)
