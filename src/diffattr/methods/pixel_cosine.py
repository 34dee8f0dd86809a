"""Raw-pixel cosine similarity: a proponent is a training image that looks like the query."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffattr.artifacts.scores import Scores
from diffattr.methods.base import Method, MethodInputs


@dataclass(frozen=True)
class PixelCosineArgs:
    pass


def pixel_cosine(query_images: torch.Tensor, train_images: torch.Tensor) -> torch.Tensor:
    """cos(x_q, x_j) of flattened images: [Q, C, H, W] × [N, C, H, W] → [Q, N] float64."""
    if query_images.shape[1:] != train_images.shape[1:]:
        raise ValueError(
            f"query images {tuple(query_images.shape[1:])} and training images "
            f"{tuple(train_images.shape[1:])} differ in shape"
        )
    q = torch.nn.functional.normalize(query_images.flatten(1).double(), dim=1)
    t = torch.nn.functional.normalize(train_images.flatten(1).double(), dim=1)
    return q @ t.T


def compute(inputs: MethodInputs, args: PixelCosineArgs) -> Scores:
    values = pixel_cosine(inputs.queries.images, inputs.train.images).numpy()
    return inputs.gradients.scores(
        values, {"space": "pixels in [-1, 1], flattened", "run_id": inputs.gradients.run_id}
    )


def trace(inputs: MethodInputs, args: PixelCosineArgs, n_queries: int) -> Scores:
    ids = inputs.gradients.train_ids
    rows = np.linspace(0, len(ids) - 1, min(n_queries, len(ids))).astype(np.int64)
    images = inputs.train.images
    values = pixel_cosine(images[torch.from_numpy(rows)], images).numpy()
    return Scores(
        values, ids, np.full(len(rows), "train"), ids[rows], {"self_columns": rows.tolist()}
    )


METHOD = Method(
    "pixel_cosine",
    "Pixel cosine",
    PixelCosineArgs,
    compute,
    summary="cosine similarity of raw pixels",
    trace=trace,
)
