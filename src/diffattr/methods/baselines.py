"""Reference scores every attribution method should beat: random scores and raw-pixel cosine
similarity (a proponent is a training image that looks like the query)."""

from __future__ import annotations

import numpy as np
import torch

from diffattr.artifacts.scores import Scores


def random_scores(like: Scores, seed: int = 0) -> Scores:
    """Standard-normal scores of the same queries and training samples, seeded."""
    values = np.random.default_rng(seed).standard_normal(like.values.shape)
    return Scores(
        values, like.train_ids, like.query_kind, like.query_key, {"method": "random", "seed": seed}
    )


def pixel_cosine_scores(
    query_images: torch.Tensor, train_images: torch.Tensor, like: Scores
) -> Scores:
    """cos(x_q, x_j) of the flattened images in [-1, 1]: query_images [Q, C, H, W] in the rows'
    order of `like`, train_images [N, C, H, W] in its columns' order. Returns [Q, N] scores."""
    if len(query_images) != len(like.query_key) or len(train_images) != len(like.train_ids):
        raise ValueError(
            f"{len(query_images)} query and {len(train_images)} training images for scores of "
            f"shape {like.values.shape}"
        )
    if query_images.shape[1:] != train_images.shape[1:]:
        raise ValueError(
            f"query images {tuple(query_images.shape[1:])} and training images "
            f"{tuple(train_images.shape[1:])} differ in shape"
        )
    q = torch.nn.functional.normalize(query_images.flatten(1).double(), dim=1)
    t = torch.nn.functional.normalize(train_images.flatten(1).double(), dim=1)
    return Scores(
        (q @ t.T).cpu().numpy(),
        like.train_ids,
        like.query_kind,
        like.query_key,
        {"method": "pixel_cosine", "space": "pixels in [-1, 1], flattened"},
    )
