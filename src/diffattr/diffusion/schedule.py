"""The DDPM noise schedule and the forward process x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

SCHEDULES = ("linear", "cosine")


def build_scheduler(schedule: str = "linear", num_train_timesteps: int = 1000) -> DDPMScheduler:
    """DDPM noise schedule: linear β from 1e-4 to 0.02 (Ho et al.) or cosine (Nichol & Dhariwal)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    beta_schedule = "linear" if schedule == "linear" else "squaredcos_cap_v2"
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule=beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
    )


def add_noise(
    x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε. x0, eps: [B, C, H, W]; t: [B] int; alphas_cumprod: [T]."""
    abar = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t].view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps
