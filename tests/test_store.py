"""Tests of diffattr.store: create, write, resume, refuse mismatches, crash safety, load."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from diffattr.storage import arrays as store_module
from diffattr.storage.arrays import ArrayStore, StoreIncompleteError, StoreMismatchError, load_store

SETTINGS = {"method": "tracin", "checkpoints": (100, 200), "projection": {"kind": "sparse", "k": 8}}
ARRAYS = {"features": ((10, 8), "float32"), "norms": ((10,), "float64")}


@pytest.fixture
def path(tmp_path):
    return tmp_path / "grads"


def fill(store: ArrayStore) -> None:
    store.write("features", 0, np.ones((10, 8), dtype=np.float32))
    store.write("norms", 0, np.arange(10.0))


def test_create_writes_meta_and_npy_files(path):
    ArrayStore.open(path, SETTINGS, ARRAYS)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == store_module.FORMAT_VERSION
    assert meta["settings"]["checkpoints"] == [100, 200]
    assert meta["arrays"] == {
        "features": {"shape": [10, 8], "dtype": "float32"},
        "norms": {"shape": [10], "dtype": "float64"},
    }
    assert meta["complete"] is False
    assert np.load(path / "features.npy", mmap_mode="r").shape == (10, 8)


def test_write_then_reopen_resumes_with_data_kept(path):
    store = ArrayStore.open(path, SETTINGS, ARRAYS)
    assert list(store.pending("features")) == list(range(10))
    store.write("features", 2, np.full((3, 8), 2.5, dtype=np.float32))
    assert list(store.pending("features")) == [0, 1, 5, 6, 7, 8, 9]
    del store

    again = ArrayStore.open(path, SETTINGS, ARRAYS)
    assert list(again.pending("features")) == [0, 1, 5, 6, 7, 8, 9]
    assert list(again.pending("norms")) == list(range(10))
    np.testing.assert_array_equal(again.array("features")[2:5], 2.5)
    assert not again.is_complete() and not again.is_complete("features")
    again.write("features", 0, np.zeros((2, 8), dtype=np.float32))
    again.write("features", 5, np.zeros((5, 8), dtype=np.float32))
    assert again.is_complete("features") and not again.is_complete()


def test_settings_are_compared_after_json_round_trip(path):
    ArrayStore.open(path, SETTINGS, ARRAYS)
    same = {
        "method": "tracin",
        "checkpoints": [np.int64(100), 200],
        "projection": {"k": np.int32(8), "kind": "sparse"},
    }
    assert ArrayStore.open(path, same, ARRAYS).settings == json.loads(json.dumps(SETTINGS))


def test_settings_mismatch_is_refused_naming_the_key(path):
    ArrayStore.open(path, SETTINGS, ARRAYS)
    other = {**SETTINGS, "projection": {"kind": "sparse", "k": 16}, "damping": 0.1}
    with pytest.raises(StoreMismatchError) as err:
        ArrayStore.open(path, other, ARRAYS)
    message = str(err.value)
    assert "settings.projection.k: stored 8 vs requested 16" in message
    assert "settings.damping: stored (absent) vs requested 0.1" in message
    assert "method" not in message
    assert "Delete the directory" in message and "another path" in message
    assert isinstance(err.value, ValueError)


def test_array_spec_mismatch_is_refused(path):
    ArrayStore.open(path, SETTINGS, ARRAYS)
    with pytest.raises(StoreMismatchError, match=r"arrays\.features\.shape: stored \[10, 8\]"):
        ArrayStore.open(path, SETTINGS, {**ARRAYS, "features": ((10, 16), "float32")})
    with pytest.raises(StoreMismatchError, match='arrays.norms.dtype: stored "float64"'):
        ArrayStore.open(path, SETTINGS, {**ARRAYS, "norms": ((10,), "float32")})
    with pytest.raises(StoreMismatchError, match="arrays.extra: stored \\(absent\\)"):
        ArrayStore.open(path, SETTINGS, {**ARRAYS, "extra": ((10,), "int64")})


def test_torch_tensors_are_accepted(path):
    store = ArrayStore.open(path, SETTINGS, ARRAYS)
    store.write("features", 0, torch.arange(16.0).reshape(2, 8))
    store.write("features", 2, torch.ones(1, 8, dtype=torch.bfloat16, requires_grad=True))
    store.write("norms", 0, torch.tensor([1.5, 2.5], dtype=torch.float64))
    np.testing.assert_array_equal(store.array("features")[1], np.arange(8.0, 16.0))
    np.testing.assert_array_equal(store.array("features")[2], 1.0)
    np.testing.assert_array_equal(store.array("norms")[:2], [1.5, 2.5])


def test_nan_values_are_refused_and_nothing_written(path):
    store = ArrayStore.open(path, SETTINGS, ARRAYS)
    values = np.ones((4, 8), dtype=np.float32)
    values[1, 3] = np.nan
    values[3, 0] = np.inf
    with pytest.raises(ValueError, match=r"'features'.*2 rows: 4, 6"):
        store.write("features", 3, values)
    assert list(store.pending("features")) == list(range(10))
    assert not store.array("features").any()


def test_bad_shapes_dtypes_rows_and_names_are_refused(path):
    store = ArrayStore.open(path, SETTINGS, ARRAYS)
    with pytest.raises(ValueError, match=r"expected values of shape \[n, 8\].*got \[2, 7\]"):
        store.write("features", 0, np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected values of shape \[n\].*got \[2, 1\]"):
        store.write("norms", 0, np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"rows \[9, 11\) outside \[0, 10\)"):
        store.write("norms", 9, np.zeros(2))
    with pytest.raises(ValueError, match="castable to float32, got complex128"):
        store.write("features", 0, np.zeros((1, 8), dtype=np.complex128))
    with pytest.raises(KeyError, match=r"no array 'grads'.*\['features', 'norms'\]"):
        store.write("grads", 0, np.zeros((1, 8)))
    with pytest.raises(KeyError, match="features"):
        store.pending("grads")
    assert store.missing().keys() == {"features", "norms"}


def test_incomplete_store_is_refused_by_load_store_naming_missing_rows(path):
    store = ArrayStore.open(path, SETTINGS, ARRAYS)
    store.write("features", 0, np.ones((7, 8), dtype=np.float32))
    with pytest.raises(StoreIncompleteError) as err:
        load_store(path)
    message = str(err.value)
    assert "features: 3 rows: 7, 8, 9" in message
    assert "norms: 10 rows: 0, 1, 2" in message
    assert "Rerun the stage" in message and "resumes" in message
    with pytest.raises(StoreIncompleteError, match="features: 3 rows"):
        store.mark_complete()


def test_store_with_every_row_but_no_complete_flag_is_refused(path):
    fill(ArrayStore.open(path, SETTINGS, ARRAYS))
    with pytest.raises(StoreIncompleteError, match="never marked complete"):
        load_store(path)


def test_complete_store_loads_as_read_only_memmaps(path):
    store = ArrayStore.open(path, SETTINGS, ARRAYS)
    fill(store)
    store.mark_complete()
    assert json.loads((path / "meta.json").read_text())["complete"] is True
    settings, arrays = load_store(path)
    assert settings == json.loads(json.dumps(SETTINGS))
    assert isinstance(arrays["features"], np.memmap) and arrays["features"].dtype == np.float32
    np.testing.assert_array_equal(arrays["norms"], np.arange(10.0))
    with pytest.raises(ValueError):
        arrays["norms"][0] = 1.0  # read-only
    np.testing.assert_array_equal(np.load(path / "features.npy", mmap_mode="r"), 1.0)
    np.testing.assert_array_equal(np.load(path / "norms.npy"), np.arange(10.0))


def test_load_store_without_a_store_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no array store.*run the stage"):
        load_store(tmp_path / "nowhere")


def test_simulated_crash_between_data_and_mask_leaves_rows_pending(path, monkeypatch):
    store = ArrayStore.open(path, SETTINGS, ARRAYS)
    store.write("norms", 0, np.arange(3.0))

    def crash(self, name, rows):
        raise KeyboardInterrupt("killed after the data flush, before the mask")

    monkeypatch.setattr(ArrayStore, "_mark_rows", crash)
    with pytest.raises(KeyboardInterrupt):
        store.write("norms", 3, np.full(4, 9.0))
    monkeypatch.undo()
    del store

    resumed = ArrayStore.open(path, SETTINGS, ARRAYS)
    assert list(resumed.pending("norms")) == list(range(3, 10))
    np.testing.assert_array_equal(resumed.array("norms")[:3], np.arange(3.0))


def test_overwriting_done_rows_unmarks_them_until_rewritten(path, monkeypatch):
    store = ArrayStore.open(path, SETTINGS, ARRAYS)
    fill(store)
    store.mark_complete()
    monkeypatch.setattr(ArrayStore, "_mark_rows", lambda self, name, rows: None)
    store.write("norms", 4, np.zeros(2))  # a crash after the data write, before marking
    assert list(store.pending("norms")) == [4, 5]
    assert json.loads((path / "meta.json").read_text())["complete"] is False


def test_interrupted_creation_is_redone_but_foreign_files_are_kept(path, tmp_path):
    path.mkdir()
    (path / "features.npy").write_bytes(b"half-written")  # no meta.json: creation was cut off
    store = ArrayStore.open(path, SETTINGS, ARRAYS)
    assert len(store.pending("features")) == 10
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        ArrayStore.open(other, SETTINGS, ARRAYS)


def test_bad_settings_and_specs_are_refused(path):
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        ArrayStore.open(path, {"model": object()}, ARRAYS)
    with pytest.raises(ValueError, match="NaN"):
        ArrayStore.open(path, {"damping": float("nan")}, ARRAYS)
    with pytest.raises(ValueError, match="identifier"):
        ArrayStore.open(path, SETTINGS, {"bad name": ((3,), "float32")})
    with pytest.raises(ValueError, match="row axis"):
        ArrayStore.open(path, SETTINGS, {"scalar": ((), "float32")})
    assert not path.exists()


def test_empty_arrays_are_complete(path):
    store = ArrayStore.open(path, SETTINGS, {"none": ((0, 4), "float32")})
    assert store.is_complete()
    store.mark_complete()
    _, arrays = load_store(path)
    assert arrays["none"].shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# A full disk: an exception naming the file (not a SIGBUS), finished work kept


def _full_disk(monkeypatch):
    """Make every block reservation fail as on a full filesystem."""

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "posix_fallocate", no_space)


def test_full_disk_at_store_creation_names_the_file_and_keeps_finished_work(tmp_path, monkeypatch):
    finished = ArrayStore.open(tmp_path / "finished", SETTINGS, ARRAYS)
    fill(finished)
    finished.mark_complete()
    _full_disk(monkeypatch)
    with pytest.raises(store_module.OutOfSpaceError) as info:
        ArrayStore.open(tmp_path / "next", SETTINGS, ARRAYS)
    message = str(info.value)
    assert str(tmp_path / "next" / "features.npy") in message
    assert "Finished work is kept" in message and "rerun" in message
    assert info.value.errno == errno.ENOSPC
    assert not (tmp_path / "next" / "features.npy").exists()  # no partial file left behind
    assert load_store(tmp_path / "finished")[1]["norms"].tolist() == list(np.arange(10.0))
    monkeypatch.undo()  # space freed: the rerun creates the store
    ArrayStore.open(tmp_path / "next", SETTINGS, ARRAYS)


def test_store_files_are_preallocated_not_sparse(path):
    store = ArrayStore.open(path, SETTINGS, {"big": ((256, 1024), "float32")})
    stat = (store.path / "big.npy").stat()
    assert stat.st_blocks * 512 >= 256 * 1024 * 4


@pytest.mark.skipif(not hasattr(__import__("resource"), "RLIMIT_FSIZE"), reason="POSIX only")
def test_file_size_limit_gives_an_error_naming_the_file_not_a_dead_process(tmp_path):
    code = textwrap.dedent(
        f"""
        import resource
        from diffattr.storage.arrays import ArrayStore
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        ArrayStore.open({str(tmp_path / "store")!r}, {{}}, {{"big": ((1024, 1024), "float32")}})
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr  # an exception, not a signal
    assert "OutOfSpaceError" in done.stderr and str(tmp_path / "store" / "big.npy") in done.stderr
    assert "Finished work is kept" in done.stderr


def test_full_disk_when_saving_a_checkpoint_names_it(tmp_path, monkeypatch):
    from diffattr.storage import checkpoints

    def no_space(payload, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", no_space)
    with pytest.raises(store_module.OutOfSpaceError, match="step_0000010.pt"):
        checkpoints.save_checkpoint(tmp_path / "step_0000010.pt", {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_replay_log_memmaps_are_preallocated(tmp_path, monkeypatch):
    from diffattr.diffusion.replay import ReplayLog

    _full_disk(monkeypatch)
    with pytest.raises(store_module.OutOfSpaceError, match="replay_step.npy"):
        ReplayLog.empty(100, 8, {}, folder=tmp_path)
