"""Extract an `ItemSet`'s gradients into a store: exact norms first, then the projection.

Arrays written for a set named `name` (row = image, column = timestep):
- `{name}_norm`     float32 [N, M]: exact ‖g‖₂ of each full gradient, before projection;
- `{name}_features` float32 [N, M, k]: the projected gradients (omitted when `features=False`).
Rows already in the store are skipped, so an interrupted extraction resumes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from diffattr.gradients.engines import PerSampleGradients
from diffattr.gradients.items import ItemSet
from diffattr.gradients.projection import Projector
from diffattr.storage.arrays import ArrayStore


def array_specs(
    name: str, items: ItemSet, dim_out: int | None
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Store array specs for a set: norms always, features when dim_out is given."""
    specs = {f"{name}_norm": ((items.n, items.m), "float32")}
    if dim_out is not None:
        specs[f"{name}_features"] = ((items.n, items.m, dim_out), "float32")
    return specs


@dataclass
class Throughput:
    """Time spent and gradients taken; a single-draw gradient counts once per draw."""

    gradients: int = 0
    sample_gradients: int = 0
    gradient_s: float = 0.0
    projection_s: float = 0.0
    per_set: dict[str, float] = field(default_factory=dict)

    def add(self, other: Throughput) -> None:
        self.gradients += other.gradients
        self.sample_gradients += other.sample_gradients
        self.gradient_s += other.gradient_s
        self.projection_s += other.projection_s
        self.per_set.update(other.per_set)

    def as_dict(self) -> dict[str, float]:
        per = max(self.gradients, 1)
        return {
            "gradients": self.gradients,
            "sample_gradients": self.sample_gradients,
            "gradient_s": round(self.gradient_s, 3),
            "projection_s": round(self.projection_s, 3),
            "ms_per_gradient": round(1000 * self.gradient_s / per, 3),
            "ms_per_projection": round(1000 * self.projection_s / per, 3),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extract(
    store: ArrayStore,
    name: str,
    items: ItemSet,
    grads: PerSampleGradients,
    projector: Projector | None,
    batch_size: int = 64,
    progress: bool = True,
) -> Throughput:
    """Compute and store the gradients of every cell of `items` not yet in the store.

    batch_size: cells (image × timestep) per gradient call; each costs `items.draws` sample
    gradients. Returns what this call computed and how long it took.
    """
    norm_name, feat_name = f"{name}_norm", f"{name}_features"
    todo = set(store.pending(norm_name).tolist())
    if projector is not None:
        todo |= set(store.pending(feat_name).tolist())
    rows_per_batch = max(1, batch_size // items.m)
    stats = Throughput()
    bar = tqdm(
        total=items.n,
        initial=items.n - len(todo),
        disable=not progress,
        desc=name,
        unit="img",
        mininterval=2.0,
    )
    shape = tuple(items.x0.shape[1:])
    for start in range(0, items.n, rows_per_batch):
        rows = np.arange(start, min(items.n, start + rows_per_batch))
        if not todo.intersection(rows.tolist()):
            continue
        b = len(rows)
        x0 = items.x0[torch.from_numpy(rows)].repeat_interleave(items.m, dim=0)
        t = items.t[torch.from_numpy(rows)].reshape(-1)
        eps = items.noise(rows).reshape(b * items.m, items.draws, *shape)
        began = time.perf_counter()
        g = grads(x0, t, eps)
        norms = torch.linalg.vector_norm(g, dim=1)
        _sync(g.device)
        projected_at = time.perf_counter()
        feats = projector(g) if projector is not None else None
        _sync(g.device)
        done = time.perf_counter()
        if projector is not None:
            store.write(feat_name, start, feats.reshape(b, items.m, -1).cpu())
        store.write(norm_name, start, norms.reshape(b, items.m).cpu())
        stats.gradients += b * items.m
        stats.sample_gradients += b * items.m * items.draws
        stats.gradient_s += projected_at - began
        stats.projection_s += done - projected_at
        bar.update(b)
    bar.close()
    stats.per_set[name] = round(stats.gradient_s + stats.projection_s, 3)
    return stats


def mean_gradient_chunks(
    items: ItemSet,
    grads: PerSampleGradients,
    rows_per_chunk: int = 256,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "gradients",
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Full (unprojected) gradients of each image averaged over its M timesteps and S draws,
    `rows_per_chunk` images at a time: yields (rows [b] int64, [b, D] float32 on the gradients'
    device) — for methods that stream exact gradients instead of reading a store.

    Each image's M·S draws are one item with a timestep per draw, so the engine sums them inside
    its per-sample products (no [b·M, D] intermediate); batch_size counts cells (image ×
    timestep) per gradient call."""
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be ≥ 1, got {rows_per_chunk}")
    rows_per_batch = max(1, batch_size // items.m)
    shape = tuple(items.x0.shape[1:])
    draws = items.m * items.draws
    bar = tqdm(total=items.n, disable=not progress, desc=desc, unit="image")
    for chunk_start in range(0, items.n, rows_per_chunk):
        chunk = np.arange(chunk_start, min(items.n, chunk_start + rows_per_chunk))
        out = torch.zeros(len(chunk), grads.dim, device=grads.device)
        for start in range(0, len(chunk), rows_per_batch):
            rows = chunk[start : start + rows_per_batch]
            b = len(rows)
            x0 = items.x0[torch.from_numpy(rows)]
            t = items.t[torch.from_numpy(rows)].repeat_interleave(items.draws, dim=1)  # [b, M·S]
            eps = items.noise(rows).reshape(b, draws, *shape)
            g = grads(x0.to(grads.device), t.to(grads.device), eps.to(grads.device))
            out[start : start + b] = g
            bar.update(b)
        yield chunk, out
    bar.close()


def mean_gradients(
    items: ItemSet, grads: PerSampleGradients, batch_size: int = 64, progress: bool = False
) -> torch.Tensor:
    """Full (unprojected) gradients of each image averaged over its M timesteps and S draws:
    [N, D] float32 on the gradients' device — ∇ of the measurement averaged over the grid, for
    the few queries whose full gradients a method needs (K-FAC's preconditioned queries)."""
    parts = [
        g
        for _, g in mean_gradient_chunks(
            items, grads, max(1, items.n), batch_size, progress, "query gradients"
        )
    ]
    return torch.cat(parts) if parts else torch.zeros(0, grads.dim, device=grads.device)
