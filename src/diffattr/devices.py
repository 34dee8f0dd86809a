"""Choosing the torch device: CUDA when present, the CPU otherwise, or what the user names."""

from __future__ import annotations

import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` → cuda if available else cpu; `cpu`, `cuda`, `cuda:N` as given (checked)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
