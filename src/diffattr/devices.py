"""Choosing the torch device: CUDA when present, the CPU otherwise, or what the user names.

On CUDA, resolving the device also switches on deterministic kernels (`deterministic_cuda`):
every stage, every retraining worker process and every SLURM job resolves its device through
`resolve_device`, so each process that computes on a GPU runs with the same flags. The
environment variable `DIFFATTR_DETERMINISM` chooses how strict: `strict` (default), `warn` or
`off`. `determinism_settings` says what a process ran under; stages write it into their
metrics.
"""

from __future__ import annotations

import os
import warnings

import torch

# cuBLAS picks its reduction order per workspace; a fixed workspace layout makes its matmuls
# deterministic (CUDA ≥ 10.2). Read when a process makes its first cuBLAS call.
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE = ":4096:8"
# strict: an operation without a deterministic CUDA kernel raises; warn: it warns and runs
# nondeterministically; off: no flag is touched (cuDNN benchmarking and all).
DETERMINISM_ENV = "DIFFATTR_DETERMINISM"
DETERMINISM_MODES = ("strict", "warn", "off")


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` → cuda if available else cpu; `cpu`, `cuda`, `cuda:N` as given (checked).

    A CUDA device also switches on deterministic kernels for this process (`deterministic_cuda`;
    strict unless the environment sets `DIFFATTR_DETERMINISM=warn` or `off`).
    """
    if spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = _checked(spec)
    if device.type == "cuda":
        mode = os.environ.get(DETERMINISM_ENV, "strict")
        if mode not in DETERMINISM_MODES:
            raise ValueError(
                f"{DETERMINISM_ENV}={mode!r}; use one of {', '.join(DETERMINISM_MODES)}"
            )
        if mode != "off":
            deterministic_cuda(warn_only=mode == "warn")
    return device


def _checked(spec: str) -> torch.device:
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ValueError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r} asked for, but torch sees no CUDA GPU; use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {spec!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s): "
            f"use cuda:0 … cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def deterministic_cuda(warn_only: bool = False) -> dict:
    """Switch this process to deterministic GPU kernels; returns `determinism_settings()`.

    Sets `CUBLAS_WORKSPACE_CONFIG=:4096:8` (unless the environment already sets it), turns on
    `torch.use_deterministic_algorithms`, and makes cuDNN pick deterministic convolution
    algorithms (`cudnn.deterministic = True`) without benchmarking (`cudnn.benchmark = False`,
    whose choice can differ run to run).

    Strict by default (warn_only=False): an operation without a deterministic CUDA kernel raises
    a RuntimeError naming itself, at its first call — early in a stage, since every step runs
    the same operations. Strict, not warn_only, because the UNet's attention needs it: on CUDA,
    float32 `scaled_dot_product_attention` picks the memory-efficient kernel, whose backward
    (training, per-sample gradients) splits keys nondeterministically under warn_only and is
    made deterministic only in strict mode. None of the pipeline's other CUDA operations
    (convolutions, GroupNorm, nearest upsampling, matmuls, index_add_, sorting, eigh) is on
    torch's list of operations without a deterministic kernel. warn_only=True
    (`DIFFATTR_DETERMINISM=warn`) is the way out for a model with an operation that has none
    (e.g. bilinear upsampling): it warns and runs, and its numbers may differ between runs.
    """
    if CUBLAS_WORKSPACE_ENV not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warnings.warn(
                f"{CUBLAS_WORKSPACE_ENV} set after CUDA started in this process: matmuls are "
                f"deterministic only if cuBLAS had not run yet; set {CUBLAS_WORKSPACE_ENV}="
                f"{CUBLAS_WORKSPACE} in the environment before starting Python to be sure",
                stacklevel=2,
            )
        os.environ[CUBLAS_WORKSPACE_ENV] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return determinism_settings()


def determinism_settings() -> dict:
    """What this process's numbers depend on besides the seeds: the torch, CUDA and cuDNN
    versions, the GPU, the determinism flags, TF32 use and the CPU thread count."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        CUBLAS_WORKSPACE_ENV: os.environ.get(CUBLAS_WORKSPACE_ENV),
        DETERMINISM_ENV: os.environ.get(DETERMINISM_ENV, "strict"),
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "cpu_threads": torch.get_num_threads(),
    }
