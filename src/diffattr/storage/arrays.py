"""On-disk array store: memory-mapped ``.npy`` arrays beside a JSON sidecar of every setting.

A store is a directory::

    meta.json          {"format_version", "settings", "arrays": {name: {"shape", "dtype"}},
                        "complete"}
    <name>.npy         one array per name (``np.load(path, mmap_mode="r")`` reads it)
    <name>.done.npy    uint8 [rows]: 1 where row ``i`` (first axis) has been written

A stage opens its store with the settings that determine the numbers. Reopening with identical
settings and array specs resumes (``pending`` lists the rows still to compute); anything else is
refused with :class:`StoreMismatchError`, never silently mixed. Rows are flushed before they are
marked done, so a crash can lose work in progress but never marks unwritten rows as done.

Every memory-mapped file gets its disk blocks reserved when it is created
(:func:`create_memmap`): a write through a memory map into a full filesystem would kill the
process with SIGBUS, so running out of space must happen here, as an :class:`OutOfSpaceError`
naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
META_FILE = "meta.json"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class StoreMismatchError(ValueError):
    """An existing store was made with other settings or array specs than requested."""


class StoreIncompleteError(RuntimeError):
    """A store is missing rows, or was never marked complete."""


class OutOfSpaceError(OSError):
    """No room on disk (or over the file-size limit) for a file; names the file and says that
    finished work is kept."""

    def __str__(self) -> str:
        return str(self.args[0])


# "No space left on device", "File too large" (ulimit -f), "Disk quota exceeded".
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def out_of_space(path: Path, err: OSError, needed: int | None = None) -> OutOfSpaceError:
    """The error for running out of space while writing `path`."""
    size = f" ({needed / 2**20:.1f} MiB needed)" if needed else ""
    error = OutOfSpaceError(
        f"no space left to write {path}{size}: {err.strerror or err}. Finished work is kept "
        f"(completed rows, stores and checkpoints stay on disk): free space on that disk, or "
        f"lift the file-size limit, and rerun the stage; it resumes where it stopped."
    )
    error.errno, error.filename = err.errno, str(path)
    return error


@contextlib.contextmanager
def naming_space_errors(path: Path, needed: int | None = None):
    """Turn "no space" / "file too large" OSErrors raised inside into OutOfSpaceError(path)."""
    try:
        yield
    except OutOfSpaceError:
        raise
    except OSError as err:
        if err.errno not in SPACE_ERRNOS:
            raise
        raise out_of_space(path, err, needed) from err


def create_memmap(path: str | Path, shape: tuple[int, ...], dtype: str | np.dtype) -> np.memmap:
    """A new zero-filled ``.npy`` file at ``path``, memory-mapped read-write, disk blocks reserved.

    Raises OutOfSpaceError naming ``path`` (and removes the partial file) when the disk or the
    file-size limit has no room for it; later writes through the map cannot run out of space.
    """
    path, dtype = Path(path), np.dtype(dtype)
    needed = int(np.prod(shape)) * dtype.itemsize
    try:
        with naming_space_errors(path, needed):
            array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
            _reserve_blocks(path)
    except OutOfSpaceError:
        path.unlink(missing_ok=True)
        raise
    return array


def _reserve_blocks(path: Path) -> None:
    """Allocate every block of the (sparse) file at path; a no-op where unsupported."""
    if not hasattr(os, "posix_fallocate"):  # pragma: no cover - macOS, Windows
        return
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size:
            os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Settings and specs


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (torch.dtype, np.dtype)):
        return str(value)
    raise TypeError(f"setting of type {type(value).__name__} is not JSON-serialisable: {value!r}")


def normalise_settings(settings: dict) -> dict:
    """JSON round trip of ``settings``: tuples become lists, numpy scalars/arrays Python values.

    Raises TypeError for values JSON cannot hold and ValueError for NaN/inf.
    """
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a dict, got {type(settings).__name__}")
    try:
        text = json.dumps(settings, default=_json_default, allow_nan=False, sort_keys=True)
    except ValueError as err:
        raise ValueError(f"settings must not contain NaN or infinity: {err}") from err
    return json.loads(text)


def _normalise_specs(arrays: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, dict]:
    """``{name: (shape, dtype)}`` -> ``{name: {"shape": [...], "dtype": "float32"}}``."""
    if not isinstance(arrays, dict) or not arrays:
        raise ValueError("arrays must be a non-empty dict {name: (shape, dtype)}")
    specs = {}
    for name, spec in arrays.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"array name {name!r} must be a Python identifier (letters, digits, _)"
            )
        try:
            shape, dtype = spec
            shape = [int(n) for n in shape]
            dtype = np.dtype(dtype)
        except (TypeError, ValueError) as err:
            raise ValueError(f"array {name!r}: expected (shape, dtype), got {spec!r}") from err
        if not shape or min(shape) < 0:
            raise ValueError(
                f"array {name!r}: shape needs a row axis and no negative size: {shape}"
            )
        if dtype.hasobject or dtype.fields:
            raise ValueError(f"array {name!r}: only plain (non-object, unstructured) dtypes")
        specs[name] = {"shape": shape, "dtype": _dtype_name(dtype)}
    return specs


def _dtype_name(dtype: np.dtype) -> str:
    """'float32' where that names ``dtype`` exactly, else numpy's code ('>f4', '<U10')."""
    try:
        if np.dtype(dtype.name) == dtype:
            return dtype.name
    except TypeError:
        pass
    return dtype.str


def setting_differences(stored: Any, requested: Any, key: str = "") -> list[str]:
    """Lines ``key: stored X vs requested Y`` for every differing leaf (dicts compared by key)."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        lines = []
        for k in sorted(stored.keys() | requested.keys()):
            sub = f"{key}.{k}" if key else str(k)
            if k not in requested:
                lines.append(f"  {sub}: stored {json.dumps(stored[k])} vs requested (absent)")
            elif k not in stored:
                lines.append(f"  {sub}: stored (absent) vs requested {json.dumps(requested[k])}")
            else:
                lines += setting_differences(stored[k], requested[k], sub)
        return lines
    if stored != requested:
        return [f"  {key}: stored {json.dumps(stored)} vs requested {json.dumps(requested)}"]
    return []


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to a temporary file, then rename; OutOfSpaceError naming path if no room."""
    tmp = path.with_name(path.name + ".tmp")
    with naming_space_errors(path):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise StoreMismatchError(
            f"{meta_path} is not valid JSON ({err}); delete the directory {path} to recompute it"
        ) from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreMismatchError(
            f"store {path} has format version {meta.get('format_version')!r}, this code writes "
            f"{FORMAT_VERSION}; delete the directory {path} to recompute it, or use another path"
        )
    return meta


def _rows_summary(rows: np.ndarray, limit: int = 10) -> str:
    """'3 rows: 0, 5, 7' or '120 rows: 0, 1, ... (first 10)'."""
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    more = f", ... (first {limit} shown)" if len(rows) > limit else ""
    return f"{len(rows)} row{'s' if len(rows) != 1 else ''}: {shown}{more}"


# --------------------------------------------------------------------------------------------
# The store


class ArrayStore:
    """Named arrays written row block by row block, resumable; see the module docstring.

    Use :meth:`open` (not the constructor). ``settings`` is the JSON-normalised dict the store
    was opened with; ``specs`` maps each array name to ``{"shape": [...], "dtype": ...}``.
    """

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.settings: dict = meta["settings"]
        self.specs: dict[str, dict] = meta["arrays"]
        # Writable memmaps, opened on first write: a finished store can be inspected without
        # write permission (e.g. files linked read-only from a DVC cache).
        self._writable: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # ---- creating and reopening

    @classmethod
    def open(
        cls,
        path: str | Path,
        settings: dict,
        arrays: dict[str, tuple[tuple[int, ...], str]],
    ) -> ArrayStore:
        """Create the store at ``path``, or reopen it to resume if its settings and specs match.

        settings: JSON-serialisable dict of everything that determines the stored numbers.
        arrays: ``{name: (shape, dtype)}``; the first axis of each shape is its rows.
        Raises StoreMismatchError listing every differing setting / array spec.
        """
        path = Path(path)
        settings = normalise_settings(settings)
        specs = _normalise_specs(arrays)
        if (path / META_FILE).exists():
            meta = _read_meta(path)
            lines = setting_differences(meta["settings"], settings, "settings")
            lines += setting_differences(meta["arrays"], specs, "arrays")
            if lines:
                raise StoreMismatchError(
                    f"the store at {path} was made with other settings than requested:\n"
                    + "\n".join(lines)
                    + f"\nDelete the directory {path} to recompute it, or use another path."
                )
            return cls(path, meta)
        cls._check_creatable(path, specs)
        path.mkdir(parents=True, exist_ok=True)
        for name, spec in specs.items():
            _create(path / f"{name}.npy", spec["shape"], spec["dtype"])
            _create(path / f"{name}.done.npy", spec["shape"][:1], "uint8")
        meta = {"format_version": FORMAT_VERSION, "settings": settings, "arrays": specs}
        meta["complete"] = False
        # meta.json last: a directory without it is an interrupted creation, redone next time.
        write_json_atomic(path / META_FILE, meta)
        return cls(path, meta)

    @staticmethod
    def _check_creatable(path: Path, specs: dict[str, dict]) -> None:
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory")
        if path.is_dir():
            ours = {META_FILE + ".tmp"}
            for name in specs:
                ours |= {f"{name}.npy", f"{name}.done.npy"}
            foreign = sorted(p.name for p in path.iterdir() if p.name not in ours)
            if foreign:
                raise FileExistsError(
                    f"{path} exists, has no {META_FILE} and holds files that are not this "
                    f"store's ({', '.join(foreign[:5])}); delete it or use another path"
                )

    # ---- paths and lookups

    def _array_path(self, name: str) -> Path:
        return self.path / f"{name}.npy"

    def _mask_path(self, name: str) -> Path:
        return self.path / f"{name}.done.npy"

    def _check_name(self, name: str) -> None:
        if name not in self.specs:
            raise KeyError(f"no array {name!r} in store {self.path}; arrays: {sorted(self.specs)}")

    @property
    def names(self) -> list[str]:
        """Array names, in creation order."""
        return list(self.specs)

    # ---- writing

    def write(self, name: str, start: int, values: np.ndarray | torch.Tensor) -> None:
        """Write rows ``[start, start + len(values))`` of array ``name`` and mark them done.

        values: ``[n, *shape[1:]]``, numpy array or torch tensor (any device), of a dtype that
        casts to the array's dtype within its kind (e.g. float64 -> float32, not float -> int).
        Refuses (writing nothing) wrong shapes, out-of-range rows, and NaN/inf values.
        """
        self._check_name(name)
        spec = self.specs[name]
        shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
        values = _to_numpy(values)
        start = int(start)
        if values.ndim != len(shape) or values.shape[1:] != shape[1:]:
            row_shape = "".join(f", {d}" for d in shape[1:])
            raise ValueError(
                f"array {name!r}: expected values of shape [n{row_shape}] (rows of {list(shape)}),"
                f" got {list(values.shape)}"
            )
        n = values.shape[0]
        if start < 0 or start + n > shape[0]:
            raise ValueError(f"array {name!r}: rows [{start}, {start + n}) outside [0, {shape[0]})")
        if not np.can_cast(values.dtype, dtype, casting="same_kind"):
            raise ValueError(
                f"array {name!r}: expected values castable to {dtype.name}, got {values.dtype.name}"
            )
        if n == 0:
            return
        if values.dtype.kind in "fc":
            bad = ~np.isfinite(values.reshape(n, -1)).all(axis=1)
            if bad.any():
                rows = start + np.flatnonzero(bad)
                raise ValueError(
                    f"array {name!r}: NaN or infinite values in {_rows_summary(rows)}; "
                    "nothing was written"
                )
        rows = slice(start, start + n)
        data, done = self._open_writable(name)
        if done[rows].any():  # overwriting: unmark first, so a crash mid-write leaves them pending
            done[rows] = 0
            done.flush()
            self._set_complete_flag(False)
        data[rows] = values
        data.flush()
        self._mark_rows(name, rows)

    def _open_writable(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(data, done-mask) of array ``name``, memory-mapped read-write."""
        if name not in self._writable:
            self._writable[name] = (
                _load(self._array_path(name), "r+"),
                _load(self._mask_path(name), "r+"),
            )
        return self._writable[name]

    def _mark_rows(self, name: str, rows: slice) -> None:
        """Mark rows done, after their data was flushed."""
        done = self._open_writable(name)[1]
        done[rows] = 1
        done.flush()

    def _set_complete_flag(self, complete: bool) -> None:
        meta = _read_meta(self.path)
        if meta.get("complete") != complete:
            meta["complete"] = complete
            write_json_atomic(self.path / META_FILE, meta)

    # ---- progress

    def pending(self, name: str) -> np.ndarray:
        """Row indices of array ``name`` not yet written: int64 ``[n_pending]``, ascending."""
        self._check_name(name)
        return np.flatnonzero(_load(self._mask_path(name), "r") == 0)

    def is_complete(self, name: str | None = None) -> bool:
        """Whether every row of array ``name`` (of every array if None) has been written."""
        names = self.names if name is None else [name]
        for n in names:
            self._check_name(n)
        return all(len(self.pending(n)) == 0 for n in names)

    def missing(self) -> dict[str, np.ndarray]:
        """``{name: pending rows}`` for every array with rows still to write."""
        return {n: p for n in self.names if len(p := self.pending(n))}

    def mark_complete(self) -> None:
        """Record ``"complete": true`` in meta.json; StoreIncompleteError if rows are missing."""
        missing = self.missing()
        if missing:
            raise StoreIncompleteError(
                f"cannot mark store {self.path} complete, rows are missing:\n"
                + _missing_lines(missing)
            )
        self._set_complete_flag(True)

    # ---- reading

    def array(self, name: str) -> np.ndarray:
        """Read-only memmap of array ``name`` (rows not yet written read as zeros)."""
        self._check_name(name)
        return _load(self._array_path(name), "r")

    def __repr__(self) -> str:
        return f"ArrayStore({str(self.path)!r}, arrays={self.names})"


def _missing_lines(missing: dict[str, np.ndarray]) -> str:
    return "\n".join(f"  {name}: {_rows_summary(rows)}" for name, rows in missing.items())


def _create(path: Path, shape: list[int], dtype: str) -> None:
    """Create a zero-filled ``.npy`` file of ``shape`` and ``dtype``, its blocks reserved."""
    if 0 in shape:  # numpy cannot memory-map an empty array; write a plain .npy
        with naming_space_errors(path):
            np.save(path, np.zeros(shape, dtype=dtype))
        return
    create_memmap(path, tuple(shape), dtype).flush()


def _load(path: Path, mode: str) -> np.ndarray:
    """Memmap of a ``.npy`` file in ``mode`` ("r" or "r+"); a plain array if it is empty."""
    if not path.exists():
        raise StoreIncompleteError(
            f"{path} is missing from the store; delete the directory {path.parent} to recompute it"
        )
    try:
        array = np.load(path, mmap_mode=mode)
    except ValueError:  # older numpy cannot memory-map an empty array
        array = np.load(path)
    if mode == "r" and isinstance(array, np.ndarray):
        array.flags.writeable = False
    return array


def _to_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.dtype == torch.bfloat16:
            values = values.float()
        return values.cpu().numpy()
    return np.asarray(values)


def load_store(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Settings and read-only memmaps ``{name: array}`` of a complete store at ``path``.

    Raises FileNotFoundError if there is no store, StoreIncompleteError naming the missing
    rows if it is incomplete (rerunning the stage that writes it resumes it).
    """
    path = Path(path)
    if not (path / META_FILE).exists():
        what = "no directory" if not path.exists() else f"no {META_FILE} in the directory"
        raise FileNotFoundError(
            f"no array store at {path} ({what}); run the stage that creates it first"
        )
    meta = _read_meta(path)
    store = ArrayStore(path, meta)
    missing = store.missing()
    if missing:
        raise StoreIncompleteError(
            f"store {path} is incomplete, rows are missing:\n{_missing_lines(missing)}\n"
            "Rerun the stage that writes it: it resumes from the missing rows."
        )
    if not meta.get("complete"):
        raise StoreIncompleteError(
            f"store {path} has every row written but was never marked complete (its stage "
            "stopped before finishing); rerun that stage to finish it."
        )
    return meta["settings"], {name: store.array(name) for name in store.names}
