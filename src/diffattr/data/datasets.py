"""Image datasets for attribution experiments, all as float32 tensors in [-1, 1].

Every loader returns an :class:`ImageDataset` whose ``ids`` are stable across runs and across
subsets, so that scores, gradient stores and retraining subsets can refer to training samples
by id rather than by row position.

Datasets (``load_dataset(name, split)``; ``split`` is ``"train"`` or ``"heldout"``):

- ``digits`` (default, no download): scikit-learn's 1797 bundled 8x8 digits. A permutation from
  ``default_rng(seed)`` puts its first 197 images in heldout, the other 1600 in train.
  ids = index in ``load_digits()``.
- ``digits_outliers``: the digits train split plus 64 outliers (train only): grayscale patches of
  scikit-learn's bundled sample photographs (china.jpg, flower.jpg), ids ``100_000 + k``,
  label -1. Heldout is the digits heldout split. More complex than the digits.
- ``digits_outliers_flat``: the same with 64 constant images instead (one grey level each,
  simpler than the digits; :func:`diffattr.data.outliers.flat_images`).
- ``cifar10``: CIFAR-10 python batches; ids = index in the concatenated train batches
  (0..49999), ``50_000 + index`` for the test batch (heldout).
- ``cifar2``: automobile (label 1) and horse (label 7) of CIFAR-10, labels and ids kept from
  CIFAR-10; train = 2500 per class drawn with ``default_rng(seed)``, heldout = those classes of
  the test batch.
- ``cifar_mnist``: all CIFAR-10 train airplanes (label 0) plus 200 MNIST zeros drawn with
  ``default_rng(seed)`` (ids ``200_000 + MNIST index``, label 0, outliers), MNIST upsampled to
  32x32 and repeated to 3 channels. Heldout = CIFAR-10 test airplanes.
- ``celeba``: CelebA aligned images, centre-cropped to 140x140 and resized (native 64);
  ids = int(file stem); train = partition 0, heldout = partition 2.

Where a loader draws a fixed number of samples (2500 per class, 200 MNIST zeros) it takes
``min(requested, available)``, so that small files in the same formats load too (tests); the
requested numbers are keyword-only private parameters of the internal loaders.

Whenever a loader returns images at another size than the native one, they are resized with
:func:`resize_images` (bilinear, antialiased when shrinking).
"""

from __future__ import annotations

import difflib
import functools
import gzip
import os
import pickle
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffattr.data.outliers import outlier_images, outlier_patches  # noqa: F401 (re-export)

DATASET_NAMES: tuple[str, ...] = (
    "digits",
    "digits_outliers",
    "digits_outliers_flat",
    "cifar10",
    "cifar2",
    "cifar_mnist",
    "celeba",
)
SPLITS: tuple[str, ...] = ("train", "heldout")

_NATIVE_SIZE = {
    "digits": 8,
    "digits_outliers": 8,
    "digits_outliers_flat": 8,
    "cifar10": 32,
    "cifar2": 32,
    "cifar_mnist": 32,
    "celeba": 64,
}

DIGITS_N_HELDOUT = 197
OUTLIER_ID_OFFSET = 100_000
CIFAR_TEST_ID_OFFSET = 50_000
MNIST_ID_OFFSET = 200_000
CELEBA_CROP = 140

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"

_MAX_LISTED = 10  # how many unknown ids / missing files an error message names


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message names the expected paths and their source."""


class DatasetCorruptError(ValueError):
    """A dataset file is truncated, corrupt or not what its name says; the message names the
    file and where to download it again."""


def _corrupt(path: Path, problem: str, source: str) -> DatasetCorruptError:
    """The error for an unreadable dataset file: what is wrong, and to re-download it."""
    return DatasetCorruptError(
        f"{path} is corrupt or truncated ({problem}). Delete it and download it again from "
        f"{source} (an interrupted download or unpacking leaves such files)."
    )


# ---------------------------------------------------------------------------------------------
# The dataset container
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images with stable ids.

    images: float32 [N, C, H, W] in [-1, 1]. ids: int64 [N], unique; a subset keeps the ids of
    the full set. labels: int64 [N], class label, -1 when none. is_outlier: bool [N].
    The id/label/outlier arrays are stored as read-only copies. Equality is identity
    (``eq=False``): comparing tensors element-wise has no single truth value.
    """

    name: str
    images: torch.Tensor
    ids: np.ndarray
    labels: np.ndarray
    is_outlier: np.ndarray

    def __post_init__(self) -> None:
        _check_images(self.images)
        n = self.images.shape[0]
        object.__setattr__(self, "ids", _frozen_vector(self.ids, "ids", n, np.int64))
        object.__setattr__(self, "labels", _frozen_vector(self.labels, "labels", n, np.int64))
        object.__setattr__(
            self, "is_outlier", _frozen_vector(self.is_outlier, "is_outlier", n, np.bool_)
        )
        if np.unique(self.ids).size != n:
            raise ValueError(f"dataset {self.name!r}: ids are not unique")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @functools.cached_property
    def _id_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(argsort of ids, sorted ids), computed once: the lookup table of positions()."""
        return _sorted_index(self.ids)

    def positions(self, ids: int | Iterable[int] | np.ndarray) -> np.ndarray:
        """Row positions (int64 [k]) of the given ids, in the order given.

        Raises KeyError naming (up to 10 of) the ids not in this dataset.
        """
        wanted = _as_id_array(ids)
        pos, found = find_ids(self.ids, wanted, self._id_index)
        if not found.all():
            missing = np.unique(wanted[~found])
            shown = ", ".join(str(i) for i in missing[:_MAX_LISTED])
            more = f" and {missing.size - _MAX_LISTED} more" if missing.size > _MAX_LISTED else ""
            raise KeyError(
                f"{missing.size} id(s) not in dataset {self.name!r} "
                f"(its ids span {self.ids.min() if len(self) else '-'}.."
                f"{self.ids.max() if len(self) else '-'}): {shown}{more}"
            )
        return pos

    def subset(self, ids: int | Iterable[int] | np.ndarray) -> ImageDataset:
        """The samples with the given ids, in the order given; ids are kept.

        Raises KeyError for unknown ids, ValueError for repeated ids.
        """
        pos = self.positions(ids)
        if np.unique(pos).size != pos.size:
            raise ValueError("subset: ids must not repeat")
        return ImageDataset(
            name=self.name,
            images=self.images[torch.from_numpy(pos)],
            ids=self.ids[pos],
            labels=self.labels[pos],
            is_outlier=self.is_outlier[pos],
        )


def _check_images(images: torch.Tensor, chunk: int = 4096) -> None:
    """ValueError unless images is a float32 [N, C, H, W] tensor, finite and in [-1, 1].

    Checked in chunks of rows so that a large set (CelebA) needs no full-size temporary.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.float32 or images.ndim != 4:
        raise ValueError(
            f"images must be float32 [N, C, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    for start in range(0, images.shape[0], chunk):
        low, high = torch.aminmax(images[start : start + chunk])  # NaN propagates
        if torch.isnan(low) or torch.isnan(high):
            raise ValueError("images contain NaN values")
        if not (low >= -1.0 and high <= 1.0):  # also catches +-inf
            raise ValueError(f"images must lie in [-1, 1], found [{low:.4g}, {high:.4g}]")


def _frozen_vector(values: np.ndarray, what: str, n: int, dtype: type) -> np.ndarray:
    """A read-only copy of a 1-D array of length n, of integer (or bool) kind, cast to dtype."""
    arr = np.asarray(values)
    if arr.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {arr.shape}")
    kind_ok = arr.dtype == np.bool_ if dtype is np.bool_ else np.issubdtype(arr.dtype, np.integer)
    if not kind_ok and n > 0:
        raise ValueError(f"{what} must be {np.dtype(dtype).name}, got {arr.dtype}")
    out = arr.astype(dtype, copy=True)
    out.flags.writeable = False
    return out


def find_ids(
    ids: np.ndarray, wanted: np.ndarray, index: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions in `ids` [N] of each id in `wanted` [k], and whether it was found.

    index: (argsort of ids, sorted ids) when already computed. Returns (int64 [k], bool [k]);
    a position where found is False is meaningless.
    """
    order, sorted_ids = index if index is not None else _sorted_index(ids)
    if not len(ids):
        return np.zeros(len(wanted), np.int64), np.zeros(len(wanted), bool)
    slot = np.clip(np.searchsorted(sorted_ids, wanted), 0, len(ids) - 1)
    return order[slot].astype(np.int64), sorted_ids[slot] == wanted


def _sorted_index(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, kind="stable")
    return order, ids[order]


def _as_id_array(ids: int | Iterable[int] | np.ndarray) -> np.ndarray:
    """ids (an int, a sequence or an array of integers) as int64 [k]."""
    if isinstance(ids, torch.Tensor):
        arr = ids.detach().cpu().numpy()
    elif isinstance(ids, (int, np.integer, np.ndarray)):
        arr = np.asarray(ids)
    else:
        arr = np.asarray(list(ids))
    arr = arr.ravel()
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):  # bool is not an integer dtype here
        raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def load_dataset(
    name: str,
    split: str = "train",
    root: str | Path = "data/raw",
    *,
    image_size: int | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> ImageDataset:
    """Load one split of a dataset as float32 [N, C, image_size, image_size] in [-1, 1].

    name: one of DATASET_NAMES. split: "train" or "heldout". root: folder holding the raw
    downloads (unused by the bundled digits sets). image_size: None = the native size (8 for
    digits, 32 for CIFAR, 64 for CelebA), else bilinear resize. seed: drives every random
    choice (digits split, outlier patches, CIFAR-2 and MNIST draws). limit: keep only the
    first `limit` samples (in the loaded order; ids are kept) — for smoke runs.
    Raises ValueError for an unknown name or split, DatasetNotFoundError for missing files.
    """
    if name not in _LOADERS:
        raise ValueError(_unknown_name_message(name))
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if image_size is not None and (
        isinstance(image_size, bool)
        or not isinstance(image_size, (int, np.integer))
        or image_size < 1
    ):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    if limit is not None and (not isinstance(limit, int | np.integer) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    size = _NATIVE_SIZE[name] if image_size is None else image_size
    dataset = _LOADERS[name](split, Path(root), seed, int(size))
    return dataset if limit is None else dataset.subset(dataset.ids[:limit])


def dataset_size(
    name: str,
    split: str = "train",
    root: str | Path = "data/raw",
    *,
    seed: int = 0,
    limit: int | None = None,
) -> int:
    """Number of images `load_dataset` returns with these arguments (CelebA counted from its
    partition file, without decoding images)."""
    if name == "celeba":
        part_file = Path(root) / "celeba" / "list_eval_partition.txt"
        if not part_file.is_file():
            raise DatasetNotFoundError(f"CelebA not found: missing {part_file}\n"
                                       + _celeba_help(Path(root)))
        wanted = _CELEBA_PARTITION[split]
        n = sum(p == wanted for p in read_celeba_partition(part_file).values())
    else:
        n = len(load_dataset(name, split, root, seed=seed))
    return n if limit is None else min(n, limit)


def _unknown_name_message(name: str) -> str:
    """Error text for an unknown dataset name, with a close match when there is one."""
    message = f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}"
    close = difflib.get_close_matches(str(name), DATASET_NAMES, n=1)
    return message + (f" (did you mean {close[0]!r}?)" if close else "")


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float [N, C, H, W] to [N, C, size, size], bilinear (half-pixel centres).

    Antialiased when shrinking; the result is clamped to [-1, 1] (bilinear weights are convex,
    the clamp only removes float rounding). Returns the input unchanged at the same size.
    """
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    shrinking = size < h or size < w
    out = F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking
    )
    return out.clamp_(-1.0, 1.0)


def _uint8_to_unit(array: np.ndarray) -> torch.Tensor:
    """uint8 array (any shape) -> float32 tensor in [-1, 1] (0 -> -1, 255 -> 1)."""
    return torch.from_numpy(np.ascontiguousarray(array)).float().div_(127.5).sub_(1.0)


def _make(
    name: str,
    images: torch.Tensor,
    ids: np.ndarray,
    labels: np.ndarray,
    is_outlier: np.ndarray | None = None,
    size: int | None = None,
) -> ImageDataset:
    """Assemble (and resize to size, when given) a dataset; validation is ImageDataset's."""
    if size is not None:
        images = resize_images(images, size)
    if is_outlier is None:
        is_outlier = np.zeros(len(ids), dtype=bool)
    return ImageDataset(name, images.contiguous(), ids, labels, is_outlier)


# ---------------------------------------------------------------------------------------------
# digits, digits_outliers and digits_outliers_flat (bundled with scikit-learn)
# ---------------------------------------------------------------------------------------------


def _digits_split_ids(n: int, split: str, seed: int) -> np.ndarray:
    """Sorted load_digits indices of the split: heldout = the first 197 of a seeded permutation."""
    perm = np.random.default_rng(seed).permutation(n)
    chosen = perm[:DIGITS_N_HELDOUT] if split == "heldout" else perm[DIGITS_N_HELDOUT:]
    return np.sort(chosen)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, read once: (float64 images [1797, 8, 8] in 0..16, labels [1797])."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = bunch.images.copy(), bunch.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _load_digits(
    split: str, root: Path, seed: int, size: int, *, name: str = "digits"
) -> ImageDataset:
    """scikit-learn digits, values 0..16 mapped to [-1, 1] by x / 8 - 1; [N, 1, 8, 8]."""
    all_images, all_labels = _digits_arrays()
    ids = _digits_split_ids(len(all_labels), split, seed)
    images = torch.from_numpy(all_images[ids].astype(np.float32) / 8.0 - 1.0)[:, None]
    return _make(name, images, ids, all_labels[ids], size=size)


def _load_digits_outliers(
    split: str,
    root: Path,
    seed: int,
    size: int,
    *,
    kind: str = "photo",
    n_outliers: int = 64,
) -> ImageDataset:
    """digits plus n_outliers outliers of `kind` (photo | flat) appended to the train split
    (ids 100_000 + k, label -1); heldout is the digits heldout split."""
    name = "digits_outliers" if kind == "photo" else f"digits_outliers_{kind}"
    base = _load_digits(split, root, seed, 8, name=name)
    if split == "heldout":
        return _make(base.name, base.images, base.ids, base.labels, size=size)
    outliers = outlier_images(kind, n_outliers, seed)
    return _make(
        base.name,
        torch.cat([base.images, outliers]),
        np.concatenate([base.ids, OUTLIER_ID_OFFSET + np.arange(n_outliers)]),
        np.concatenate([base.labels, np.full(n_outliers, -1)]),
        np.concatenate([np.zeros(len(base), bool), np.ones(n_outliers, bool)]),
        size=size,
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-2
# ---------------------------------------------------------------------------------------------


def _cifar_dir(root: Path) -> Path:
    return root / "cifar-10-batches-py"


def _cifar_missing(paths: list[Path], root: Path) -> DatasetNotFoundError:
    """The error for missing CIFAR-10 files, with how to get them."""
    listed = "\n  ".join(str(p) for p in paths)
    return DatasetNotFoundError(
        f"CIFAR-10 not found; missing:\n  {listed}\n"
        f"Download the python version from {CIFAR_URL} and unpack it into {root} "
        f"(tar -xzf cifar-10-python.tar.gz -C {root}), which creates {_cifar_dir(root)} with "
        "data_batch_1..5 and test_batch."
    )


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 [n, 3, 32, 32], int64 labels [n]).

    The file is a pickled dict with b"data" (uint8 [n, 3072], row-major R, G, B planes) and
    b"labels" (n ints). Only open files from the official source: unpickling runs code.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise _corrupt(path, f"{type(err).__name__}: {err}", CIFAR_URL) from err
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise _corrupt(path, "not a CIFAR-10 batch: no b'data'/b'labels'", CIFAR_URL) from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        problem = f"data must be uint8 [n, 3072], got {data.dtype} {list(data.shape)}"
        raise _corrupt(path, problem, CIFAR_URL)
    if labels.shape != (data.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise _corrupt(path, f"labels must be n={data.shape[0]} ints in 0..9", CIFAR_URL)
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 images [n, 3, 32, 32], labels [n], ids [n]) of the CIFAR-10 train or test set."""
    folder = _cifar_dir(root)
    names = ["test_batch"] if split == "heldout" else [f"data_batch_{i}" for i in range(1, 6)]
    paths = [folder / n for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise _cifar_missing([folder] if not folder.is_dir() else missing, root)
    parts = [read_cifar_batch(p) for p in paths]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    offset = CIFAR_TEST_ID_OFFSET if split == "heldout" else 0
    return images, labels, offset + np.arange(len(labels), dtype=np.int64)


def _load_cifar10(split: str, root: Path, seed: int, size: int) -> ImageDataset:
    """All of CIFAR-10's train (50000) or test (10000) images, [N, 3, 32, 32]."""
    images, labels, ids = _read_cifar_split(root, split)
    return _make("cifar10", _uint8_to_unit(images), ids, labels, size=size)


def _load_cifar2(
    split: str, root: Path, seed: int, size: int, *, n_per_class: int = 2500
) -> ImageDataset:
    """CIFAR-10 automobiles (1) and horses (7); train draws min(n_per_class, available) each.

    The draw uses ``default_rng(seed)`` (automobiles first); rows are sorted by id.
    Heldout = all test images of the two classes.
    """
    images, labels, ids = _read_cifar_split(root, split)
    keep = np.flatnonzero(np.isin(labels, (1, 7)))
    if split == "train":
        rng = np.random.default_rng(seed)
        keep = np.sort(
            np.concatenate([_draw(rng, np.flatnonzero(labels == c), n_per_class) for c in (1, 7)])
        )
    return _make("cifar2", _uint8_to_unit(images[keep]), ids[keep], labels[keep], size=size)


def _draw(rng: np.random.Generator, pool: np.ndarray, n: int) -> np.ndarray:
    """min(n, len(pool)) distinct elements of pool, drawn without replacement."""
    return rng.choice(pool, size=min(n, pool.size), replace=False)


# ---------------------------------------------------------------------------------------------
# MNIST (IDX files) and CIFAR-MNIST
# ---------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(
    path: str | Path, expected_magic: int | None = None, source: str = MNIST_URL
) -> np.ndarray:
    """Parse an IDX file (MNIST format; gzip when the name ends in .gz) into an array.

    Header: big-endian magic (two zero bytes, a type code, the number of dims; 2051 for MNIST
    images, 2049 for labels), then one big-endian uint32 per dim, then the data, row-major.
    Returns the data in its native numeric type (uint8 for MNIST), shape = the dims.
    A truncated, corrupt or non-IDX file raises DatasetCorruptError naming it and `source`.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise _corrupt(path, f"not a complete gzip file: {err}", source) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise _corrupt(path, "not an IDX file: bad magic number", source)
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise _corrupt(path, f"IDX magic number {magic}, expected {expected_magic}", source)
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise _corrupt(path, f"the IDX header of {ndim} dims is cut short", source)
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    dtype = _IDX_DTYPES[raw[2]]
    if len(raw) - start != int(np.prod(dims)) * dtype.itemsize:
        problem = f"{len(raw) - start} data bytes do not match the IDX dims {dims.tolist()}"
        raise _corrupt(path, problem, source)
    data = np.frombuffer(raw, dtype=dtype, offset=start).reshape(tuple(dims))
    return data.astype(dtype.newbyteorder("="))


def _mnist_file(root: Path, stem: str) -> Path:
    """root/mnist/stem, or stem.gz; DatasetNotFoundError naming both when neither exists."""
    folder = root / "mnist"
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(
        f"MNIST file not found: {folder / stem} (or {folder / stem}.gz)\n"
        f"Download train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz from the MNIST "
        f"mirror {MNIST_URL} (original: http://yann.lecun.com/exdb/mnist/) into {folder}; "
        "gzipped or unpacked files both work."
    )


def read_mnist_train(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST training set from root/mnist: (uint8 images [n, 28, 28], int64 labels [n])."""
    images = read_idx(_mnist_file(root, "train-images-idx3-ubyte"), expected_magic=2051)
    labels = read_idx(_mnist_file(root, "train-labels-idx1-ubyte"), expected_magic=2049)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"MNIST images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def _load_cifar_mnist(
    split: str, root: Path, seed: int, size: int, *, n_mnist: int = 200
) -> ImageDataset:
    """CIFAR-10 airplanes (label 0) plus, in train, min(n_mnist, available) MNIST zeros.

    MNIST zeros are drawn with ``default_rng(seed)`` (sorted by index), scaled to [-1, 1],
    bilinearly upsampled 28 -> 32 and repeated to 3 channels; ids 200_000 + MNIST index,
    label 0, is_outlier True. Heldout = CIFAR-10 test airplanes, no outliers.
    """
    images, labels, ids = _read_cifar_split(root, split)
    keep = np.flatnonzero(labels == 0)
    planes = _uint8_to_unit(images[keep])
    if split == "heldout":
        return _make("cifar_mnist", planes, ids[keep], labels[keep], size=size)
    mnist, mnist_labels = read_mnist_train(root)
    chosen = np.sort(_draw(np.random.default_rng(seed), np.flatnonzero(mnist_labels == 0), n_mnist))
    zeros = resize_images(_uint8_to_unit(mnist[chosen])[:, None], 32).expand(-1, 3, -1, -1)
    return _make(
        "cifar_mnist",
        torch.cat([planes, zeros]),
        np.concatenate([ids[keep], MNIST_ID_OFFSET + chosen]),
        np.zeros(keep.size + chosen.size, dtype=np.int64),
        np.concatenate([np.zeros(keep.size, bool), np.ones(chosen.size, bool)]),
        size=size,
    )


# ---------------------------------------------------------------------------------------------
# CelebA
# ---------------------------------------------------------------------------------------------

_CELEBA_PARTITION = {"train": 0, "heldout": 2}


def _celeba_help(root: Path) -> str:
    folder = root / "celeba"
    return (
        f"From the official CelebA page {CELEBA_URL} download 'Align&Cropped Images' "
        f"(img_align_celeba.zip) and unzip it into {folder}, so that "
        f"{folder / 'img_align_celeba' / '000001.jpg'} exists, and 'Eval/list_eval_partition.txt'"
        f" to {folder / 'list_eval_partition.txt'}."
    )


def read_celeba_partition(path: Path) -> dict[str, int]:
    """list_eval_partition.txt ("000001.jpg 0" per line) -> {file name: partition 0/1/2}."""
    partition: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            problem = f"line {number}: expected '<file>.jpg <0|1|2>', got {line!r}"
            raise _corrupt(path, problem, CELEBA_URL)
        partition[fields[0]] = int(fields[1])
    return partition


def celeba_image(path: Path, size: int) -> torch.Tensor:
    """One aligned CelebA jpg -> float32 [3, size, size] in [-1, 1].

    Centre crop of 140x140 (top = (H - 140) // 2, left = (W - 140) // 2; 39 and 19 for the
    178x218 aligned images), then :func:`resize_images`.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise _corrupt(path, f"not a readable image: {err}", CELEBA_URL) from err
    h, w = rgb.shape[:2]
    if h < CELEBA_CROP or w < CELEBA_CROP:
        raise ValueError(f"{path}: {w}x{h} is smaller than the {CELEBA_CROP}px crop")
    top, left = (h - CELEBA_CROP) // 2, (w - CELEBA_CROP) // 2
    crop = rgb[top : top + CELEBA_CROP, left : left + CELEBA_CROP].transpose(2, 0, 1)
    return resize_images(_uint8_to_unit(crop)[None], size)[0]


def _load_celeba(split: str, root: Path, seed: int, size: int) -> ImageDataset:
    """CelebA aligned images of partition 0 (train) or 2 (heldout), [N, 3, size, size].

    All listed images must exist (checked before decoding). Images are decoded one at a time
    into a preallocated tensor: memory is the result only (N * 3 * size**2 * 4 bytes).
    """
    folder = root / "celeba"
    img_dir, part_file = folder / "img_align_celeba", folder / "list_eval_partition.txt"
    for needed in (img_dir, part_file):
        if not needed.exists():
            raise DatasetNotFoundError(f"CelebA not found: missing {needed}\n{_celeba_help(root)}")
    wanted = _CELEBA_PARTITION[split]
    names = sorted(n for n, p in read_celeba_partition(part_file).items() if p == wanted)
    if not names:
        raise _corrupt(
            part_file, f"it lists no images of partition {wanted} ({split})", CELEBA_URL
        )
    present = set(os.listdir(img_dir))
    missing = [n for n in names if n not in present]
    if missing:
        shown = ", ".join(str(img_dir / n) for n in missing[:_MAX_LISTED])
        more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
        raise DatasetNotFoundError(
            f"{len(missing)} CelebA image(s) listed in {part_file} are missing: {shown}{more}\n"
            + _celeba_help(root)
        )
    images = torch.empty((len(names), 3, size, size), dtype=torch.float32)
    for row, name in enumerate(_progress(names, "celeba")):
        images[row] = celeba_image(img_dir / name, size)
    ids = np.array([int(Path(n).stem) for n in names], dtype=np.int64)
    return _make("celeba", images, ids, np.full(len(names), -1, dtype=np.int64))


def _progress(items: list[str], label: str) -> Iterable[str]:
    """items wrapped in a tqdm progress bar when there are many (and tqdm is installed)."""
    if len(items) < 2000:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but optional here
        return items
    return tqdm(items, desc=f"loading {label}", unit="img", mininterval=2.0)


_LOADERS: dict[str, Callable[[str, Path, int, int], ImageDataset]] = {
    "digits": _load_digits,
    "digits_outliers": _load_digits_outliers,
    "digits_outliers_flat": functools.partial(_load_digits_outliers, kind="flat"),
    "cifar10": _load_cifar10,
    "cifar2": _load_cifar2,
    "cifar_mnist": _load_cifar_mnist,
    "celeba": _load_celeba,
}
