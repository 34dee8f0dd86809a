"""Checkpoint files: written atomically, read back with a clear error when corrupt or mismatched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from diffattr.storage.arrays import (
    OutOfSpaceError,
    naming_space_errors,
    out_of_space,
    setting_differences,
)


def settings_hash(settings: dict) -> str:
    """Short stable hash of a JSON-able settings dict."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of a model's weights (names, shapes and values), to tie artefacts to a checkpoint."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}.pt"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with naming_space_errors(path):
            torch.save(payload, tmp)
            os.replace(tmp, path)
    except RuntimeError as err:  # torch's zip writer reports a full disk as "write failed"
        if "write failed" not in str(err) and "file write" not in str(err):
            raise
        tmp.unlink(missing_ok=True)
        raise out_of_space(path, OSError(errno.ENOSPC, str(err))) from err
    except OutOfSpaceError:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, expected_settings: dict | None = None) -> dict[str, Any]:
    """Load a checkpoint; refuse one that is unreadable or made with other settings.

    expected_settings: if given, compared with the checkpoint's `settings`; a difference raises
    ValueError naming each differing key.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; run the training stage first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ValueError(
            f"checkpoint {path} is corrupt or not a diffattr checkpoint ({err}); delete it and "
            "rerun the training stage (it resumes from the previous checkpoint)"
        ) from err
    if not isinstance(payload, dict) or "settings" not in payload or "model" not in payload:
        raise ValueError(f"{path} is not a diffattr checkpoint (no settings/model inside)")
    if expected_settings is not None:
        diff = settings_diff(payload["settings"], expected_settings)
        if diff:
            raise ValueError(
                f"checkpoint {path} was made with other settings: {diff}; use the matching "
                "parameters or retrain"
            )
    return payload


def settings_diff(stored: dict, requested: dict) -> str:
    """'key.sub: stored X vs requested Y; …' for each differing leaf (after a JSON round trip),
    '' if none."""
    a = json.loads(json.dumps(stored, sort_keys=True, default=str))
    b = json.loads(json.dumps(requested, sort_keys=True, default=str))
    return "; ".join(line.strip() for line in setting_differences(a, b))


def work_folder(out_dir: Path) -> Path:
    """Where a stage keeps unfinished (and reusable) work: beside out_dir, so that DVC clearing
    out_dir before a rerun does not lose it."""
    return out_dir.parent / f".{out_dir.name}-work"
